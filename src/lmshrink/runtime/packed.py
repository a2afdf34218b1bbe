"""Replace a model's quantized Linear layers by modules that run from their codes (QuantLinear)."""

from __future__ import annotations

from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import OutlierQuantResult, QuantResult
from lmshrink.runtime.qlinear import OutlierLinear, QuantLinear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def replace_linears(model: nn.Module, results: dict[str, QuantResult], *, kernels: bool = True,
                    kernel_max_rows: int | None = None, cache_dense: bool = False) -> dict[str, str]:
    """Replace each ``nn.Linear`` named in ``results`` by a QuantLinear built from its codes (an OutlierLinear for
    results with 16-bit outlier columns); returns name -> kind.

    The Linear's own weight is dropped (it may be on the meta device); its bias is kept.
    """
    kinds = {}
    for name, result in results.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise LmshrinkError(f"the model has no module {name!r} for a quantized layer",
                                fix="the checkpoint does not match this model's architecture") from exc
        if not isinstance(linear, nn.Linear):
            raise LmshrinkError(f"{name} is a {type(linear).__name__}, not a Linear layer",
                                fix="only nn.Linear layers run packed; load with runtime='dense'")
        expected = (linear.out_features, linear.in_features)
        if tuple(result.codes.shape) != expected:
            raise LmshrinkError(f"layer {name}: codes of shape {tuple(result.codes.shape)}, the model's Linear is "
                                f"{expected}", fix="the checkpoint does not match this model's config")
        bias = linear.bias
        if bias is not None and bias.device.type == "meta":
            raise LmshrinkError(f"layer {name}: its bias was not loaded", fix="the checkpoint is incomplete")
        # layers with 16-bit outlier columns (OWQ): the grid's kernel plus a dense matmul on those columns
        kind = OutlierLinear if isinstance(result, OutlierQuantResult) and result.columns.numel() else QuantLinear
        module = kind.from_result(result, bias, kernels=kernels, kernel_max_rows=kernel_max_rows,
                                  cache_dense=cache_dense)
        set_submodule(model, name, module)
        kinds[name] = module.kind
    return kinds
