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

Layers with input columns kept in 16 bits (OWQ, ``OutlierQuantResult``) add two tensors to the layout above:

* ``name.weight_outlier_index`` int32 ``[k]``: the kept input columns, ascending;
* ``name.weight_outlier_values`` float16 (bfloat16 for bfloat16 models) ``[out, k]``: their weights.

Their codes on the grid are the zero points (they decode to 0), so the layer is the packed grid plus
``x[:, index] @ values^T``. compressed-tensors has no such layout: the config group of these layers gets the format
``lmshrink-outlier-columns``, which compressed-tensors' schema (and so transformers) refuses to load, naming it,
rather than loading the grid without the columns. lmshrink's ``load_model`` (dense or packed runtime) reads it.

Pruned layers (``PruneResult``) are written densely with their zeros and a compressed-tensors ``sparsity_config`` of
format ``dense`` (plain transformers loads them), or with ``sparse_format="bitmask"`` as bitmask + kept values
(format ``sparse-bitmask``, read back by lmshrink only: see ``sparse_bitmask``). Layers pruned and quantized are
``pack-quantized`` either way, their zeros being codes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.core.actquant import ActSpec
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec, dequantize, from_signed, to_signed
from lmshrink.core.packing import pack_int32, unpack_int32
from lmshrink.core.results import OutlierQuantResult, QuantResult
from lmshrink.formats.hf_folder import natural_key, read_config, weight_files
from lmshrink.formats.layout import group_size_fix, stored_group_size

FORMAT = "pack-quantized"
OUTLIER_FORMAT = "lmshrink-outlier-columns"  # a config group whose layers keep 16-bit input columns beside the grid
OUTLIER_KEYS = ("weight_outlier_index", "weight_outlier_values")
# what an export that cannot hold outlier columns suggests instead ({target}: the export's name)
ALTERNATIVE = ("compress without outlier columns for {target} (e.g. the w4g128 or w3g128 presets, or gptq with "
               "group_size -1), or run this folder with lmshrink (load_model, also runtime='packed')")
QUANT_METHOD = "compressed-tensors"
SPECS_KEY = "lmshrink.grid_specs"  # safetensors metadata: the GridSpec of every packed layer, as JSON
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


INT_FORMAT = "int-quantized"  # int8 weights as they are (W8A8: what vLLM's int8 activation schemes load)


@dataclass(frozen=True)
class StoredScheme:
    """One compressed-tensors config group: the layout shared by its layers, and the activations they quantize
    (where the format can state them)."""

    bits: int
    group_size: int  # -1 per channel
    symmetric: bool
    actorder: str | None  # None or "static"
    format: str = FORMAT
    activations: ActSpec | None = None
    outliers: bool = False  # its layers keep 16-bit input columns (format OUTLIER_FORMAT)


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------




def _actorder(name: str, result: QuantResult) -> str | None:
    if result.g_idx is not None:
        raise LmshrinkError(
            f"layer {name}: act-order without static groups gives a permuted g_idx (actorder 'group'), which "
            "compressed-tensors 0.20.1 no longer loads",
            fix="quantize with act-order and static groups (GPTQ static_groups=True), or without act-order")
    info = result.info or {}
    return "static" if info.get("act_order") else None


def stored_group_sizes(layers: dict[str, tuple[int, QuantResult]]) -> dict[str, int]:
    """The group size written for each layer: one per (bits, group size, symmetry, act-order) so layers that share a
    grid share a config group, reduced to the gcd with every input width when the group size does not divide one.
    """
    by_grid: dict[tuple, list[str]] = {}
    for name, (_, result) in layers.items():
        spec = result.spec
        key = (spec.bits, spec.group_size, spec.symmetric, _actorder(name, result), has_outliers(result))
        by_grid.setdefault(key, []).append(name)
    stored = {}
    for (_, group_size, _, _, _), names in by_grid.items():
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






def check_result(name: str, result: QuantResult, out_features: int, in_features: int) -> None:
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


def stated_activations(module: nn.Module) -> ActSpec | None:
    """The layer's activation quantizer where compressed-tensors can state it (integer, per token or group dynamic,
    per tensor), and the layer has no online input transform (which the format cannot state); else None."""
    spec = getattr(module, "input_spec", None)
    if spec is None or getattr(module, "input_transform", None) is not None:
        return None
    if (spec.granularity == "group" and not spec.dynamic) or spec.granularity == "cluster":
        return None
    return spec


