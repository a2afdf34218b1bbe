"""Data sets from the Hugging Face hub without a minute of retries: ``datasets.load_dataset`` otherwise retries an
unreachable hub for about 25 seconds before it gives up; when the hub cannot be asked (``core.hub``),
``load_dataset`` reads the local datasets cache only (``load_dataset_or_cache``).
"""

from __future__ import annotations

from lmshrink.core.hub import hub_unavailable_reason


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
