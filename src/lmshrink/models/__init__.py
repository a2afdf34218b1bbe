"""Model sources (packaged names, folders, GGUF, hub) and architecture adapters."""

from .loader import LoadedModel, ModelInfo, as_loaded, load_model, resolve, wrap_model
from .registry import DEFAULT_MODEL, PACKAGED_MODELS, get_packaged

__all__ = ["as_loaded", "LoadedModel", "ModelInfo", "load_model", "resolve", "wrap_model", "DEFAULT_MODEL", "PACKAGED_MODELS",
           "get_packaged"]

from .adapters import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    ModelAdapter,
    get_adapter,
    is_linear,
    iter_linears,
    linear_dims,
    linear_weight,
    set_linear_weight,
)

__all__ += ["SUPPORTED_MODEL_TYPES", "ModelAdapter", "get_adapter", "is_linear", "iter_linears", "linear_dims",
            "linear_weight", "set_linear_weight"]
