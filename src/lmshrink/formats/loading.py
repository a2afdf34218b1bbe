"""Opening a model from any source: packaged names, Hugging Face folders, .gguf files and hub ids (``models``), and
the folders lmshrink writes: pruned layers stored as bitmask + values are decoded exactly, and with
``runtime="packed"`` quantized layers execute their codes (``runtime.QuantLinear``) instead of being decoded."""

from __future__ import annotations

from pathlib import Path

import torch

from lmshrink.core.actquant import ActSpec
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import to_signed
from lmshrink.core.process import release_free_heap
from lmshrink.formats.compressed_tensors import (
    is_compressed_tensors_folder,
    is_outlier_folder,
    iter_quantized_results,
    quantized_weight_keys,
)
from lmshrink.formats.lowrank import install_lowrank, is_lowrank_folder, load_lowrank_model
from lmshrink.formats.runtime_scheme import apply_runtime, read_runtime, summary
from lmshrink.formats.sparse_bitmask import fill_bitmask_weights, is_bitmask_folder, load_bitmask_model
from lmshrink.models import loader
from lmshrink.models.adapters import get_adapter
from lmshrink.models.loader import (
    LoadedModel,
    ModelInfo,
    SafetensorsWeights,
    checkpoint_weights,
    count_parameters,
    fill_meta_tensors,
    has_structure,
    max_context,
    meta_model,
    parse_dtype,
    replace_tensor,
    wrap_model,
)
from lmshrink.models.resolve import resolve
from lmshrink.runtime.activations import SCALE
from lmshrink.runtime.int8 import Int8Linear
from lmshrink.runtime.int8 import fits as int8_fits
from lmshrink.runtime.packed import replace_linears, set_submodule


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
    lowrank = kind == "hf-folder" and is_lowrank_folder(where)
    if lowrank and _moe_folder(where):
        raise LmshrinkError(f"{source} stores low-rank layers of a mixture-of-experts model, which lmshrink cannot "
                            "load yet (transformers reads fused experts, the factors are stored per expert)",
                            fix="compress mixture-of-experts models without low-rank stages (svd, basis-sharing, "
                                "gptq-factors, lowrank-correction)")
    if lowrank and lazy_blocks:
        raise LmshrinkError(f"{source} stores low-rank factors, which streamed loading (lazy blocks) cannot read",
                            fix="load it without lazy_blocks / --offload disk")
    scheme = read_runtime(where) if kind == "hf-folder" else None
    if scheme and lazy_blocks:
        raise LmshrinkError(f"{source} quantizes activations or its cache (lmshrink-runtime.json); it cannot be "
                            "streamed block by block", fix="load it whole (no --offload disk)")
    # folders transformers cannot read whole are built by lmshrink: 16-bit outlier columns, pruned weights stored as
    # bitmask + values (decoded exactly), low-rank layers (two-matmul modules, formats.lowrank), widths the config
    # cannot state (structured pruning with per-layer widths)
    build = None
    if kind == "hf-folder" and is_outlier_folder(where):
        build = load_outlier_model
    elif kind == "hf-folder" and is_bitmask_folder(where):
        build = load_bitmask_model
    elif lowrank:
        build = load_lowrank_model
    if kind == "hf-folder" and has_structure(where):  # decodes quantized and bitmask layers itself
        if build in (load_outlier_model, load_lowrank_model):
            raise LmshrinkError(f"{source} has per-layer widths and also {build.__name__[5:-6]} layers, which "
                                "lmshrink cannot load together yet",
                                fix="run the structural stage and the others in separate runs, keeping widths uniform")
        build = load_structured_model
    if kind == "hf-folder" and build is None and _compressed_experts(where):
        build = load_decoded  # transformers reads fused experts; lmshrink wrote one packed linear per expert
    if scheme and build is None and is_compressed_tensors_folder(where):
        # lmshrink decodes the weights itself, so that only its own quantizers act on the activations
        build = _decoded_builder
    loaded = loader.load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               progress=progress, lazy_blocks=lazy_blocks, build=build)
    if scheme:
        _apply_scheme(loaded.model, Path(where), scheme)
        loaded.info.extra["runtime_scheme"] = summary(scheme)
    return loaded


