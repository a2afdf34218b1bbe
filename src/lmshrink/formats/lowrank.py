"""Low-rank layers in a saved folder: factorized layers (``LowRankResult``) and low-rank corrections
(``CorrectedResult``), stored as their factors; how lmshrink reads them back into two-matmul modules.

Layout of a layer ``name`` (``out`` x ``in``, rank ``r``), tensor names relative to the module:

* factorized: ``name.left.weight`` ``[out, r]`` and ``name.right.weight`` ``[r, in]`` instead of ``name.weight``
  (the bias, if any, stays ``name.bias``): the state-dict names of ``runtime.LowRankLinear``. Layers that share a
  basis (Basis Sharing) store ``right.weight`` once, under the first layer of their group; the others name that
  layer in the record (``right_from``);
* factorized with quantized factors (GPTQ on the factors): ``name.left.codes`` / ``name.right.codes`` (codes
  packed into int32 words along each row, ``core.packing``), ``.scale`` (the grid's scale dtype), ``.zero``
  (asymmetric grids, packed likewise) and ``.g_idx`` (only for a permuted group map); the record holds the grid and
  the factors' shapes. They run dequantized;
* corrected: the earlier stage's tensors as its kind is stored (``weight_packed``/``weight_scale``/... for a
  quantized layer, ``weight`` or bitmask tensors for a pruned one) plus ``name.correction.left.weight`` and
  ``name.correction.right.weight``.

The safetensors metadata key ``lmshrink.lowrank_layers`` (JSON) names every such layer with its form, rank,
basis and storage dtype. lmshrink (``load_model``, ``lmshrink evaluate``/``bench``) rebuilds the modules;
**plain transformers does not**: it leaves a factorized layer's ``weight`` randomly initialised (it only warns about
the missing and unexpected tensors) and ignores corrections. A stage with ``merge: true`` stores the dense product
instead, which any loader reads (and which saves no parameters).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec, dequantize, group_index
from lmshrink.core.packing import pack_int32, unpack_int32
from lmshrink.core.results import CorrectedResult, LowRankResult, QuantResult
from lmshrink.formats.hf_folder import is_conv1d, natural_key, weight_files
from lmshrink.runtime.lowrank import CorrectedLinear, LowRankLinear

LOWRANK_KEY = "lmshrink.lowrank_layers"
FACTORS, CORRECTION = "factors", "correction"


def _quantized_parts(prefix: str, quant: QuantResult) -> dict[str, torch.Tensor]:
    """The stored tensors of a quantized factor: codes and (asymmetric) zero points packed into int32 words along
    the rows (``core.packing``), scales in the grid's scale dtype, and the group map when it is not contiguous."""
    spec = quant.spec
    parts = {f"{prefix}.codes": pack_int32(quant.codes, spec.bits, dim=1),
             f"{prefix}.scale": quant.scale.to(getattr(torch, spec.scale_dtype)).contiguous()}
    if not spec.symmetric:
        parts[f"{prefix}.zero"] = pack_int32(quant.zero, spec.bits, dim=1)
    if quant.g_idx is not None:
        parts[f"{prefix}.g_idx"] = quant.g_idx.to(torch.int32).contiguous()
    return parts


def _grid_record(result) -> dict[str, Any]:
    """What a reader needs to decode quantized factors: the grid, the factors' shapes, which have a group map."""
    return {"grid": asdict(result.left_quant.spec), "left_shape": list(result.left.shape),
            "right_shape": list(result.right.shape), "left_g_idx": result.left_quant.g_idx is not None,
            "right_g_idx": result.right_quant.g_idx is not None}


def _dequantized(read, prefix: str, spec: GridSpec, shape: list[int]) -> torch.Tensor:
    """A quantized factor's float32 values from its stored tensors (``read(key)``)."""
    rows, cols = shape
    codes = unpack_int32(read(f"{prefix}.codes"), spec.bits, cols, dim=1)
    scale = read(f"{prefix}.scale").float()
    groups = scale.shape[1]
    zero = (unpack_int32(read(f"{prefix}.zero"), spec.bits, groups, dim=1) if not spec.symmetric
            else torch.full((rows, groups), 2 ** (spec.bits - 1), dtype=torch.uint8))
    g_idx = read(f"{prefix}.g_idx", optional=True)
    g_idx = group_index(cols, spec.group_width(cols)) if g_idx is None else g_idx
    return dequantize(codes, scale, zero, g_idx)