def pack_layer(name: str, module: nn.Module, result: QuantResult,
                stored_group: int) -> tuple[StoredScheme, dict[str, torch.Tensor]]:
    """The on-disk tensors of one quantized Linear (keys relative to the module) and its scheme: ``int-quantized``
    (int8 weights as they are) for 8-bit symmetric per-channel weights with 8-bit activations, else
    ``pack-quantized``."""
    out_features, in_features = int(module.weight.shape[0]), int(module.weight.shape[1])
    spec = result.spec
    activations = stated_activations(module)
    if (activations is not None and activations.bits == 8 and spec.bits in (7, 8) and spec.symmetric
            and stored_group == -1 and result.g_idx is None):
        # int8 values as they are (a 7-bit grid's codes are int8 values of half the range, the scale unchanged)
        tensors = {"weight": to_signed(result.codes, spec.bits).contiguous(),
                   "weight_scale": _stored_scale(name, result.scale, module.weight.dtype)}
        return StoredScheme(8, -1, True, _actorder(name, result), INT_FORMAT, activations), tensors
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
    outliers = has_outliers(result)
    if outliers:
        tensors["weight_outlier_index"] = result.columns.to(torch.int32).contiguous()
        tensors["weight_outlier_values"] = result.values.contiguous()
    scheme = StoredScheme(spec.bits, stored_group, spec.symmetric, _actorder(name, result), FORMAT, activations,
                          outliers)
    return scheme, tensors


def has_outliers(result: QuantResult) -> bool:
    """Whether a result keeps input columns in 16 bits (an ``OutlierQuantResult`` with at least one)."""
    return isinstance(result, OutlierQuantResult) and result.columns is not None and result.columns.numel() > 0


def describe_scheme(scheme: StoredScheme) -> str:
    group = "per channel" if scheme.group_size == -1 else f"group {scheme.group_size}"
    outliers = " with 16-bit outlier columns" if scheme.outliers else ""
    acts = f", activations {scheme.activations.describe()}" if scheme.activations is not None else ""
    return f"{scheme.bits}-bit {group} {'symmetric' if scheme.symmetric else 'asymmetric'}{outliers}{acts}"


def _activation_args(spec: ActSpec):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=spec.granularity,
                            group_size=spec.group_size if spec.granularity == "group" else None,
                            dynamic=spec.dynamic, observer=None if spec.dynamic else "minmax")


def quantization_config(groups: dict[StoredScheme, list[str]], ignore: list[str]) -> dict[str, Any]:
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
        targets = ["Linear"] if len(groups) == 1 else sorted(names, key=natural_key)
        activations = None if scheme.activations is None else _activation_args(scheme.activations)
        config_groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args,
                                                             input_activations=activations, format=scheme.format)
    formats = {scheme.format for scheme in groups}
    config = QuantizationConfig(config_groups=config_groups,
                                format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=ignore)
    data = {"version": compressed_tensors.__version__, "quant_method": QUANT_METHOD, "sparsity_config": {},
            "transform_config": {}, **config.model_dump(exclude={"quant_method"})}
    for index, scheme in enumerate(groups):
        if scheme.outliers:  # a format compressed-tensors does not know: transformers refuses it by name
            data["config_groups"][f"group_{index}"]["format"] = OUTLIER_FORMAT
    if any(not scheme.symmetric for scheme in groups):
        # transformers' default route cannot load packed zero points (it expects them unpacked); its
        # dequantize-at-load route can. Other readers ignore this key.
        data["dequantize"] = True
    return data


def ct_version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def build_sparsity_config(sparse: dict[str, tuple[str, float]], modules: dict[str, nn.Module],
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
                    key=natural_key)
    options = dict(ignore=ignore, global_sparsity=zeros / total if total else 0.0, sparsity_structure=structure)
    if bitmask:
        config = BitmaskConfig(targets=sorted(bitmask, key=natural_key), **options)
    else:
        config = DenseSparsityConfig(targets=["Linear"], **options)
    return config.model_dump(exclude={"registry_requires_subclass"})


















# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------




