"""Build a model whose quantized Linear layers run from their codes (QuantLinear), from a saved folder or in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.quant.grids import QuantResult

from .qlinear import QuantLinear


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def replace_linears(model: nn.Module, results: dict[str, QuantResult], *, kernels: bool = True,
                    kernel_max_rows: int | None = None, cache_dense: bool = False) -> dict[str, str]:
    """Replace each ``nn.Linear`` named in ``results`` by a QuantLinear built from its codes; returns name -> kind.

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
        module = QuantLinear.from_result(result, bias, kernels=kernels, kernel_max_rows=kernel_max_rows,
                                         cache_dense=cache_dense)
        _set_submodule(model, name, module)
        kinds[name] = module.kind
    return kinds


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS would include them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_packed(folder: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                kernels: bool = True, kernel_max_rows: int | None = None, cache_dense: bool = False):
    """(model, tokenizer, kinds) for a compressed-tensors folder written by lmshrink, quantized layers packed.

    Everything outside the quantized layers is loaded in ``dtype``; no dense copy of a quantized weight is kept.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder, iter_quantized_results
    from lmshrink.models.loader import SafetensorsWeights, _MetaParameters, replace_tensor

    folder = Path(folder)
    if not is_compressed_tensors_folder(folder):
        raise LmshrinkError(f"{folder} is not a compressed checkpoint (config.json has no compressed-tensors "
                            "quantization_config)", fix="runtime='packed' needs a folder written by lmshrink compress; "
                                                        "load other models with runtime='dense'")
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    config = AutoConfig.from_pretrained(str(folder), **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _MetaParameters():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    weights = SafetensorsWeights(folder)
    quantized = {key[: -len("_packed")] for key in weights.keys() if key.endswith(".weight_packed")}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type != "meta" or name in quantized or name not in weights:
            continue
        stored = weights.get(name)
        if tuple(stored.shape) != tuple(tensor.shape):
            raise LmshrinkError(f"{folder}: tensor {name} has shape {tuple(stored.shape)}, the model expects "
                                f"{tuple(tensor.shape)}", fix="check that config.json matches the weights")
        replace_tensor(model, tensor, stored.to(tensor.dtype) if stored.is_floating_point() else stored)
    from lmshrink.formats.sparse_bitmask import fill_bitmask_weights, is_bitmask_folder

    if is_bitmask_folder(folder):  # pruned, unquantized layers stored as bitmask + values: decoded, kept dense
        fill_bitmask_weights(model, folder)
    kinds = {}
    # one layer at a time: only one layer's unpacked codes exist besides the packed model
    for name, result in iter_quantized_results(folder, decode=False):
        kinds.update(replace_linears(model, {name: result}, kernels=kernels, kernel_max_rows=kernel_max_rows,
                                     cache_dense=cache_dense))
    _release_freed_memory()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LmshrinkError(f"{folder} lacks tensors the model needs: {missing[:5]}",
                            fix="the checkpoint is incomplete or its tensor names differ from the model's")
    return model.eval(), tokenizer, kinds
