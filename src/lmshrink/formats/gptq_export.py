"""GPTQ v1 export (the AutoGPTQ / gptqmodel / vLLM ``gptq`` checkpoint format) and its reader.

One quantized Linear ``name`` (``out`` x ``in``, ``b`` bits, ``G`` groups):

* ``name.qweight`` int32 ``[in * b / 32, out]``: codes packed along the input (``pack_gptq_qweight``);
* ``name.qzeros`` int32 ``[G, out * b / 32]``: ``zero - 1`` packed along the output (the v1 convention;
  readers add 1 back);
* ``name.scales`` float16 ``[G, out]``; ``name.g_idx`` int32 ``[in]``: the group of each input column;
* ``name.bias`` float16 when the layer has one.

The weight is ``(code - zero) * scale``, as in lmshrink. All layers share one ``bits`` / ``group_size`` (GPTQ
checkpoints have one ``quantize_config.json``). A zero point of 0 cannot be stored in v1 (it would read back as
``2**b``) and is refused. Tensors that are not quantized are written in float16, the dtype GPTQ kernels run in, and
scales are rounded to float16 (exact for grids fitted with ``scale_dtype='float16'``; the export reports the change
otherwise). Pruned layers stored as bitmask + values (``--sparse-format bitmask``) are decoded and written as their
dense ``weight`` (GPTQ loaders read no bitmask storage).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lmshrink.core.atomic import atomic_directory
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec, dequantize
from lmshrink.core.packing import pack_gptq_qweight, pack_gptq_qzeros, unpack_gptq_qweight, unpack_gptq_qzeros
from lmshrink.core.results import QuantResult
from lmshrink.formats.compressed_tensors import (
    ALTERNATIVE,
    is_compressed_tensors_folder,
    load_quantized_results,
    refuse_outlier_columns,
)
from lmshrink.formats.sparse_bitmask import decoded_bitmask_weights, dense_tensor_keys
from lmshrink.models.loader import SafetensorsWeights

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
           "merges.txt", "generation_config.json", "chat_template.jinja", "lmshrink.json")
_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _common_spec(results: dict[str, QuantResult]) -> tuple[int, int, bool, bool]:
    """(bits, group_size, sym, desc_act) shared by every layer, or an error naming the first that differs."""
    first_name, first = next(iter(results.items()))
    key = (first.spec.bits, first.spec.group_size, first.spec.symmetric)
    for name, result in results.items():
        other = (result.spec.bits, result.spec.group_size, result.spec.symmetric)
        if other != key:
            raise LmshrinkError(f"layer {name} has grid {other} (bits, group, symmetric), {first_name} has {key}; a "
                                "GPTQ checkpoint has one grid for all layers",
                                fix="compress with one quantization stage for every layer to export GPTQ")
        if result.spec.bits not in (2, 3, 4, 8):
            raise LmshrinkError(f"layer {name}: {result.spec.bits}-bit grids have no GPTQ kernels",
                                fix="use 2, 3, 4 or 8 bits")
    desc_act = any(result.g_idx is not None for result in results.values())
    return first.spec.bits, first.spec.group_size, first.spec.symmetric, desc_act


def export_gptq(folder: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the compressed folder ``folder`` as a GPTQ v1 checkpoint folder; returns a JSON-ready report."""
    from safetensors.torch import save_file


    folder, output = Path(folder), Path(output)
    if not is_compressed_tensors_folder(folder):
        raise LmshrinkError(f"{folder} is not a compressed checkpoint folder",
                            fix="export a folder written by lmshrink compress")
    refuse_outlier_columns(folder, "a GPTQ v1 checkpoint", ALTERNATIVE.format(target="GPTQ"))
    results = load_quantized_results(folder)
    if not results:
        raise LmshrinkError(f"{folder} has no quantized layer to export", fix="compress it with a quantizing recipe")
    bits, group_size, symmetric, desc_act = _common_spec(results)
    weights = SafetensorsWeights(folder)
    tensors: dict[str, torch.Tensor] = {}
    max_scale_change = 0.0
    for name, result in results.items():
        if not symmetric and int(result.zero.min()) == 0:
            raise LmshrinkError(f"layer {name} has a zero point of 0, which GPTQ v1 (zero - 1 stored) cannot hold",
                                fix="export a symmetric grid, or use the compressed-tensors folder itself (vLLM "
                                    "loads it)")
        scales = result.scale.to(torch.float16)
        change = ((scales.float() - result.scale).abs() / result.scale.abs().clamp(min=1e-30)).max().item()
        max_scale_change = max(max_scale_change, change)
        tensors[f"{name}.qweight"] = pack_gptq_qweight(result.codes, bits)
        tensors[f"{name}.qzeros"] = pack_gptq_qzeros(result.zero, bits)
        tensors[f"{name}.scales"] = scales.t().contiguous()
        tensors[f"{name}.g_idx"] = result.group_index().to(torch.int32).contiguous()
    quantized = {f"{name}.weight" for name in results}
    decoded = decoded_bitmask_weights(folder)  # pruned layers stored as bitmask + values: written as dense weights
    for key in dense_tensor_keys(weights.keys(), decoded):
        if key in quantized or key.endswith(_PACKED_SUFFIXES):
            continue
        tensor = decoded[key] if key in decoded else weights.get(key)
        tensors[key] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    quantize_config = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": symmetric,
                       "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq",
                       "quant_method": "gptq", "damp_percent": 0.01, "model_file_base_name": "model"}
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = dict(quantize_config)
    config["torch_dtype"] = "float16"
    config["dtype"] = "float16"
    with atomic_directory(output, overwrite=overwrite, protected=[folder]) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
        for name in _COPIED:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
    return {"output": str(output), "layers": len(results), "bits": bits, "group_size": group_size,
            "sym": symmetric, "desc_act": desc_act, "max_relative_scale_change_fp16": max_scale_change}


def load_gptq_results(folder: str | os.PathLike) -> dict[str, QuantResult]:
    """The quantized layers of a GPTQ v1 folder as QuantResults (float32 scales read from the float16 ones)."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path = folder / "quantize_config.json"
    if not config_path.is_file():
        raise LmshrinkError(f"{folder} has no quantize_config.json", fix="point at a GPTQ checkpoint folder")
    qc = json.loads(config_path.read_text())
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise LmshrinkError(f"{folder}: checkpoint_format {qc.get('checkpoint_format')!r} is not GPTQ v1",
                            fix="this reader handles checkpoint_format 'gptq' (v1) only")
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    results = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = sorted(key[: -len(".qweight")] for key in handle.keys() if key.endswith(".qweight"))
        for name in names:
            scales = handle.get_tensor(f"{name}.scales").float().t().contiguous()
            out_features = scales.shape[0]
            g_idx = handle.get_tensor(f"{name}.g_idx").to(torch.int32)
            in_features = g_idx.numel()
            codes = unpack_gptq_qweight(handle.get_tensor(f"{name}.qweight"), bits, in_features)
            zero = unpack_gptq_qzeros(handle.get_tensor(f"{name}.qzeros"), bits, out_features)[:, : scales.shape[1]]
            spec = GridSpec(bits=bits, group_size=group_size, symmetric=bool(qc.get("sym", False)))
            contiguous = torch.equal(g_idx, torch.arange(in_features, dtype=torch.int32) //
                                     spec.group_width(in_features))
            results[name] = QuantResult(codes=codes, scale=scales, zero=zero.contiguous(),
                                        g_idx=None if contiguous else g_idx,
                                        weight=dequantize(codes, scales, zero, g_idx), spec=spec,
                                        info={"format": "gptq"})
    return results
