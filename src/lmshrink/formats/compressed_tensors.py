"""Quantized checkpoints in the compressed-tensors ``pack-quantized`` layout (what transformers and vLLM load).

Layout of one quantized Linear ``name`` (``out`` x ``in``, ``b`` bits, checked against compressed-tensors 0.20.1):

* ``name.weight_packed`` int32 ``[out, ceil(in*b/32)]``: codes packed densely along the input (``pack_int32``);
* ``name.weight_scale`` ``[out, n_groups]`` in the layer's weight dtype (``[out, 1]`` per channel);
* ``name.weight_zero_point`` (asymmetric only) int32 ``[ceil(out*b/32), n_groups]``: zero points packed along the
  output rows; symmetric grids store none (zero = ``2**(b-1)``, i.e. signed codes);
* ``name.weight_shape`` int64 ``[2]`` = ``[out, in]``.

compressed-tensors decodes ``(code - zero) * scale`` in the scale's dtype, which is the dtype the layer is loaded in,
so decoding is exact (bit-identical to ``set_linear_weight(module, result.weight)``) when every scale is exactly
representable in the layer's dtype: always for float32 models; for float16/bfloat16 models the grids must be fitted
with ``GridSpec(scale_dtype=<the model dtype>)``. ``save_quantized`` checks this and refuses otherwise.

What compressed-tensors 0.20.1 cannot load, and what the writer does about it:

* groups must divide the input width. A shorter last group (e.g. 576 columns with g128) is stored exactly with the
  group size ``gcd(group, in)`` (64 for 576/g128), each scale repeated; the original grid is kept in the
  safetensors metadata so ``load_quantized_results`` returns the original ``[out, n_groups]`` parameters.
* ``actorder: group`` (a permuted ``g_idx``, act-order without static groups) was removed: refused with a fix.
  Act-order with static groups has contiguous groups and is written as ``actorder: static``.
* GPT-2 ``Conv1D`` layers are not ``nn.Linear``, which is all the loader quantizes: they are written dequantized
  (exact weights, no size saving), listed in ``ignore``, and not returned by ``load_quantized_results``. When no
  layer is packed at all (GPT-2), the folder is a plain dense checkpoint without ``quantization_config``.
* transformers' default loading route expects unpacked zero points while the format (and vLLM) packs them, so
  checkpoints with asymmetric grids carry ``"dequantize": true`` in ``quantization_config`` (transformers then
  decodes at load time; other readers ignore the key). That route applies the first config group to every layer,
  so asymmetric grids are only written as a single config group unless ``transformers_compatible=False``.

Pruned layers (``PruneResult``) are written densely with their zeros and a compressed-tensors ``sparsity_config`` of
format ``dense`` (plain transformers loads them), or with ``sparse_format="bitmask"`` as bitmask + kept values
(format ``sparse-bitmask``, read back by lmshrink only: see ``sparse_bitmask``). Layers pruned and quantized are
``pack-quantized`` either way, their zeros being codes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.formats.atomic import atomic_directory
from lmshrink.quant.sparse import PruneResult
from lmshrink.quant.grids import GridSpec, QuantResult, dequantize
from lmshrink.quant.packing import pack_int32, unpack_int32

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_SPECS_KEY = "lmshrink.grid_specs"  # safetensors metadata: the GridSpec of every packed layer, as JSON
_MIN_STORED_GROUP = 16  # below this, repeating scales to reach a dividing group size costs too much
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class _StoredScheme:
    """One compressed-tensors config group: the layout shared by its layers."""

    bits: int
    group_size: int  # -1 per channel
    symmetric: bool
    actorder: str | None  # None or "static"


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _actorder(name: str, result: QuantResult) -> str | None:
    if result.g_idx is not None:
        raise LmshrinkError(
            f"layer {name}: act-order without static groups gives a permuted g_idx (actorder 'group'), which "
            "compressed-tensors 0.20.1 no longer loads",
            fix="quantize with act-order and static groups (GPTQ static_groups=True), or without act-order")
    info = result.info or {}
    return "static" if info.get("act_order") else None


def _stored_group_sizes(layers: dict[str, tuple[int, QuantResult]]) -> dict[str, int]:
    """The group size written for each layer: one per (bits, group size, symmetry, act-order) so layers that share a
    grid share a config group, reduced to the gcd with every input width when the group size does not divide one.
    """
    by_grid: dict[tuple, list[str]] = {}
    for name, (_, result) in layers.items():
        spec = result.spec
        key = (spec.bits, spec.group_size, spec.symmetric, _actorder(name, result))
        by_grid.setdefault(key, []).append(name)
    stored = {}
    for (_, group_size, _, _), names in by_grid.items():
        widths = [layers[n][0] for n in names]
        size = stored_group_size(group_size, widths)
        if size is None:
            in_features = next(w for w in widths if w % group_size)
            name = next(n for n in names if layers[n][0] == in_features)
            fallback = math.gcd(group_size, *widths)
            raise LmshrinkError(
                f"layer {name}: group size {group_size} does not divide its {in_features} input columns, and "
                f"compressed-tensors needs a divisor (the exact fallback, group size {fallback}, would store a scale "
                f"every {fallback} weights)", fix=group_size_fix(widths))
        stored.update({n: size for n in names})
    return stored


def stored_group_size(group_size: int, widths) -> int | None:
    """The group size written for layers of input ``widths`` that share one grid of ``group_size`` (-1 per
    channel): ``gcd(group_size, *widths)``, or None when that is too small to store (see ``_stored_group_sizes``).
    """
    if group_size == -1:
        return -1
    size = math.gcd(group_size, *widths)
    return None if size < min(_MIN_STORED_GROUP, group_size) else size


def group_size_fix(widths) -> str:
    """The fix for a group size that cannot be stored, considering every input width of the layers sharing the grid
    (a size that divides one width can still fail on another: 12 divides 36 but not 70)."""
    widths = sorted(set(widths))
    common = math.gcd(*widths)
    sizes = [d for d in range(_MIN_STORED_GROUP, min(common, 256) + 1) if common % d == 0][-8:]
    named = ", ".join(map(str, widths))
    if sizes:
        return (f"use a group size that divides every input width of these layers ({named}), e.g. "
                f"{', '.join(map(str, sizes))}, or -1 (per channel)")
    return (f"no group size of 16 or more divides every input width of these layers ({named}): use -1 (per "
            "channel), or leave the layers of the odd width(s) out (ignore), or quantize them in a stage of their "
            "own with other bits, symmetry or group size (layers share a stored group size only with the same grid)")


def _check_result(name: str, result: QuantResult, out_features: int, in_features: int) -> None:
    spec = result.spec
    n_groups = spec.num_groups(in_features)
    expected = {"codes": (out_features, in_features), "scale": (out_features, n_groups),
                "zero": (out_features, n_groups)}
    for field, shape in expected.items():
        actual = tuple(getattr(result, field).shape)
        if actual != shape:
            raise ValueError(f"layer {name}: QuantResult.{field} has shape {actual}, expected {shape}")
    if spec.symmetric and not bool((result.zero == (1 << (spec.bits - 1))).all()):
        raise ValueError(f"layer {name}: a symmetric grid must have zero == {1 << (spec.bits - 1)} everywhere")


def _stored_scale(name: str, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in the layer's dtype; refuses scales that the cast would round (the decoded model would differ)."""
    stored = scale.to(dtype)
    if not torch.equal(stored.float(), scale.float()):
        dtype_name = _DTYPE_NAMES.get(dtype, str(dtype))
        raise LmshrinkError(
            f"layer {name}: its float32 scales are not exactly representable in {dtype_name}, the model's dtype, "
            "so the saved checkpoint would decode to different weights than the compressed model",
            fix=f"quantize with scale_dtype '{dtype_name}' (recipe option `scale_dtype: {dtype_name}`, "
                f"GridSpec(scale_dtype='{dtype_name}')), or compress the model in float32")
    return stored.contiguous()