def _apply_scheme(model: torch.nn.Module, folder: Path, scheme: dict) -> None:
    weights = SafetensorsWeights(folder)
    apply_runtime(model, scheme, lambda name: weights.get(name) if name in weights else None)
    device = next(model.parameters()).device
    model.to(device)  # the stored scales join the model's device


def _decoded_builder(folder, dtype=torch.float32, trust_remote_code: bool = False, **_):
    """A compressed folder's model with its quantized layers decoded to dense weights (as transformers decodes
    them) but without transformers' own activation quantization."""
    model, _, _ = load_packed(folder, dtype=dtype, trust_remote_code=trust_remote_code, decode=True)
    return model


def load_structured_model(folder: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                          **_):
    """A folder whose config records a structure it cannot state (``models.structure``: per-layer widths, OPT or
    GPT-2 heads): built from the config with that structure, every tensor read from the files, quantized layers
    decoded from their codes and bitmask-stored layers from their bitmasks (plain transformers refuses such a
    folder)."""
    folder = Path(folder)
    model, _ = meta_model(folder, dtype, trust_remote_code, drop_quantization=True)
    fill_meta_tensors(model, SafetensorsWeights(folder), skip=lambda name: False)
    if is_compressed_tensors_folder(folder):
        for name, result in iter_quantized_results(folder):
            module = model.get_submodule(name)
            replace_tensor(model, module.weight, result.dense().to(module.weight.dtype))
    if is_bitmask_folder(folder):
        fill_bitmask_weights(model, folder)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LmshrinkError(f"{folder} lacks tensors its recorded structure needs: {missing[:5]}",
                            fix="the folder is incomplete; write it again")
    return model.eval()


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


def _int8_layer(name: str, result, entry: dict | None, weights: SafetensorsWeights, model: torch.nn.Module,
                kernels: bool) -> Int8Linear | None:
    """An Int8Linear for a layer whose weights are int8 per channel, symmetric, and whose recorded activations are
    int8 per token or per tensor; None for other layers."""
    if entry is None or "activations" not in entry:
        return None
    spec = ActSpec(**entry["activations"])
    grid = result.spec
    if grid.bits not in (7, 8) or not grid.symmetric or result.scale.shape[1] != 1 or not result.contiguous_groups():
        return None
    codes = to_signed(result.codes, grid.bits)
    if int8_fits(codes, spec) is not None:
        return None
    linear = model.get_submodule(name)
    bias = linear.bias
    if bias is not None and bias.device.type == "meta":
        raise LmshrinkError(f"layer {name}: its bias was not loaded", fix="the checkpoint is incomplete")
    input_scale = None if spec.dynamic else weights.get(f"{name}.{SCALE}")
    return Int8Linear.from_codes(codes, result.scale[:, 0], bias, spec, input_scale, kernels=kernels)


