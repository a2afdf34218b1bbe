"""Model sources (packaged names, folders, GGUF, hub) and architecture adapters."""

from .loader import LoadedModel, ModelInfo, load_model, resolve, wrap_model
from .registry import DEFAULT_MODEL, PACKAGED_MODELS, get_packaged

__all__ = ["LoadedModel", "ModelInfo", "load_model", "resolve", "wrap_model", "DEFAULT_MODEL", "PACKAGED_MODELS",
           "get_packaged"]
