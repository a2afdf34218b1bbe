"""Pruned weights stored as bitmask + values: compressed-tensors' ``sparse-bitmask`` layout.

Opt-in (``save_quantized(..., sparse_format="bitmask")``, CLI ``--sparse-format bitmask``) for pruned layers that are
not quantized; layers pruned *and* quantized keep the ``pack-quantized`` layout (their zeros are codes), and the
default (``"dense"``) writes every pruned weight densely with its zeros.

Layout of one stored tensor ``name.weight`` (``rows x cols`` as the checkpoint holds it, dtype ``d``), the tensor
names and meaning of compressed-tensors' ``BitmaskCompressor`` (keys relative to the module ``name``):

* ``name.shape`` int64 ``[2]`` = ``[rows, cols]``;
* ``name.compressed`` ``d`` ``[kept]``: the kept weights, row-major;
* ``name.bitmask`` uint8 ``[rows, ceil(cols/8)]``: bit ``j % 8`` (little bit order) of byte ``j // 8`` set where
  column ``j`` is kept (``compressed_tensors.utils.pack_bitmasks``);
* ``name.row_offsets`` int64 ``[rows]``: the index in ``compressed`` of each row's first kept weight.

The bitmask marks the *kept* weights (not the pruner's mask's complement of nonzeros), so a kept weight that happens
to be exactly zero stays kept and the pruning mask reads back exactly; any reader that scatters ``compressed`` into the
set bits (compressed-tensors' ``bitmask_decompress``) rebuilds the same dense tensor. At 50% sparsity a float32 layer
takes 2.125 bytes per weight instead of 4, a float16/bfloat16 one 1.125 instead of 2 (plus 8 bytes per row).

Who reads it: lmshrink (``load_model``, ``load_sparse_results``, ``lmshrink evaluate``) decodes it to the exact
dense weights. Plain transformers does **not**: compressed-tensors 0.20 dropped its sparse compressors (only the
``BitmaskConfig`` remains) and transformers ignores ``sparsity_config``, so ``AutoModelForCausalLM.from_pretrained``
on such a folder leaves the bitmask-stored layers randomly initialised (it only warns about missing keys; tested).
vLLM, which builds on compressed-tensors, was not checked. Use the default dense storage for folders that other tools
must load.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import PruneResult
from lmshrink.formats.hf_folder import is_conv1d, natural_key, weight_files

SPARSE_FORMATS = ("dense", "bitmask")
CT_FORMAT = "sparse-bitmask"  # compressed-tensors' CompressionFormat.sparse_bitmask
KEYS = ("shape", "compressed", "bitmask", "row_offsets")
LAYERS_KEY = "lmshrink.sparse_layers"  # safetensors metadata: per bitmask layer, its pattern and orientation


def check_sparse_format(value: str) -> str:
    """``value`` if it names a sparse storage format, else a LmshrinkError listing them."""
    if value not in SPARSE_FORMATS:
        raise LmshrinkError(f"sparse format {value!r} is not known",
                            fix="use 'dense' (zeros stored densely, loads anywhere) or 'bitmask' (bitmask + kept "
                                "values, smaller; read back by lmshrink)")
    return value


# ---------------------------------------------------------------------------------------------------------------
# one tensor
# ---------------------------------------------------------------------------------------------------------------


def encode(weight: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bitmask tensors of a 2-D ``weight`` (kept as its dtype) whose ``kept`` (bool, same shape) weights are
    stored; the others must be zero (checked: decoding would otherwise differ)."""
    from compressed_tensors.utils import pack_bitmasks

    if weight.dim() != 2 or tuple(kept.shape) != tuple(weight.shape) or kept.dtype != torch.bool:
        raise ValueError(f"encode needs a 2-D weight and a bool mask of its shape, got {tuple(weight.shape)} and "
                         f"{tuple(kept.shape)} {kept.dtype}")
    weight, kept = weight.detach().cpu(), kept.cpu()
    if bool(weight.masked_select(~kept).ne(0).any()):
        raise ValueError("a weight outside the kept mask is not zero; bitmask storage would drop it")
    counts = kept.sum(dim=1)
    return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64),
            "compressed": weight.masked_select(kept).contiguous(),
            "bitmask": pack_bitmasks(kept.contiguous()).contiguous(),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64).contiguous()}


