"""Streamed blocks: one decoder block's weights are read from the model's safetensors files onto the compute device
when the engine reaches it, and dropped back to the meta device when it is done, so memory holds one block."""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.core.process import release_free_heap
from lmshrink.models.loader import SafetensorsWeights, replace_tensor


class BlockStreamer:
    """Materialises and releases the parameters of the blocks under ``block_path`` (e.g. ``model.layers``)."""

    def __init__(self, model: nn.Module, weights: SafetensorsWeights, block_path: str):
        self.model = model
        self.weights = weights
        self.block_path = block_path
        self.sources: list[int] | None = None  # block index -> the index it has in the files (blocks were removed)

    def source_index(self, index: int) -> int:
        return index if self.sources is None else self.sources[index]

    def source_name(self, name: str) -> str:
        """The name tensor ``name`` of the model has in the source files (a block's index there may differ)."""
        prefix = self.block_path + "."
        if self.sources is None or not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix):].partition(".")
        return f"{prefix}{self.sources[int(index)]}.{rest}"

    def load(self, block: nn.Module, index: int, device: torch.device) -> None:
        """Read block ``index``'s parameters (in the dtype the model declares) onto ``device``."""
        prefix = f"{self.block_path}.{self.source_index(index)}."
        for name, param in list(block.named_parameters()):
            if param.device.type != "meta":
                continue
            stored = self.weights.get(prefix + name)
            if tuple(stored.shape) != tuple(param.shape):
                raise ValueError(f"{prefix + name}: stored shape {tuple(stored.shape)}, model {tuple(param.shape)}")
            value = stored.to(device=device, dtype=param.dtype if stored.is_floating_point() else stored.dtype)
            replace_tensor(block, param, value)

    @staticmethod
    def release(block: nn.Module) -> None:
        """Drop the block's parameters back to the meta device (buffers stay: they are small and not stored)."""
        for param in list(block.parameters()):
            if param.device.type != "meta":
                replace_tensor(block, param, torch.empty_like(param, device="meta"))
        release_free_heap()  # block-sized frees would otherwise fragment the heap, block after block


def materialised_blocks(blocks: nn.ModuleList) -> list[int]:
    """Indices of the blocks that hold at least one parameter off the meta device."""
    return [i for i, block in enumerate(blocks) if any(p.device.type != "meta" for p in block.parameters())]