def _load_packed_source(source: str, dtype: torch.dtype, device: str, trust_remote_code: bool) -> LoadedModel:
    kind, where = resolve(source)
    if kind != "hf-folder":
        raise LmshrinkError(f"runtime='packed' needs a compressed model folder; {source} is a {kind} source",
                            fix="compress it first (lmshrink compress ... -o DIR) and load DIR")
    if device != "cpu":
        raise LmshrinkError(f"runtime='packed' runs on CPU only, not {device!r}",
                            fix="use device='cpu', or runtime='dense' on an accelerator")
    scheme = read_runtime(where)
    model, tokenizer, kinds = load_packed(where, dtype=dtype, trust_remote_code=trust_remote_code, scheme=scheme)
    counts = {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
    extra = {"runtime": "packed", "packed_layers": counts}
    if scheme:
        _apply_scheme(model, Path(where), scheme)
        extra["runtime_scheme"] = summary(scheme)
    info = ModelInfo(source=source, kind=kind, path=str(where), model_type=model.config.model_type,
                     dtype=str(dtype).replace("torch.", ""), parameters=count_parameters(model),
                     max_context=max_context(model.config), extra=extra)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def load_outlier_model(folder: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                       **_kwargs) -> torch.nn.Module:
    """The model of a compressed folder whose quantized layers lmshrink decodes itself (transformers refuses layers
    with 16-bit outlier columns): every quantized Linear gets its exact dense weight, grid plus kept columns, in
    ``dtype``; everything else is read as stored."""
    folder = Path(folder)
    model, _ = meta_model(folder, dtype, trust_remote_code, drop_quantization=True)
    weights = SafetensorsWeights(folder)
    quantized = {key[: -len("_packed")] for key in weights.keys() if key.endswith(".weight_packed")}
    fill_meta_tensors(model, weights, skip=quantized.__contains__)
    if is_bitmask_folder(folder):
        fill_bitmask_weights(model, folder)
    modules = dict(model.named_modules())
    for name, result in iter_quantized_results(folder):
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != tuple(result.codes.shape):
            raise LmshrinkError(f"{folder} stores a quantized layer {name} of shape {tuple(result.codes.shape)} that "
                                "the model has no matching Linear for",
                                fix="the checkpoint does not match its config.json")
        module.weight = torch.nn.Parameter(result.dense().to(dtype), requires_grad=module.weight.requires_grad)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LmshrinkError(f"{folder} lacks tensors the model needs: {missing[:5]}",
                            fix="the checkpoint is incomplete or its tensor names differ from the model's")
    return model.eval()


def load_packed(folder: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                kernels: bool = True, kernel_max_rows: int | None = None, cache_dense: bool = False,
                decode: bool = False, scheme: dict | None = None):
    """(model, tokenizer, kinds) for a compressed-tensors folder written by lmshrink, quantized layers packed.

    Everything outside the quantized layers is loaded in ``dtype``; no dense copy of a quantized weight is kept.
    ``decode``: the quantized layers stay ``nn.Linear`` with their decoded weights instead (kind ``dense``).
    ``scheme``: the folder's runtime scheme (``lmshrink-runtime.json``): layers with int8 per-channel symmetric
    weights and int8 activations it records become ``Int8Linear`` (kind ``int8_a8``: integer products).
    """
    folder = Path(folder)
    if not is_compressed_tensors_folder(folder):
        raise LmshrinkError(f"{folder} is not a compressed checkpoint (config.json has no compressed-tensors "
                            "quantization_config)", fix="runtime='packed' needs a folder written by lmshrink compress; "
                                                        "load other models with runtime='dense'")
    model, tokenizer = meta_model(folder, dtype, trust_remote_code, drop_quantization=True)
    weights = checkpoint_weights(folder, model)
    model_name = get_adapter(model).model_name
    quantized = {model_name(key) for key in quantized_weight_keys(folder)}
    fill_meta_tensors(model, weights, skip=quantized.__contains__)
    if is_bitmask_folder(folder):  # pruned, unquantized layers stored as bitmask + values: decoded, kept dense
        fill_bitmask_weights(model, folder)
    kinds = {}
    # one layer at a time: only one layer's unpacked codes exist besides the packed model
    for stored_name, result in iter_quantized_results(folder, decode=decode):
        name = model_name(stored_name)
        if decode:
            linear = model.get_submodule(name)
            replace_tensor(model, linear.weight, result.weight.to(dtype))
            kinds[name] = "dense"
            continue
        int8 = _int8_layer(name, result, (scheme or {}).get("inputs", {}).get(name), weights, model, kernels)
        if int8 is not None:
            set_submodule(model, name, int8)
            kinds[name] = "int8_a8"
            continue
        kinds.update(replace_linears(model, {name: result}, kernels=kernels, kernel_max_rows=kernel_max_rows,
                                     cache_dense=cache_dense))
    if is_lowrank_folder(folder):  # factorized layers and corrections (around the packed layers)
        for name in install_lowrank(model, folder, dtype):
            kinds.setdefault(name, "lowrank")
    release_free_heap(collect=True)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LmshrinkError(f"{folder} lacks tensors the model needs: {missing[:5]}",
                            fix="the checkpoint is incomplete or its tensor names differ from the model's")
    return model.eval(), tokenizer, kinds


def _moe_folder(folder: Path) -> bool:
    """A folder of a mixture-of-experts family."""
    from lmshrink.formats.hf_folder import read_config
    from lmshrink.models.adapters import SUPPORTED_MODEL_TYPES

    config = read_config(Path(folder)) or {}
    model_type = config.get("model_type")
    return model_type in SUPPORTED_MODEL_TYPES and get_adapter(model_type).spec.moe is not None


def _compressed_experts(folder: Path) -> bool:
    """A compressed-tensors folder of a mixture-of-experts family (its experts stored one linear each)."""
    return is_compressed_tensors_folder(folder) and _moe_folder(folder)


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
