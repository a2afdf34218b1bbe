"""Whether the Hugging Face hub can be asked for data: its offline switches, then one quick connection.

Asked before ``datasets.load_dataset``, which otherwise retries an unreachable hub for about 25 seconds before it
gives up; when the hub cannot be asked, ``load_dataset`` reads the local datasets cache only
(``load_dataset_or_cache``).
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
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy a direct connection says nothing: let datasets try
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError as exc:
        return f"{HUB_HOST}:443 cannot be reached ({type(exc).__name__}: {exc})"
    return None


class HubUnavailable(Exception):
    """The hub cannot be asked (offline variable set, or no connection) and the local cache does not hold the set."""


def load_dataset_or_cache(*args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; when the hub cannot be asked (``hub_unavailable_reason``), from the
    local datasets cache only, at once (no retries). Raises ``HubUnavailable`` naming why when that fails too."""
    import datasets

    reason = hub_unavailable_reason()
    if reason is None:
        return datasets.load_dataset(*args, **kwargs)
    import datasets.config as config

    switches = [(config, "HF_HUB_OFFLINE"), (config, "HF_DATASETS_OFFLINE")]
    try:
        import huggingface_hub.constants as hub_constants

        switches.append((hub_constants, "HF_HUB_OFFLINE"))
    except ImportError:
        pass
    saved = [(module, attr, getattr(module, attr)) for module, attr in switches if hasattr(module, attr)]
    try:
        for module, attr, _ in saved:
            setattr(module, attr, True)
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - not in the cache (or unreadable there)
        raise HubUnavailable(f"{reason}, and the local datasets cache does not hold it "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
