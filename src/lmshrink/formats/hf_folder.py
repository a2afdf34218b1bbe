"""A Hugging Face model folder on disk: config.json, tokenizer files and safetensors weights (one file, or shards
with an index), written in one atomic rename; the helpers every writer and reader of lmshrink's folders share."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.models.structure import STRUCTURE_KEY

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def natural_key(name: str):
    """A sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def protected_folders(model: nn.Module, input_dir) -> list[Path]:
    candidates = [input_dir, getattr(model, "name_or_path", None),
                  getattr(getattr(model, "config", None), "_name_or_path", None)]
    # "" (a model built from a config) would resolve to the working directory: skip it
    return [Path(c) for c in candidates if c and Path(c).is_dir()]


def split_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
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


def resolve_meta(shard: dict[str, torch.Tensor], source_tensors) -> dict[str, torch.Tensor]:
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


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   max_shard_size: int, source_tensors=None, rename=None) -> None:
    """Write ``tensors`` (meta placeholders read from ``source_tensors`` shard by shard) into one file or shards of
    at most ``max_shard_size`` bytes with an index; ``rename`` gives each tensor's stored name."""
    from safetensors.torch import save_file

    rename = rename or (lambda name: name)
    shards = split_shards(tensors, max_shard_size)
    metadata = {"format": "pt", **metadata}

    def stored(shard):
        return {rename(key): value for key, value in resolve_meta(shard, source_tensors).items()}

    if len(shards) == 1:
        save_file(stored(shards[0]), str(folder / SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(stored(shard), str(folder / filename), metadata=metadata)  # one shard read at a time
        weight_map.update({rename(key): filename for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def dense_state_dict(model: nn.Module, allow_meta: bool = False) -> dict[str, torch.Tensor]:
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


def config_json(model: nn.Module, quantization_config: dict[str, Any] | None,
                structure: dict[str, Any] | None = None) -> str:
    """config.json of ``model``; ``structure``: what the config cannot state about the blocks' shapes
    (``models.structure.config_structure``), recorded under its key for lmshrink's loader."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = model.dtype
    data = config.to_diff_dict()
    data.pop("quantization_config", None)
    data.pop(STRUCTURE_KEY, None)
    if structure:
        data[STRUCTURE_KEY] = structure
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def weight_files(folder: Path) -> dict[str, Path]:
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
