"""lmshrink: compress language models after training, and measure what it did."""

from lmshrink.core.version import __version__

__all__ = ["__version__", "bench", "compress", "evaluate", "export", "load_model"]


def __getattr__(name: str):
    # the verbs load torch and transformers: only when one is used, so the CLI starts at once
    if name in __all__:
        from lmshrink import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmshrink' has no attribute {name!r}")