def _dtype(result, module: nn.Module) -> torch.dtype:
    stored = getattr(result, "storage_dtype", None)
    return getattr(torch, stored) if stored else module.weight.dtype


def factor_tensors(results: dict[str, Any], modules: dict[str, nn.Module]
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """For the low-rank results (factorized layers not merged, and corrections): ``name -> {relative tensor name:
    tensor}`` to store (a corrected layer's base excluded) and ``name -> record`` for the metadata. A basis shared by
    several layers is stored with the first of them (natural order) and must be the same tensor in all."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    records: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}
    for name in sorted(results, key=natural_key):
        result = results[name]
        if isinstance(result, LowRankResult) and not result.merge:
            dtype = _dtype(result, modules[name])
            record = {"form": FACTORS, "rank": result.rank, "dtype": str(dtype).removeprefix("torch.")}
            if result.quantized:  # GPTQ on the factors: codes and grids instead of float factors
                if result.basis is not None:
                    raise LmshrinkError(f"layer {name}: quantized factors of a shared basis cannot be stored",
                                        fix="quantize the factors of per-layer factorizations only")
                tensors[name] = {**_quantized_parts("left", result.left_quant),
                                 **_quantized_parts("right", result.right_quant)}
                records[name] = {**record, "dtype": "quantized", **_grid_record(result)}
                continue
            stored = {"left.weight": result.left.to(dtype).contiguous()}
            if result.basis is not None:
                record["basis"] = result.basis
                owner = owners.setdefault(result.basis, name)
                if owner != name:
                    if not torch.equal(results[owner].right, result.right):
                        raise LmshrinkError(f"layers {owner} and {name} name the shared basis {result.basis!r} but "
                                            "hold different right factors", fix="report this: a basis is one tensor")
                    record["right_from"] = owner
                else:
                    stored["right.weight"] = result.right.to(dtype).contiguous()
            else:
                stored["right.weight"] = result.right.to(dtype).contiguous()
            tensors[name], records[name] = stored, record
        elif isinstance(result, CorrectedResult) and result.quantized:
            tensors[name] = {**_quantized_parts("correction.left", result.left_quant),
                             **_quantized_parts("correction.right", result.right_quant)}
            records[name] = {"form": CORRECTION, "rank": result.rank, "dtype": "quantized",
                             "base": result.base.kind, **_grid_record(result)}
        elif isinstance(result, CorrectedResult):
            dtype = _dtype(result, modules[name])
            tensors[name] = {"correction.left.weight": result.left.to(dtype).contiguous(),
                             "correction.right.weight": result.right.to(dtype).contiguous()}
            records[name] = {"form": CORRECTION, "rank": result.rank, "dtype": str(dtype).removeprefix("torch."),
                             "base": result.base.kind}
    return tensors, records


def merged_weight(result: LowRankResult, module: nn.Module) -> torch.Tensor:
    """The dense product as the checkpoint stores the layer's ``weight`` (its dtype and orientation)."""
    weight = result.dense()
    if is_conv1d(module):
        weight = weight.t()
    return weight.to(module.weight.dtype).contiguous()


def storage_summary(model: nn.Module, results: dict[str, Any], block_linears: dict[str, tuple[int, int]]
                    ) -> dict[str, Any] | None:
    """What the low-rank layers cost as saved, or None when there are none: numbers (parameters) and bytes of their
    stored factors against their dense weights (a shared basis counted once), the block linears' parameters as
    saved against dense (``block_linears``: name -> (out, in), every block linear), and who can load the folder."""
    modules = dict(model.named_modules())
    lowrank = {n: r for n, r in results.items() if isinstance(r, (LowRankResult, CorrectedResult))}
    if not lowrank:
        return None
    tensors, records = factor_tensors(lowrank, modules)
    stored_params = sum(t.numel() for parts in tensors.values() for t in parts.values())
    stored_bytes = sum(t.numel() * t.element_size() for parts in tensors.values() for t in parts.values())
    factorized = [n for n, r in lowrank.items() if isinstance(r, LowRankResult)]
    merged = [n for n in factorized if lowrank[n].merge]
    corrected = [n for n, r in lowrank.items() if isinstance(r, CorrectedResult)]
    dense_params = sum(block_linears[n][0] * block_linears[n][1] for n in factorized if n not in merged)
    total_dense = sum(o * i for o, i in block_linears.values())
    total_stored = total_dense - dense_params + stored_params  # corrections add their factors to their base
    summary: dict[str, Any] = {
        "factorized_layers": len(factorized) - len(merged), "merged_layers": len(merged),
        "corrected_layers": len(corrected), "stored_factor_params": stored_params,
        "stored_factor_bytes": stored_bytes,
        "block_linear_params": {"dense": total_dense, "stored": total_stored,
                                "removed_fraction": 1.0 - total_stored / total_dense if total_dense else 0.0},
        "ranks": {n: r["rank"] for n, r in records.items()},
    }
    if merged:
        summary["merged"] = ("the factors of these layers were multiplied back into dense weights: they save no "
                             "parameters (any loader reads them)")
    if records:
        summary["loading"] = ("the factors are stored as separate tensors: lmshrink.load_model (and lmshrink evaluate "
                              "/ bench) rebuild the two-matmul modules; plain transformers cannot load them (it leaves "
                              "factorized layers randomly initialised and ignores corrections); save with merge: true "
                              "for a dense folder")
    return summary


def lowrank_layers(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The record of the low-rank layers a folder stores (``{}`` when none)."""
    from safetensors import SafetensorError, safe_open

    # a missing, truncated or unreadable weights file holds no record here: the model loader reports it
    try:
        files = weight_files(Path(folder))
        layers: dict[str, dict[str, Any]] = {}
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt") as handle:
                layers.update(json.loads((handle.metadata() or {}).get(LOWRANK_KEY, "{}")))
    except (LmshrinkError, OSError, SafetensorError):
        return {}
    return layers


def is_lowrank_folder(folder: str | os.PathLike) -> bool:
    return bool(lowrank_layers(folder))


def stored_names(layers: dict[str, dict[str, Any]]) -> set[str]:
    """The tensor names the low-rank layers of a folder hold (none of which a transformers model has)."""
    names = set()
    for name, spec in layers.items():
        if "grid" in spec:
            prefix = f"{name}.correction" if spec["form"] == CORRECTION else name
            for side in ("left", "right"):
                names.update({f"{prefix}.{side}.codes", f"{prefix}.{side}.scale"})
                if not spec["grid"]["symmetric"]:
                    names.add(f"{prefix}.{side}.zero")
                if spec[f"{side}_g_idx"]:
                    names.add(f"{prefix}.{side}.g_idx")
        elif spec["form"] == FACTORS:
            names.add(f"{name}.left.weight")
            if "right_from" not in spec:
                names.add(f"{name}.right.weight")
        else:
            names.update({f"{name}.correction.left.weight", f"{name}.correction.right.weight"})
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def install_lowrank(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype) -> list[str]:
    """Replace each low-rank layer a folder stores by its module (``LowRankLinear``, or ``CorrectedLinear`` around
    the layer already loaded), factors read from the folder in ``dtype``; layers sharing a basis share its module.
    Returns the layers replaced."""
    from safetensors import safe_open

    folder = Path(folder)
    layers = lowrank_layers(folder)
    files = weight_files(folder)
    modules = dict(model.named_modules())

    def stored(key: str, optional: bool = False) -> torch.Tensor | None:
        if key not in files:
            if optional:
                return None
            raise LmshrinkError(f"{folder} lacks the tensor {key} of a low-rank layer",
                                fix="the checkpoint is incomplete; save it again")
        with safe_open(str(files[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def read(key: str) -> torch.Tensor:
        return stored(key).to(dtype)

    rights: dict[str, nn.Linear] = {}
    done = []
    for name in sorted(layers, key=natural_key):  # a basis' owner comes before the layers that use it
        spec = layers[name]
        old = modules.get(name)
        if old is None:
            raise LmshrinkError(f"{folder} stores a low-rank layer {name}, which the model does not have",
                                fix="check that config.json matches the weights")
        if spec["form"] == FACTORS:
            owner = spec.get("right_from", name)
            if "grid" in spec:  # quantized factors: they run dequantized
                grid = GridSpec(**spec["grid"])
                right_weight = _dequantized(lambda k, optional=False: stored(f"{name}.{k}", optional),
                                            "right", grid, spec["right_shape"]).to(dtype)
                right = nn.Linear(right_weight.shape[1], right_weight.shape[0], bias=False, device="meta")
                right.weight = nn.Parameter(right_weight, requires_grad=False)
                rights[owner] = right
            if owner not in rights:
                right_weight = read(f"{owner}.right.weight")
                right = nn.Linear(right_weight.shape[1], right_weight.shape[0], bias=False, device="meta")
                right.weight = nn.Parameter(right_weight, requires_grad=False)
                rights[owner] = right
            right = rights[owner]
            left_weight = (_dequantized(lambda k, optional=False: stored(f"{name}.{k}", optional), "left",
                                        GridSpec(**spec["grid"]), spec["left_shape"]).to(dtype)
                           if "grid" in spec else read(f"{name}.left.weight"))
            bias = getattr(old, "bias", None)
            module = LowRankLinear(right.in_features, left_weight.shape[0], right.out_features, right=right,
                                   device="meta")
            module.left.weight = nn.Parameter(left_weight, requires_grad=False)
            if bias is not None:
                if bias.device.type == "meta":
                    raise LmshrinkError(f"layer {name}: its bias was not loaded", fix="the checkpoint is incomplete")
                module.bias = bias
        elif "grid" in spec:  # a correction with quantized factors: they run dequantized
            grid = GridSpec(**spec["grid"])
            left_weight, right_weight = (
                _dequantized(lambda k, optional=False: stored(f"{name}.correction.{k}", optional), side, grid,
                             spec[f"{side}_shape"]).to(dtype) for side in ("left", "right"))
        else:
            left_weight, right_weight = read(f"{name}.correction.left.weight"), read(f"{name}.correction.right.weight")
        if spec["form"] == CORRECTION:
            correction = LowRankLinear(right_weight.shape[1], left_weight.shape[0], right_weight.shape[0],
                                       device="meta")
            correction.right.weight = nn.Parameter(right_weight, requires_grad=False)
            correction.left.weight = nn.Parameter(left_weight, requires_grad=False)
            module = CorrectedLinear(old, correction)
        _set_submodule(model, name, module)
        done.append(name)
    return done


def load_lowrank_model(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, **kwargs):
    """``AutoModelForCausalLM`` for a folder with low-rank layers, rebuilt as two-matmul modules (and its bitmask-
    stored pruned layers decoded). transformers loads everything else; its report of the factorized layers'
    missing ``weight`` and of the factor tensors is expected, any other missing or unexpected tensor is an error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lmshrink.formats.sparse_bitmask import KEYS, fill_bitmask_weights, is_bitmask_folder

    folder = Path(folder)
    layers = lowrank_layers(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected missing/unexpected keys report would alarm users
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                           trust_remote_code=trust_remote_code,
                                                           output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    filled = set(fill_bitmask_weights(model, folder)) if is_bitmask_folder(folder) else set()
    factorized = {name for name, spec in layers.items() if spec["form"] == FACTORS}
    expected_missing = {f"{name}.weight" for name in filled | factorized}
    expected_unexpected = stored_names(layers) | {f"{name}.{key}" for name in filled for key in KEYS}
    missing = [k for k in info.get("missing_keys", ()) if k not in expected_missing]
    unexpected = [k for k in info.get("unexpected_keys", ()) if k not in expected_unexpected]
    if missing or unexpected:
        raise LmshrinkError(f"{folder}: transformers found tensors missing ({missing[:3]}) or unexpected "
                            f"({unexpected[:3]}) beyond the low-rank layers", fix="check that config.json matches "
                                                                                   "the weights")
    install_lowrank(model, folder, model.get_input_embeddings().weight.dtype)
    return model.eval()
