"""What a model folder takes on disk: the bytes of its safetensors files, the bits per weight of its compressed
layers, and the ratio to the same model stored dense. Read from the files' headers only (nothing is loaded)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

# bytes per element of the safetensors dtypes
_ELEMENT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# tensors of one compressed layer ``name`` besides a plain ``name.weight``: compressed-tensors pack-quantized, and
# bitmask storage of pruned layers (``formats.sparse_bitmask``)
_QUANTIZED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
_BITMASK = ("shape", "compressed", "bitmask", "row_offsets")


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _layers_from_record(folder: Path) -> dict[str, tuple[int, int]] | None:
    """``name -> (out, in)`` of the layers lmshrink compressed, from the folder's ``lmshrink.json``."""
    try:
        record = json.loads((folder / "lmshrink.json").read_text())
    except (OSError, ValueError):
        return None
    layers = record.get("layers") if isinstance(record, dict) else None
    if not isinstance(layers, list):
        return None
    return {layer["name"]: (int(layer["out_features"]), int(layer["in_features"])) for layer in layers
            if isinstance(layer, dict) and {"name", "out_features", "in_features"} <= layer.keys()}


def stored_size(folder: str | os.PathLike, layers: dict[str, tuple[int, int]] | None = None) -> dict[str, Any] | None:
    """The folder's weights on disk, or None when it holds no safetensors file.

    ``layers``: ``name -> (out_features, in_features)`` of the compressed layers (default: those in the folder's
    ``lmshrink.json``, else every layer stored packed or as a bitmask). Returns ``stored_bytes`` (the safetensors
    files), ``dense_bytes`` (the same tensors with each compressed layer's weight stored dense, in the dtype of its
    scales or kept values: the model as it was before compression), ``ratio`` (stored / dense), and for the
    compressed layers their ``weights``, ``stored_bytes`` (every tensor of theirs but a bias) and ``bits_per_weight``.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        return None
    tensors: dict[str, tuple[str, list[int], int]] = {}  # name -> (dtype, shape, bytes)
    for path in files:
        for name, info in _header(path).items():
            start, end = info["data_offsets"]
            tensors[name] = (info["dtype"], list(info["shape"]), end - start)
    if layers is None:
        layers = _layers_from_record(folder)
    if layers is None:  # not written by lmshrink: the layers whose storage says they are compressed
        layers = {name.rpartition(".")[0]: None for name in tensors
                  if name.endswith((".weight_packed", ".bitmask"))}
    compressed_bytes = weights = dense_weight_bytes = count = 0
    owned: set[str] = set()
    for module, shape in layers.items():
        keys = [f"{module}.{leaf}" for leaf in ("weight", *_QUANTIZED, *_BITMASK) if f"{module}.{leaf}" in tensors]
        if not keys:
            continue
        rows, cols = shape or _stored_shape(files, module, tensors)
        owned.update(keys)
        count += 1
        compressed_bytes += sum(tensors[k][2] for k in keys)
        weights += rows * cols
        dense_dtype = next(tensors[k][0] for k in (f"{module}.weight", f"{module}.weight_scale",
                                                   f"{module}.compressed", keys[0]) if k in tensors)
        dense_weight_bytes += rows * cols * _ELEMENT.get(dense_dtype, 4)
    other = sum(size for name, (_, _, size) in tensors.items() if name not in owned)
    stored = sum(p.stat().st_size for p in files)
    dense = other + dense_weight_bytes + (stored - sum(size for _, _, size in tensors.values()))  # headers too
    record: dict[str, Any] = {
        "files": [p.name for p in files], "stored_bytes": stored, "dense_bytes": dense,
        "ratio": stored / dense if dense else None,
        "measured": "bytes of the safetensors files; dense_bytes: the same tensors with each compressed layer's "
                    "weight stored dense in the dtype of its scales (the model before compression)",
    }
    if weights:
        record["compressed_layers"] = {"layers": count, "weights": weights, "stored_bytes": compressed_bytes,
                                       "bits_per_weight": 8 * compressed_bytes / weights}
    return record


def _stored_shape(files: list[Path], module: str, tensors: dict) -> tuple[int, int]:
    """``(out, in)`` of a layer: its stored shape tensor (two int64 values: packed or bitmask), else its weight's."""
    for key in (f"{module}.weight_shape", f"{module}.shape"):
        if key not in tensors:
            continue
        for path in files:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
                if key in header:
                    start, end = header[key]["data_offsets"]
                    handle.seek(8 + length + start)
                    rows, cols = struct.unpack("<qq", handle.read(end - start))
                    return rows, cols
    rows, cols = tensors[f"{module}.weight"][1]
    return rows, cols
