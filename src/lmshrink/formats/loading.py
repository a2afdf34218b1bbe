"""Opening a model from any source: packaged names, Hugging Face folders, .gguf files and hub ids (``models``), and
the folders lmshrink writes: pruned layers stored as bitmask + values are decoded exactly, and with
``runtime="packed"`` quantized layers execute their codes (``runtime.QuantLinear``) instead of being decoded."""

from __future__ import annotations

from pathlib import Path

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.process import release_free_heap
from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder, iter_quantized_results
from lmshrink.formats.sparse_bitmask import fill_bitmask_weights, is_bitmask_folder, load_bitmask_model
from lmshrink.models import loader
from lmshrink.models.adapters import get_adapter
from lmshrink.models.loader import (
    LoadedModel,
    ModelInfo,
    checkpoint_weights,
    count_parameters,
    fill_meta_tensors,
    max_context,
    meta_model,
    parse_dtype,
    resolve,
    wrap_model,
)
from lmshrink.runtime.packed import replace_linears


def load_model(source: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
               trust_remote_code: bool = False, progress: bool = True, lazy_blocks: bool = False,
               runtime: str = "dense") -> LoadedModel:
    """Load a causal LM and its tokenizer from a packaged name, local folder, .gguf file or hub id.

    ``runtime="packed"``: for a compressed folder written by lmshrink, the quantized Linear layers execute their
    codes (``lmshrink.runtime.QuantLinear``: int4/int8 CPU kernels) instead of being decoded to dense weights.

    ``lazy_blocks``: load only the tensors outside the decoder blocks (embeddings, final norm, head); the blocks'
    parameters stay on the meta device and ``LoadedModel.weights`` reads them from the safetensors files on demand.
    Needs a local source (hub ids are refused); the model is built on CPU.
    """
    if runtime not in ("dense", "packed"):
        raise LmshrinkError(f"runtime={runtime!r} is not known", fix="use runtime='dense' or runtime='packed'")
    if runtime == "packed":
        return _load_packed_source(source, parse_dtype(dtype), device, trust_remote_code)
    kind, where = resolve(source)
    # pruned weights stored as bitmask + values: transformers loads the rest, the bitmask layers are decoded exactly
    build = load_bitmask_model if kind == "hf-folder" and is_bitmask_folder(where) else None
    if kind == "hf-folder" and build is None and _compressed_experts(where):
        build = load_decoded  # transformers reads fused experts; lmshrink wrote one packed linear per expert
    return loader.load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                             progress=progress, lazy_blocks=lazy_blocks, build=build)


def as_loaded(model: LoadedModel | str | torch.nn.Module, tokenizer=None, **load_kwargs) -> LoadedModel:
    """A LoadedModel from a source string, a LoadedModel, or an in-memory module with its tokenizer."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), **load_kwargs)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise LmshrinkError("an in-memory model needs its tokenizer", fix="pass tokenizer=...")
        return wrap_model(model, tokenizer)
    raise LmshrinkError(f"cannot use an object of type {type(model).__name__}",
                        fix="pass a model source string, a LoadedModel, or a torch module with tokenizer=")


def _load_packed_source(source: str, dtype: torch.dtype, device: str, trust_remote_code: bool) -> LoadedModel:
    kind, where = resolve(source)
    if kind != "hf-folder":
        raise LmshrinkError(f"runtime='packed' needs a compressed model folder; {source} is a {kind} source",
                            fix="compress it first (lmshrink compress ... -o DIR) and load DIR")
    if device != "cpu":
        raise LmshrinkError(f"runtime='packed' runs on CPU only, not {device!r}",
                            fix="use device='cpu', or runtime='dense' on an accelerator")
    model, tokenizer, kinds = load_packed(where, dtype=dtype, trust_remote_code=trust_remote_code)
    counts = {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
    info = ModelInfo(source=source, kind=kind, path=str(where), model_type=model.config.model_type,
                     dtype=str(dtype).replace("torch.", ""), parameters=count_parameters(model),
                     max_context=max_context(model.config), extra={"runtime": "packed", "packed_layers": counts})
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def load_packed(folder: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                kernels: bool = True, kernel_max_rows: int | None = None, cache_dense: bool = False):
    """(model, tokenizer, kinds) for a compressed-tensors folder written by lmshrink, quantized layers packed.

    Everything outside the quantized layers is loaded in ``dtype``; no dense copy of a quantized weight is kept.
    """
    folder = Path(folder)
    if not is_compressed_tensors_folder(folder):
        raise LmshrinkError(f"{folder} is not a compressed checkpoint (config.json has no compressed-tensors "
                            "quantization_config)", fix="runtime='packed' needs a folder written by lmshrink compress; "
                                                        "load other models with runtime='dense'")
    model, tokenizer = meta_model(folder, dtype, trust_remote_code, drop_quantization=True)
    weights = checkpoint_weights(folder, model)
    model_name = get_adapter(model).model_name
    quantized = {key[: -len("_packed")] for key in weights.keys() if key.endswith(".weight_packed")}
    fill_meta_tensors(model, weights, skip=quantized.__contains__)
    if is_bitmask_folder(folder):  # pruned, unquantized layers stored as bitmask + values: decoded, kept dense
        fill_bitmask_weights(model, folder)
    kinds = {}
    # one layer at a time: only one layer's unpacked codes exist besides the packed model
    for name, result in iter_quantized_results(folder, decode=False):
        kinds.update(replace_linears(model, {model_name(name): result}, kernels=kernels,
                                     kernel_max_rows=kernel_max_rows,
                                     cache_dense=cache_dense))
    release_free_heap(collect=True)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LmshrinkError(f"{folder} lacks tensors the model needs: {missing[:5]}",
                            fix="the checkpoint is incomplete or its tensor names differ from the model's")
    return model.eval(), tokenizer, kinds


def _compressed_experts(folder: Path) -> bool:
    """A compressed-tensors folder of a mixture-of-experts family (its experts stored one linear each)."""
    from lmshrink.formats.hf_folder import read_config
    from lmshrink.models.adapters import SUPPORTED_MODEL_TYPES

    config = read_config(Path(folder)) or {}
    model_type = config.get("model_type")
    return (is_compressed_tensors_folder(folder) and model_type in SUPPORTED_MODEL_TYPES
            and get_adapter(model_type).spec.moe is not None)


def load_decoded(folder: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                 **_kwargs) -> torch.nn.Module:
    """The model of a compressed-tensors folder written by lmshrink with every quantized layer decoded to dense
    weights (exactly its codes times its scales), built without transformers' checkpoint conversion."""
    folder = Path(folder)
    model, _ = meta_model(folder, dtype, trust_remote_code, drop_quantization=True)
    weights = checkpoint_weights(folder, model)
    model_name = get_adapter(model).model_name
    quantized = {key[: -len("_packed")] for key in weights.keys() if key.endswith(".weight_packed")}
    fill_meta_tensors(model, weights, skip=quantized.__contains__)
    state = model.state_dict(keep_vars=True)
    for name, result in iter_quantized_results(folder):
        old = state[f"{model_name(name)}.weight"]
        loader.replace_tensor(model, old, result.weight.to(old.dtype))
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LmshrinkError(f"{folder} lacks tensors the model needs: {missing[:5]}",
                            fix="the checkpoint is incomplete or its tensor names differ from the model's")
    return model