def _pack_layer(name: str, module: nn.Module, result: QuantResult,
                stored_group: int) -> tuple[_StoredScheme, dict[str, torch.Tensor]]:
    """The on-disk tensors of one quantized Linear (keys relative to the module) and its scheme."""
    out_features, in_features = int(module.weight.shape[0]), int(module.weight.shape[1])
    spec = result.spec
    scale, zero = result.scale, result.zero
    if stored_group != -1 and stored_group != spec.group_width(in_features):
        # repeat each group's parameters over the stored sub-groups it covers
        origin = torch.arange(in_features // stored_group) * stored_group // spec.group_width(in_features)
        scale, zero = scale[:, origin], zero[:, origin]
    tensors = {
        "weight_packed": pack_int32(result.codes, spec.bits, dim=1),
        "weight_scale": _stored_scale(name, scale, module.weight.dtype),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not spec.symmetric:
        tensors["weight_zero_point"] = pack_int32(zero, spec.bits, dim=0)
    scheme = _StoredScheme(spec.bits, stored_group, spec.symmetric, _actorder(name, result))
    return scheme, tensors


def _describe(scheme: _StoredScheme) -> str:
    group = "per channel" if scheme.group_size == -1 else f"group {scheme.group_size}"
    return f"{scheme.bits}-bit {group} {'symmetric' if scheme.symmetric else 'asymmetric'}"


def _quantization_config(groups: dict[_StoredScheme, list[str]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json, validated by compressed-tensors' own schema."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {}
    for index, (scheme, names) in enumerate(groups.items()):
        args = QuantizationArgs(
            num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
            strategy="channel" if scheme.group_size == -1 else "group",
            group_size=None if scheme.group_size == -1 else scheme.group_size,
            actorder=scheme.actorder, dynamic=False, observer="minmax")
        # one group: the usual ["Linear"] (every Linear not ignored); several: exact module names
        targets = ["Linear"] if len(groups) == 1 else sorted(names, key=_natural_key)
        config_groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format=FORMAT)
    config = QuantizationConfig(config_groups=config_groups, format=FORMAT, quantization_status="compressed",
                                ignore=ignore)
    data = {"version": compressed_tensors.__version__, "quant_method": QUANT_METHOD, "sparsity_config": {},
            "transform_config": {}, **config.model_dump(exclude={"quant_method"})}
    if any(not scheme.symmetric for scheme in groups):
        # transformers' default route cannot load packed zero points (it expects them unpacked); its
        # dequantize-at-load route can. Other readers ignore this key.
        data["dequantize"] = True
    return data


def _ct_version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def _sparsity_config(sparse: dict[str, tuple[str, float]], modules: dict[str, nn.Module],
                     state: dict[str, torch.Tensor], bitmask: list[str] | None = None) -> dict[str, Any]:
    """The compressed-tensors ``sparsity_config`` of the pruned layers.

    Stored densely (format ``dense``): targets every Linear, ignore the Linears that were not pruned. With ``bitmask``
    (the layers stored as bitmask + values, see ``sparse_bitmask``): format ``sparse-bitmask``, targets exactly those
    layers, ignore every other Linear (pruned layers stored ``pack-quantized`` keep their zeros as codes).
    sparsity_structure: the common N:M pattern of the pruned layers, else ``unstructured``; global_sparsity: pruned
    zeros over all the model's parameters (the compressed-tensors meaning: the sparsity of the entire model).
    """
    from compressed_tensors.config import BitmaskConfig, DenseSparsityConfig

    patterns = {pattern for pattern, _ in sparse.values()}
    structure = patterns.pop() if len(patterns) == 1 else "unstructured"
    total = sum(t.numel() for t in state.values())
    zeros = sum(z for _, z in sparse.values())
    targeted = set(bitmask) if bitmask else set(sparse)
    ignore = sorted((n for n, m in modules.items() if n and isinstance(m, nn.Linear) and n not in targeted),
                    key=_natural_key)
    options = dict(ignore=ignore, global_sparsity=zeros / total if total else 0.0, sparsity_structure=structure)
    if bitmask:
        config = BitmaskConfig(targets=sorted(bitmask, key=_natural_key), **options)
    else:
        config = DenseSparsityConfig(targets=["Linear"], **options)
    return config.model_dump(exclude={"registry_requires_subclass"})


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _protected_folders(model: nn.Module, input_dir) -> list[Path]:
    candidates = [input_dir, getattr(model, "name_or_path", None),
                  getattr(getattr(model, "config", None), "_name_or_path", None)]
    # "" (a model built from a config) would resolve to the working directory: skip it
    return [Path(c) for c in candidates if c and Path(c).is_dir()]


def _shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _resolved(shard: dict[str, torch.Tensor], source_tensors) -> dict[str, torch.Tensor]:
    """The shard with every meta placeholder read from ``source_tensors`` in the placeholder's dtype."""
    out = {}
    for key, tensor in shard.items():
        if tensor.device.type == "meta":
            stored = source_tensors(key)
            if tuple(stored.shape) != tuple(tensor.shape):
                raise ValueError(f"source tensor {key} has shape {tuple(stored.shape)}, the model {tuple(tensor.shape)}")
            tensor = stored.to(tensor.dtype).contiguous()
        out[key] = tensor
    return out


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   max_shard_size: int, source_tensors=None) -> None:
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_size)
    metadata = {"format": "pt", **metadata}
    if len(shards) == 1:
        save_file(_resolved(shards[0], source_tensors), str(folder / SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(_resolved(shard, source_tensors), str(folder / filename), metadata=metadata)  # one shard read at a time
        weight_map.update({key: filename for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _dense_state_dict(model: nn.Module, allow_meta: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped (the first name of a shared tensor is kept).

    ``allow_meta``: keep meta tensors as placeholders (read from the source at write time) instead of refusing.
    """
    seen: dict[tuple, str] = {}
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            if not allow_meta:
                raise ValueError(f"tensor {key} is on the meta device; load every weight before saving")
            identity = ("meta", id(tensor))  # meta tensors have no storage: ties share the Parameter object
        else:
            tensor = tensor.detach()
            identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                        tensor.dtype) if tensor.numel() else None
        if identity is not None and identity in seen:
            continue
        if identity is not None:
            seen[identity] = key
        state[key] = tensor
    return state


def _config_json(model: nn.Module, quantization_config: dict[str, Any] | None) -> str:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = model.dtype
    data = config.to_diff_dict()
    data.pop("quantization_config", None)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def save_quantized(model: nn.Module, tokenizer, results: dict[str, QuantResult], out_dir: str | os.PathLike, *,
                   ignore: list[str] | tuple[str, ...] = (), extra_files: dict[str, bytes | str] | None = None,
                   overwrite: bool = False, input_dir: str | os.PathLike | None = None,
                   max_shard_size: int = 4 * 1024**3, transformers_compatible: bool = True,
                   source_tensors=None, sparse_format: str = "dense") -> Path:
    """Write ``model`` with the layers in ``results`` packed, as an HF folder in compressed-tensors ``pack-quantized``.

    results: full module names (``model.named_modules()``) -> QuantResult; the packed tensors come from the results
    only (the module's current weight is not read for those layers). ignore: extra module names for the config's
    ``ignore`` list; ``lm_head`` and every Linear not in ``results`` are always added. extra_files: file name ->
    content written beside the weights (e.g. ``lmshrink.json``). Other tensors are saved as they are in the model
    (tied weights once). Weights go to ``model.safetensors``, or to shards of at most ``max_shard_size`` bytes with
    an index. The folder is built beside ``out_dir`` and renamed into place at the end, so an interrupted call
    leaves nothing. Returns the folder's path.

    Raises ``LmshrinkError`` when ``out_dir`` is a non-empty folder (unless ``overwrite``), when it overlaps the
    input model's folder (``input_dir``, or the folder the model was loaded from), when scales are not exact in the
    model's dtype, for act-order without static groups, and for group sizes that cannot be stored (see module doc).
    With ``transformers_compatible`` (the default) it also refuses what transformers cannot load but vLLM and
    ``load_quantized_results`` can: asymmetric grids mixed with other grids (several config groups).

    source_tensors: ``name -> tensor`` (e.g. ``SafetensorsWeights.get`` of the input folder) for a model whose
    tensors are partly on the meta device (streamed compression): those not replaced by packed layers are read from
    it, one shard at a time, and written in the model's dtype. Results may then carry an empty ``weight``.

    sparse_format: how pruned layers that are not quantized (``PruneResult``) are stored: ``"dense"`` (default: the
    weight with its zeros, which plain transformers loads) or ``"bitmask"`` (compressed-tensors ``sparse-bitmask``:
    bitmask + kept values, about half the bytes at 50% sparsity, read back exactly by lmshrink's ``load_model`` and
    ``load_sparse_results`` but not by plain transformers; see ``formats.sparse_bitmask``). Layers pruned and
    quantized are stored ``pack-quantized`` either way.
    """
    from lmshrink.formats.sparse_bitmask import LAYERS_KEY, check_sparse_format, encode

    check_sparse_format(sparse_format)
    modules = dict(model.named_modules())
    missing = [name for name in results if name not in modules]
    if missing:
        raise ValueError(f"results name modules the model does not have: {missing[:5]}")
    state = _dense_state_dict(model, allow_meta=source_tensors is not None)
    kept_names = set(state)

    replaced: dict[str, dict[str, torch.Tensor]] = {}
    dense_conv1d: list[str] = []
    linear_layers: dict[str, tuple[int, QuantResult]] = {}
    sparse: dict[str, tuple[str, float]] = {}  # pruned layers: name -> (pattern, zeros)
    bitmask: dict[str, dict[str, Any]] = {}  # pruned layers stored as bitmask + values: name -> record
    for name, result in results.items():
        module = modules[name]
        if f"{name}.weight" not in kept_names:
            raise LmshrinkError(f"layer {name} shares its weight with another tensor (tied), so it cannot be packed",
                                fix=f"leave {name} out of the quantized layers (ignore it in the recipe)")
        if isinstance(result, PruneResult):  # pruned, not quantized: dense weights with zeros, or bitmask + values
            weight, kept = result.dense(), ~result.mask
            conv1d = _is_conv1d(module)
            if conv1d:
                weight, kept = weight.t(), kept.t()
            weight = weight.to(module.weight.dtype).contiguous()
            if sparse_format == "bitmask":
                replaced[name] = encode(weight, kept)
                bitmask[name] = {"pattern": result.pattern, "target_sparsity": result.target_sparsity,
                                 "conv1d": conv1d}
            else:
                replaced[name] = {"weight": weight}
            sparse[name] = (result.pattern, float(result.mask.sum()))
            continue
        if (result.info or {}).get("pattern"):  # pruned and quantized (joint SparseGPT, or prune then GPTQ)
            sparse[name] = (result.info["pattern"], result.info["sparsity"] * result.codes.numel())
        if _is_conv1d(module):
            # Conv1D stores [in, out]; the loader only packs nn.Linear, so keep the exact dequantized weight
            weight = result.weight if result.weight.numel() else dequantize(result.codes, result.scale, result.zero,
                                                                           result.group_index())
            replaced[name] = {"weight": weight.t().to(module.weight.dtype).contiguous()}
            dense_conv1d.append(name)
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name} is a {type(module).__name__}, not a Linear")
        _check_result(name, result, module.out_features, module.in_features)
        linear_layers[name] = (module.in_features, result)

    groups: dict[_StoredScheme, list[str]] = {}
    specs: dict[str, dict[str, Any]] = {}
    for name, stored_group in _stored_group_sizes(linear_layers).items():
        result = linear_layers[name][1]
        scheme, tensors = _pack_layer(name, modules[name], result, stored_group)
        groups.setdefault(scheme, []).append(name)
        replaced[name] = tensors
        specs[name] = asdict(result.spec)
    if transformers_compatible and len(groups) > 1 and any(not scheme.symmetric for scheme in groups):
        raise LmshrinkError(
            "asymmetric grids mixed with other grids (" + "; ".join(_describe(s) for s in groups) + ") give several "
            "compressed-tensors config groups, and transformers loads asymmetric checkpoints with one group only",
            fix="use one grid (bits, group size, symmetry) for every layer, or symmetric grids, or save with "
                "transformers_compatible=False (vLLM and lmshrink still read it)")
    if dense_conv1d or not (groups or sparse):
        conv1d = (f"{len(dense_conv1d)} Conv1D layers (e.g. {dense_conv1d[0]}) are saved dequantized: "
                  "compressed-tensors packs only nn.Linear layers") if dense_conv1d else ""
        dense = "no layer is packed, so the folder is a plain dense checkpoint" if not groups else ""
        warnings.warn("; ".join(m for m in (conv1d, dense) if m), stacklevel=2)

    packed = set(specs)
    linears = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and n not in packed]
    ignore_list = sorted(set(ignore) | set(linears) | set(dense_conv1d)
                         | ({"lm_head"} if "lm_head" in modules and "lm_head" not in packed else set()),
                         key=_natural_key)

    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in replaced and leaf == "weight":
            for sub, value in replaced[module_name].items():
                tensors[f"{module_name}.{sub}"] = value
        else:
            tensors[key] = tensor.contiguous()
    # nothing packed (e.g. GPT-2, whose layers are all Conv1D): a plain dense checkpoint, no quantization_config
    quant_config = _quantization_config(groups, ignore_list) if groups else None
    if sparse:
        sparsity_config = _sparsity_config(sparse, modules, state, sorted(bitmask))
        quant_config = quant_config or {"version": _ct_version(), "quant_method": QUANT_METHOD}
        quant_config["sparsity_config"] = sparsity_config

    with atomic_directory(out_dir, overwrite=overwrite, protected=_protected_folders(model, input_dir)) as staging:
        metadata = {_SPECS_KEY: json.dumps(specs, sort_keys=True)}
        if bitmask:
            metadata[LAYERS_KEY] = json.dumps(bitmask, sort_keys=True)
        _write_weights(staging, tensors, metadata, max_shard_size, source_tensors)
        (staging / "config.json").write_text(_config_json(model, quant_config))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and model.can_generate():
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for filename, content in (extra_files or {}).items():
            if Path(filename).name != filename or filename in ("", ".", ".."):
                raise ValueError(f"extra file name {filename!r} must be a plain file name")
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            (staging / filename).write_bytes(data)
    return Path(out_dir).expanduser().resolve()


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_compressed_tensors_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a config.json whose ``quantization_config`` is compressed-tensors."""
    config = _read_config(Path(folder))
    quant = (config or {}).get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / filename for key, filename in weight_map.items()}
    single = folder / SAFE_WEIGHTS
    if not single.exists():
        raise LmshrinkError(f"{folder} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}",
                            fix="point at the folder save_quantized wrote (it holds config.json and the weights)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}


def _matches(name: str, patterns: list[str] | None) -> bool:
    for pattern in patterns or ():
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or "." not in pattern and pattern[:1].isupper():
            return True  # a class name such as "Linear": every packed tensor belongs to a Linear
    return False


def _scheme_for(name: str, quant: dict[str, Any]) -> dict[str, Any]:
    if _matches(name, [p for p in quant.get("ignore") or () if not p[:1].isupper()]):
        raise LmshrinkError(f"layer {name} has packed weights but is in the ignore list",
                            fix="the checkpoint is inconsistent; re-save it")
    for group in (quant.get("config_groups") or {}).values():
        if isinstance(group, dict) and _matches(name, group.get("targets")) and group.get("weights"):
            return group["weights"]
    raise LmshrinkError(f"layer {name} has packed weights but no config group targets it",
                        fix="the checkpoint's quantization_config is incomplete; re-save it")


def _spec_from_args(name: str, args: dict[str, Any], scale_dtype: torch.dtype) -> GridSpec:
    if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
        raise LmshrinkError(
            f"layer {name}: quantization type {args.get('type')!r} with strategy {args.get('strategy')!r} is not "
            "read by lmshrink", fix="lmshrink reads integer weights quantized per group or per channel")
    group_size = -1 if args["strategy"] == "channel" else int(args["group_size"])
    return GridSpec(bits=int(args["num_bits"]), group_size=group_size, symmetric=bool(args.get("symmetric", True)),
                    scale_dtype=_DTYPE_NAMES.get(scale_dtype, "float32"))


def _collapse(name: str, stored: torch.Tensor, stored_group: int, spec: GridSpec, in_features: int) -> torch.Tensor:
    """Undo the writer's repetition of group parameters (stored per ``stored_group`` columns) for ``spec``."""
    if stored_group == -1 or stored.shape[1] == spec.num_groups(in_features):
        return stored
    width = spec.group_width(in_features)
    starts = torch.arange(spec.num_groups(in_features)) * width // stored_group
    collapsed = stored[:, starts]
    origin = torch.arange(in_features // stored_group) * stored_group // width
    if not torch.equal(collapsed[:, origin], stored):
        raise LmshrinkError(f"layer {name}: its stored group parameters do not repeat as its recorded grid says",
                            fix="the checkpoint is inconsistent; re-save it")
    return collapsed


def load_quantized_results(folder: str | os.PathLike) -> dict[str, QuantResult]:
    """The packed layers of a compressed-tensors ``pack-quantized`` folder, as QuantResults (without transformers).

    Returns module name -> QuantResult with codes, scale (float32), zero, g_idx (from ``weight_g_idx`` when a
    checkpoint has one, else None), the GridSpec (the writer's own when the folder came from ``save_quantized``,
    else bits/group size/symmetry from the config) and ``weight`` decoded in float32. Layers stored dense (ignored
    ones, GPT-2 Conv1D) are not included.
    """
    return dict(iter_quantized_results(folder))


def iter_quantized_results(folder: str | os.PathLike, *, decode: bool = True):
    """``(name, QuantResult)`` of ``load_quantized_results`` one layer at a time (memory for one layer at a time).

    ``decode=False`` leaves ``weight`` empty (for readers that use the codes only).
    """
    folder = Path(folder)
    config = _read_config(folder)
    quant = (config or {}).get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise LmshrinkError(f"{folder} is not a compressed-tensors checkpoint (no such quantization_config in "
                            "config.json)", fix="point at a folder written by save_quantized")
    from safetensors import safe_open

    files = _weight_files(folder)
    names = sorted((key[: -len(".weight_packed")] for key in files if key.endswith(".weight_packed")),
                   key=_natural_key)
    recorded: dict[str, dict[str, Any]] = {}
    handles: dict[Path, Any] = {}
    try:
        for path in sorted(set(files.values())):
            handles[path] = safe_open(str(path), framework="pt")
            recorded.update(json.loads((handles[path].metadata() or {}).get(_SPECS_KEY, "{}")))

        def tensor(key: str) -> torch.Tensor:
            return handles[files[key]].get_tensor(key)

        for name in names:
            args = _scheme_for(name, quant)
            out_features, in_features = (int(v) for v in tensor(f"{name}.weight_shape").tolist())
            stored_scale = tensor(f"{name}.weight_scale")
            spec = _spec_from_args(name, args, stored_scale.dtype)
            stored_group = spec.group_size
            if name in recorded:
                spec = GridSpec(**recorded[name])
            codes = unpack_int32(tensor(f"{name}.weight_packed"), spec.bits, in_features, dim=1)
            if codes.shape[0] != out_features:
                raise LmshrinkError(f"layer {name}: weight_packed has {codes.shape[0]} rows, weight_shape says "
                                    f"{out_features}", fix="the checkpoint is inconsistent; re-save it")
            scale = _collapse(name, stored_scale.float(), stored_group, spec, in_features)
            if spec.symmetric:
                zero = torch.full_like(scale, 1 << (spec.bits - 1), dtype=torch.uint8)
            else:
                stored_zero = unpack_int32(tensor(f"{name}.weight_zero_point"), spec.bits, out_features, dim=0)
                zero = _collapse(name, stored_zero, stored_group, spec, in_features)
            g_idx = None
            if f"{name}.weight_g_idx" in files:
                g_idx = tensor(f"{name}.weight_g_idx").to(torch.int32)
            result = QuantResult(codes=codes, scale=scale.contiguous(), zero=zero.contiguous(), g_idx=g_idx,
                                 weight=torch.empty(0), spec=spec,
                                 info={"format": QUANT_METHOD, "actorder": args.get("actorder")})
            if decode:
                result.weight = dequantize(codes, result.scale, result.zero, result.group_index())
            yield name, result
    finally:
        handles.clear()


__all__ = ["FORMAT", "is_compressed_tensors_folder", "load_quantized_results", "save_quantized"]
