"""The job objects the engine hands to stages (the ``LayerJob``, ``BlockJob`` and ``ModelJob`` of
``core.stage``), and the engine's unit of work within a block (``Task``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lmshrink.core.stage import StageBase, Stat
from lmshrink.engine.statistics import GroupStats


@dataclass
class Task:
    """One stage's work in one block: a layer stage over ``groups`` after one collection pass (or none), or a block
    stage over the groups it selects (``block``)."""

    number: int  # the stage's index in the recipe
    stage: StageBase
    groups: list[list[str]]
    block: bool = False
    # statistics the stage asks for that these groups cannot have: Stat.FP_TARGET for routed experts (a router may
    # send a token to different experts in the uncompressed and the compressed model, so no inputs pair up)
    drop: frozenset[Stat] = frozenset()

    def needs(self) -> frozenset[Stat]:
        """What this task's collection pass gathers."""
        return self.stage.needs() - self.drop


@dataclass
class LayerJob:
    name: str
    module: nn.Module
    uncompressed: nn.Module | None
    stats: GroupStats
    state: dict[str, Any]


@dataclass
class BlockJob:
    index: int
    prefix: str
    block: nn.Module
    groups: list[list[str]]
    adapter: Any
    inputs: list[torch.Tensor]
    state: dict[str, dict[str, Any]]
    device: Any
    _forward: Callable[[int, torch.Tensor], torch.Tensor]
    _collect: Callable[[frozenset[Stat], dict[str, nn.Module]], dict[str, GroupStats]]
    _all_reduce: Callable[..., None] | None = None
    ranks: int = 1
    uncompressed: nn.Module | None = None

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` in place over the ranks of a data-parallel run (``sum``, ``min`` or ``max``); nothing
        to do in a single process. ``inputs`` are this rank's batches only: a block stage sums what it computes
        from them through here (and declares ``data_parallel = True``)."""
        if self._all_reduce is not None:
            self._all_reduce(tensor, op)

    def forward(self, batch: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output (on CPU) for batch ``batch`` of its calibration inputs, or for ``hidden`` instead."""
        return self._forward(batch, self.inputs[batch] if hidden is None else hidden)

    def collect(self, needs: frozenset[Stat], modules: dict[str, nn.Module]) -> dict[str, GroupStats]:
        """Statistics ``needs`` of each module's input (relative names) over all calibration batches (of every
        rank), as the block is now. ``Stat.FP_TARGET`` (the same modules' inputs in the uncompressed model, paired
        token by token) is available when the stage's ``needs()`` includes it (single-process runs only)."""
        return self._collect(needs, modules)


@dataclass
class ModelJob:
    model: nn.Module
    adapter: Any
    blocks: Any
    prefix: str
    progress: bool
    _statistics_pass: Callable
    _drop_blocks: Callable[[list[int]], None]
    block_options: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    calibration: torch.Tensor | None = None  # the calibration windows' token ids, [windows, seqlen]

    def statistics_pass(self, needs: frozenset[Stat], select: Callable[[str], bool],
                        observe: Callable[..., Any], streams: bool = False) -> list[Any]:
        """Run the calibration windows through every block of the model as it is (before any compression), block
        by block (streamed from disk in streamed mode); for each block collect ``needs`` on the linears whose full
        name ``select`` accepts and return ``observe(index, block, stats)`` (stats by relative name, in the
        block's linear order) while the block is loaded. Only what ``observe`` returns is kept. ``streams``:
        observe is called as ``observe(index, block, stats, inputs, outputs)`` with the block's input and output
        hidden states (lists of batches, on CPU)."""
        return self._statistics_pass(needs, select, observe, streams)

    def drop_blocks(self, blocks: list[int]) -> None:
        """Remove these decoder blocks (indices as the model has them now) before the block loop: the kept blocks
        are renumbered, the config follows, streamed runs read each kept block from its place in the files, and
        later stages see the smaller model (``set_block_options`` indices are then the new ones)."""
        self._drop_blocks(blocks)
        self.blocks = self.adapter.blocks(self.model)

    def set_block_options(self, number: int, block: int, options: dict[str, Any]) -> None:
        """Run stage ``number`` on block ``block`` with these options changed (e.g. a per-block sparsity)."""
        self.block_options.setdefault((number, block), {}).update(options)

    def log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr)