def is_compressed_tensors_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a config.json whose ``quantization_config`` is compressed-tensors."""
    config = read_config(Path(folder))
    quant = (config or {}).get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


PACKED_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", *OUTLIER_KEYS)
_ELEMENT_BYTES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


def packed_storage(folder: str | os.PathLike) -> dict[str, Any]:
    """What the packed layers of a compressed folder take on disk: the bytes of every tensor that stores them
    (codes, scales, zero points, group index, 16-bit outlier columns with their indices), the weights they stand
    for (``out * in`` from ``weight_shape``) and the bits per weight; read from the safetensors headers."""
    from safetensors import safe_open

    files = weight_files(Path(folder))
    stored = weights = layers = 0
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for key in keys:
                leaf = key.rsplit(".", 1)[-1]
                if leaf == "weight_shape":
                    out_features, in_features = (int(v) for v in handle.get_tensor(key).tolist())
                    weights += out_features * in_features
                    layers += 1
                elif leaf in PACKED_KEYS:
                    tensor = handle.get_slice(key)
                    stored += math.prod(tensor.get_shape()) * _ELEMENT_BYTES[tensor.get_dtype()]
    return {"layers": layers, "weights": weights, "bytes": stored,
            "bits_per_weight": 8 * stored / weights if weights else None}


def is_outlier_folder(folder: str | os.PathLike) -> bool:
    """True when a config group of ``folder``'s compressed-tensors config keeps 16-bit outlier columns (OWQ)."""
    if not is_compressed_tensors_folder(folder):
        return False
    groups = (read_config(Path(folder))["quantization_config"].get("config_groups") or {}).values()
    return any(isinstance(group, dict) and group.get("format") == OUTLIER_FORMAT for group in groups)


def refuse_outlier_columns(folder: str | os.PathLike, target: str, alternative: str) -> None:
    """Raise a LmshrinkError naming a layer of ``folder`` that keeps 16-bit input columns, which ``target`` cannot
    hold, and ``alternative``; nothing when no layer does."""
    if not is_outlier_folder(folder):
        return
    files = weight_files(Path(folder))
    names = sorted((k[: -len(".weight_outlier_values")] for k in files if k.endswith(".weight_outlier_values")),
                   key=natural_key)
    first = names[0] if names else "a layer"
    raise LmshrinkError(f"{folder}: {len(names)} layers (e.g. {first}) keep input columns in 16 bits beside their "
                        f"grid (OWQ), which {target} cannot hold", fix=alternative)




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


def _outlier_result(name: str, fields: dict[str, Any], index: torch.Tensor,
                    values: torch.Tensor) -> OutlierQuantResult:
    """The ``OutlierQuantResult`` of a layer's grid fields and its stored outlier columns, checked."""
    rows, columns = fields["codes"].shape
    index = index.to(torch.int64)
    if (index.dim() != 1 or tuple(values.shape) != (rows, index.numel()) or index.numel() >= columns
            or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= columns))
            or not bool((index[1:] > index[:-1]).all())):
        raise LmshrinkError(f"layer {name}: weight_outlier_index {tuple(index.shape)} and weight_outlier_values "
                            f"{tuple(values.shape)} do not fit its [{rows}, {columns}] weight",
                            fix="the checkpoint is inconsistent; re-save it")
    return OutlierQuantResult(**fields, columns=index, values=values)


def _int_result(name: str, weight: torch.Tensor, scale: torch.Tensor, args: dict[str, Any], recorded, decode: bool
                ) -> QuantResult:
    """An int-quantized layer (int8 weight per channel, symmetric) as a QuantResult."""
    if args.get("num_bits") != 8 or not args.get("symmetric", True) or args.get("strategy") != "channel":
        raise LmshrinkError(f"layer {name}: int-quantized weights of {args.get('num_bits')} bits, strategy "
                            f"{args.get('strategy')!r}, symmetric={args.get('symmetric')} are not read by lmshrink",
                            fix="lmshrink reads int8 weights per channel, symmetric")
    spec = GridSpec(**recorded) if recorded else GridSpec(bits=8, group_size=-1, symmetric=True,
                                                          scale_dtype=_DTYPE_NAMES.get(scale.dtype, "float32"))
    half = 1 << (spec.bits - 1)
    wide = weight.to(torch.int16)
    if not spec.symmetric or spec.bits not in (7, 8) or (wide.numel() and (int(wide.min()) < -half
                                                                           or int(wide.max()) >= half)):
        raise LmshrinkError(f"layer {name}: its int8 weight does not fit the grid recorded for it ({spec.bits}-bit)",
                            fix="the checkpoint is inconsistent; re-save it")
    codes = from_signed(weight, spec.bits)
    scale = scale.float().reshape(-1, 1).contiguous()
    result = QuantResult(codes=codes, scale=scale, zero=torch.full_like(scale, half, dtype=torch.uint8), g_idx=None,
                         weight=torch.empty(0), spec=spec, info={"format": QUANT_METHOD, "actorder": args.get("actorder")})
    if decode:
        result.weight = dequantize(codes, result.scale, result.zero)
    return result