def decode(name: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, kept)`` from a layer's bitmask tensors (``KEYS``), checked for consistency."""
    from compressed_tensors.utils import unpack_bitmasks

    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise LmshrinkError(f"layer {name}: bitmask storage lacks {', '.join(name + '.' + k for k in missing)}",
                            fix="the checkpoint is incomplete; re-save it")
    shape = [int(v) for v in tensors["shape"].tolist()]
    bitmask, values = tensors["bitmask"], tensors["compressed"]
    if len(shape) != 2 or tuple(bitmask.shape) != (shape[0], math.ceil(shape[1] / 8)) or bitmask.dtype != torch.uint8:
        raise LmshrinkError(f"layer {name}: bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not fit shape {shape}",
                            fix="the checkpoint is inconsistent; re-save it")
    kept = unpack_bitmasks(bitmask, shape)
    counts = kept.sum(dim=1)
    if int(counts.sum()) != values.numel() or values.dim() != 1:
        raise LmshrinkError(f"layer {name}: the bitmask keeps {int(counts.sum())} weights but {values.numel()} "
                            "values are stored", fix="the checkpoint is inconsistent; re-save it")
    if not torch.equal(tensors["row_offsets"].to(torch.int64), torch.cumsum(counts, 0) - counts):
        raise LmshrinkError(f"layer {name}: row_offsets do not match the bitmask",
                            fix="the checkpoint is inconsistent; re-save it")
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[kept] = values
    return weight, kept


def encoded_bytes(shape: tuple[int, int], kept: int, element_size: int) -> int:
    """Bytes of ``encode``'s tensors for a ``rows x cols`` layer keeping ``kept`` weights of ``element_size`` bytes."""
    rows, cols = shape
    return 2 * 8 + kept * element_size + rows * math.ceil(cols / 8) + rows * 8


def storage_summary(model: torch.nn.Module, results: dict, sparse_format: str) -> dict[str, Any] | None:
    """Bytes the pruned, not quantized layers of ``results`` take when saved with ``sparse_format`` against stored
    densely (each in its layer's dtype), or None when no layer is such. Exact: the sizes of the tensors the writer
    stores for those layers (``encode``'s for ``bitmask``)."""

    check_sparse_format(sparse_format)
    modules = dict(model.named_modules())
    layers = dense = stored = 0
    kind = getattr(results, "kind", None)  # results read from disk tell their kind without being read
    for name in results:
        if kind is not None and kind(name) != PruneResult.kind:
            continue
        result = results[name]
        if not isinstance(result, PruneResult):
            continue
        module = modules[name]
        element_size = module.weight.element_size()
        rows, cols = result.mask.shape
        if is_conv1d(module):
            rows, cols = cols, rows
        layers += 1
        dense += rows * cols * element_size
        kept = rows * cols - int(result.mask.sum())
        stored += encoded_bytes((rows, cols), kept, element_size) if sparse_format == "bitmask" else (
            rows * cols * element_size)
    if not layers:
        return None
    return {"format": sparse_format, "layers": layers, "dense_bytes": dense, "stored_bytes": stored,
            "saved_bytes": dense - stored, "stored_fraction": stored / dense if dense else 1.0}


# ---------------------------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------------------------


def _quantization_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    quant = config.get("quantization_config")
    return quant if isinstance(quant, dict) else {}


def is_bitmask_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder``'s config.json says its pruned weights are stored as ``sparse-bitmask``."""
    sparsity = _quantization_config(Path(folder)).get("sparsity_config") or {}
    return isinstance(sparsity, dict) and sparsity.get("format") == CT_FORMAT


def iter_bitmask_layers(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, dict]]:
    """``(module name, weight as stored, kept mask, lmshrink's record or {})`` for every bitmask-stored layer of a
    ``sparse-bitmask`` folder, one layer at a time (``weight``/``kept`` in the checkpoint's orientation: ``[in, out]``
    for GPT-2 Conv1D, whose record says ``conv1d``)."""
    from safetensors import safe_open


    folder = Path(folder)
    if not is_bitmask_folder(folder):
        raise LmshrinkError(f"{folder} does not store sparse weights as {CT_FORMAT} (config.json's "
                            "quantization_config.sparsity_config.format)",
                            fix="point at a folder saved with --sparse-format bitmask")
    files = weight_files(folder)
    names = sorted((key[: -len(".bitmask")] for key in files if key.endswith(".bitmask")), key=natural_key)
    handles: dict[Path, Any] = {}
    records: dict[str, dict] = {}
    try:
        for path in sorted(set(files.values())):
            handles[path] = safe_open(str(path), framework="pt")
            records.update(json.loads((handles[path].metadata() or {}).get(LAYERS_KEY, "{}")))
        for name in names:
            tensors = {key: handles[files[f"{name}.{key}"]].get_tensor(f"{name}.{key}")
                       for key in KEYS if f"{name}.{key}" in files}
            weight, kept = decode(name, tensors)
            yield name, weight, kept, records.get(name, {})
    finally:
        handles.clear()


