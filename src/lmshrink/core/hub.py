"""Whether the Hugging Face hub can be asked at all: its offline switches, then one quick connection.

Asked before transformers or datasets touch the hub: when it cannot be reached they retry for up to a minute
before giving up, so callers read the local cache only (at once) when this says no.
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlsplit

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_HOST = "huggingface.co"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def is_true(value: str | None) -> bool:
    """huggingface_hub's reading of a boolean environment variable."""
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unavailable_reason(timeout: float = 3.0, variables: tuple[str, ...] = OFFLINE_VARS) -> str | None:
    """None when the hub may be asked; otherwise why not (one of ``variables`` set, or no connection)."""
    for var in variables:
        if is_true(os.environ.get(var)):
            return f"{var}={os.environ[var]} is set"
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return None  # through a proxy a direct connection says nothing: let the library try
    host, port = HUB_HOST, 443
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", ""))
    if endpoint.hostname:  # a mirror: ask that host
        host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({type(exc).__name__}: {exc})"
    return None


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub in offline mode for the duration (every library that asks ``is_offline_mode()`` then reads
    its local cache only, without a request)."""
    try:
        import huggingface_hub.constants as constants
    except ImportError:  # no hub client: nothing can ask the network
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