def quantized_weight_keys(folder: str | os.PathLike) -> set[str]:
    """``NAME.weight`` of every layer stored quantized (packed codes, or an int8 weight): the keys a reader must not
    load as a float weight."""
    from safetensors import safe_open

    files = weight_files(Path(folder))
    keys = {key[: -len("_packed")] for key in files if key.endswith(".weight_packed")}
    for key in files:
        if key.endswith(".weight_scale") and key[: -len("_scale")] in files and key[: -len("_scale")] not in keys:
            weight = key[: -len("_scale")]
            with safe_open(str(files[weight]), framework="pt") as handle:
                if handle.get_slice(weight).get_dtype() in ("I8", "int8"):
                    keys.add(weight)
    return keys


def load_quantized_results(folder: str | os.PathLike) -> dict[str, QuantResult]:
    """The packed layers of a compressed-tensors ``pack-quantized`` folder, as QuantResults (without transformers).

    Returns module name -> QuantResult with codes, scale (float32), zero, g_idx (from ``weight_g_idx`` when a
    checkpoint has one, else None), the GridSpec (the writer's own when the folder came from ``save_quantized``,
    else bits/group size/symmetry from the config) and ``weight`` decoded in float32. Layers with 16-bit outlier
    columns come as ``OutlierQuantResult`` (their ``weight`` includes the columns). Layers stored dense (ignored
    ones, GPT-2 Conv1D) are not included.
    """
    return dict(iter_quantized_results(folder))


def iter_quantized_results(folder: str | os.PathLike, *, decode: bool = True):
    """``(name, QuantResult)`` of ``load_quantized_results`` one layer at a time (memory for one layer at a time).

    ``decode=False`` leaves ``weight`` empty (for readers that use the codes only).
    """
    folder = Path(folder)
    config = read_config(folder)
    quant = (config or {}).get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise LmshrinkError(f"{folder} is not a compressed-tensors checkpoint (no such quantization_config in "
                            "config.json)", fix="point at a folder written by save_quantized")
    from safetensors import safe_open

    files = weight_files(folder)
    names = sorted((key[: -len(".weight_packed")] for key in files if key.endswith(".weight_packed")),
                   key=natural_key)
    # int-quantized layers: an int8 weight beside its scale (no packed codes)
    unpacked = {key[: -len(".weight_scale")] for key in files if key.endswith(".weight_scale")} - set(names)
    recorded: dict[str, dict[str, Any]] = {}
    handles: dict[Path, Any] = {}
    try:
        for path in sorted(set(files.values())):
            handles[path] = safe_open(str(path), framework="pt")
            recorded.update(json.loads((handles[path].metadata() or {}).get(SPECS_KEY, "{}")))

        def tensor(key: str) -> torch.Tensor:
            return handles[files[key]].get_tensor(key)

        int_layers = [n for n in unpacked if f"{n}.weight" in files
                      and handles[files[f"{n}.weight"]].get_slice(f"{n}.weight").get_dtype() in ("I8", "int8")]
        names = sorted(names + int_layers, key=natural_key)

        for name in names:
            args = _scheme_for(name, quant)
            if name in int_layers:
                yield name, _int_result(name, tensor(f"{name}.weight"), tensor(f"{name}.weight_scale"), args,
                                        recorded.get(name), decode)
                continue
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
            fields = dict(codes=codes, scale=scale.contiguous(), zero=zero.contiguous(), g_idx=g_idx,
                          weight=torch.empty(0), spec=spec,
                          info={"format": QUANT_METHOD, "actorder": args.get("actorder")})
            if f"{name}.weight_outlier_values" in files:
                result = _outlier_result(name, fields, tensor(f"{name}.weight_outlier_index"),
                                         tensor(f"{name}.weight_outlier_values"))
            else:
                result = QuantResult(**fields)
            if decode:
                result.weight = result.dense()
            yield name, result
    finally:
        handles.clear()


