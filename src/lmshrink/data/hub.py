"""Whether the Hugging Face hub can be asked for data: its offline switches, then one quick connection.

Asked before ``datasets.load_dataset``, which otherwise retries an unreachable hub for about 25 seconds before it
gives up.
"""

from __future__ import annotations

import os
import socket

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_HOST = "huggingface.co"


def _is_true(value: str | None) -> bool:
    """huggingface_hub's reading of a boolean environment variable."""
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unavailable_reason(timeout: float = 3.0) -> str | None:
    """None when the hub may be asked; otherwise why not (an offline variable set, or no connection)."""
    for var in OFFLINE_VARS:
        if _is_true(os.environ.get(var)):
            return f"{var}={os.environ[var]} is set"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError as exc:
        return f"{HUB_HOST}:443 cannot be reached ({type(exc).__name__}: {exc})"
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when no offline variable is set and ``huggingface.co:443`` accepts a connection within ``timeout`` s."""
    return hub_unavailable_reason(timeout) is None
