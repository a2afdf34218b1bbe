"""Capture what the decoder blocks receive: block 0's hidden states for every window, each block's other arguments.

Every block is swapped for a recorder for the capture pass, so no block computes anything: the first window runs
through all recorders (each keeps its block's keyword arguments: masks, position embeddings — they may differ per
block, e.g. sliding-window layers), later windows stop at block 0 once its input is kept.
"""

from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the rest of the model or block is not needed)."""

    pass


class _Recorder(nn.Module):
    def __init__(self, block: nn.Module, index: int, store: "BlockInputs"):
        super().__init__()
        self.block = block  # keeps attribute lookups (e.g. attention_type) working for the decoder loop
        self.index = index
        self.store = store

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.store.hidden.append(hidden.detach().to("cpu"))
        if self.index not in self.store.kwargs:
            self.store.args[self.index] = tuple(args[1:])
            self.store.kwargs[self.index] = dict(kwargs)
        if self.store.stop_after_first_block:
            raise StopForward
        return hidden  # transformers 5 decoder layers return the hidden states as a tensor


class BlockInputs:
    """``hidden``: block-0 inputs per window ([1, seqlen, hidden] each, on CPU); ``args[i]``/``kwargs[i]``: the other
    arguments block i receives."""

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.args: dict[int, tuple] = {}  # extra positional arguments (gpt2 passes cache and mask positionally)
        self.kwargs: dict[int, dict] = {}
        self.stop_after_first_block = False


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         device: torch.device) -> BlockInputs:
    """Run every window up to block 0 (the first through all blocks) and keep what the blocks receive.

    The windows go where the model's input embeddings are (the rest of the model stays put; with ``--device cuda``
    only the block being compressed moves to the GPU, and the engine moves the captured arguments with it).
    ``device`` is used only when the model has no input embeddings to ask.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
    store = BlockInputs()
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, store)
    try:
        with torch.no_grad():
            for w in range(input_ids.shape[0]):
                store.stop_after_first_block = w > 0
                try:
                    model(input_ids=input_ids[w:w + 1].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    missing = [i for i in range(len(originals)) if i not in store.kwargs]
    if missing or len(store.hidden) != input_ids.shape[0]:
        raise RuntimeError(f"capture saw {len(store.hidden)} windows and no arguments for blocks {missing}")
    return store


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states for one window."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