def decoded_bitmask_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``name.weight`` -> the decoded dense weight (the checkpoint's dtype and orientation, zeros where pruned) of
    every bitmask-stored layer of ``folder``; ``{}`` when the folder stores no weight as bitmask (dense storage).
    For writers that copy a folder's tensors into another format: a stored ``name.weight`` is what they expect."""
    if not is_bitmask_folder(folder):
        return {}
    return {f"{name}.weight": weight for name, weight, _, _ in iter_bitmask_layers(folder)}


def dense_tensor_keys(keys: Iterable[str], decoded: dict[str, torch.Tensor]) -> list[str]:
    """A checkpoint's tensor names ``keys`` as a dense checkpoint would hold them: the bitmask tensors (``KEYS``) of
    each layer in ``decoded`` (``decoded_bitmask_weights``) replaced by its ``name.weight``, where they were."""
    stored = {f"{weight_key[: -len('.weight')]}.{key}": weight_key for weight_key in decoded for key in KEYS}
    out: list[str] = []
    seen: set[str] = set()
    for key in keys:
        key = stored.get(key, key)
        if key not in seen:
            seen.add(key)
            out.append(key)
    out.extend(key for key in decoded if key not in seen)
    return out


def load_sparse_results(folder: str | os.PathLike):
    """The bitmask-stored layers of a folder as ``PruneResult`` (module name -> result): mask (True where pruned)
    ``[out, in]``, float32 weight and values, the pattern and target sparsity lmshrink recorded (``unstructured`` and
    the measured sparsity for folders written by other tools). Layers stored packed or dense are not included."""

    results = {}
    for name, weight, kept, record in iter_bitmask_layers(folder):
        if record.get("conv1d"):
            weight, kept = weight.t(), kept.t()
        mask = ~kept
        results[name] = PruneResult.from_weight(
            weight.float(), mask, pattern=record.get("pattern", "unstructured"),
            target_sparsity=record.get("target_sparsity", float(mask.sum()) / mask.numel()),
            info={"format": CT_FORMAT})
    return results


def fill_bitmask_weights(model: torch.nn.Module, folder: str | os.PathLike) -> list[str]:
    """Put the decoded bitmask-stored weights of ``folder`` into ``model`` (in each layer's dtype and device, CPU for
    a layer still on meta);
    returns the layers filled. Exact: the dense weight the writer encoded, bit for bit."""
    modules = dict(model.named_modules())
    filled = []
    for name, weight, _, _ in iter_bitmask_layers(folder):
        module = modules.get(name)
        target = getattr(module, "weight", None)
        if not isinstance(target, torch.Tensor):
            raise LmshrinkError(f"{folder} stores a bitmask for {name}, which the model has no weight for",
                                fix="check that config.json matches the weights")
        if tuple(target.shape) != tuple(weight.shape):
            raise LmshrinkError(f"{folder}: layer {name} is stored with shape {tuple(weight.shape)}, the model "
                                f"expects {tuple(target.shape)}", fix="check that config.json matches the weights")
        device = "cpu" if target.device.type == "meta" else target.device  # a model built on meta gets it on CPU
        with torch.no_grad():
            module.weight = torch.nn.Parameter(weight.to(device=device, dtype=target.dtype),
                                               requires_grad=target.requires_grad)
        filled.append(name)
    return filled


def load_bitmask_model(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, **kwargs):
    """``AutoModelForCausalLM`` for a ``sparse-bitmask`` folder with its pruned weights decoded exactly.

    transformers loads everything it can (dense tensors, ``pack-quantized`` layers), the bitmask-stored layers are
    then filled from the folder. transformers' report of their missing ``weight`` and unexpected bitmask tensors is
    expected; any other missing or unexpected tensor is an error.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected missing/unexpected keys report would alarm users
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                           trust_remote_code=trust_remote_code,
                                                           output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    filled = set(fill_bitmask_weights(model, folder))
    stored = {f"{name}.{key}" for name in filled for key in KEYS}
    missing = [k for k in info.get("missing_keys", ()) if not (k.endswith(".weight") and k[:-7] in filled)]
    unexpected = [k for k in info.get("unexpected_keys", ()) if k not in stored]
    if missing or unexpected:
        raise LmshrinkError(f"{folder}: transformers found tensors missing ({missing[:3]}) or unexpected "
                            f"({unexpected[:3]}) beyond the bitmask-stored layers",
                            fix="check that config.json matches the weights")
    return model.eval()


__all__ = ["CT_FORMAT", "SPARSE_FORMATS", "check_sparse_format", "decode", "decoded_bitmask_weights",
           "dense_tensor_keys", "encode", "encoded_bytes", "fill_bitmask_weights", "is_bitmask_folder",
           "iter_bitmask_layers", "load_bitmask_model", "load_sparse_results", "storage_summary"]
