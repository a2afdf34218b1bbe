"""How many heads and FFN channels each block loses: the budget (a fraction of the block parameters or a parameter
count) turned into per-block removal steps, with the same widths in every block (``uniform``) or widths allocated
by standardised scores across blocks (``per-layer``, FLAP-style), met exactly at the granularity of one step."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

import torch

from lmshrink.core.errors import LmshrinkError


@dataclass
class BlockShape:
    """One block's removable structure: ``kept(heads, channels)`` gives its parameters after removing that many
    head steps and channel steps; ``max_heads`` / ``max_channels`` the most steps that leave something."""

    params: int  # the block's parameters before pruning
    kept: Callable[[int, int], int]
    max_heads: int
    max_channels: int


def kept_target(params: int, ratio: float) -> int:
    """The most parameters a block of ``params`` may keep to have lost at least ``ratio`` of them."""
    return params - math.ceil(ratio * params - 1e-9)


def _least_channels(shape: BlockShape, heads: int, target: int) -> int | None:
    """The fewest channel steps that bring the block to at most ``target`` parameters with ``heads`` head steps
    removed (None when even the most is not enough)."""
    low, high = 0, shape.max_channels
    if shape.kept(heads, high) > target:
        return None
    while low < high:  # kept() falls as channels grow
        mid = (low + high) // 2
        if shape.kept(heads, mid) <= target:
            high = mid
        else:
            low = mid + 1
    return low


def uniform_plan(shapes: list[BlockShape], target_per_block: int, heads: int | None,
                 head_cost: Callable[[int], float] | None, channel_cost: Callable[[int], float] | None
                 ) -> tuple[int, int, list[dict]]:
    """``(head steps, channel steps)`` removed in every block (all blocks have the same shape) so that each keeps at
    most ``target_per_block`` parameters with the fewest channels removed; ``heads``: given, or None to choose,
    among the feasible head counts, the one whose removed units cost least (``head_cost(h) + channel_cost(c)``,
    summed over blocks; without costs, no heads). Returns also each candidate's record."""
    shape = shapes[0]
    candidates = [heads] if heads is not None else list(range(shape.max_heads + 1))
    records, best = [], None
    for h in candidates:
        if h > shape.max_heads:
            continue
        c = _least_channels(shape, h, target_per_block)
        if c is None:
            records.append({"heads": h, "feasible": False})
            continue
        cost = (head_cost(h) + channel_cost(c)) if head_cost is not None and channel_cost is not None else float(h)
        records.append({"heads": h, "channels": c, "cost": cost})
        if best is None or cost < best[2]:
            best = (h, c, cost)
    if best is None:
        most = 1 - min(shape.kept(h, shape.max_channels) for h in
                       ([heads] if heads is not None and heads <= shape.max_heads else range(shape.max_heads + 1))
                       ) / shape.params
        raise LmshrinkError(
            f"the budget asks each block to keep at most {target_per_block} of its {shape.params} parameters, but "
            f"removing every head and channel it can lose (keeping one head step and the smallest FFN) leaves more: "
            f"width pruning can remove at most {100 * most:.1f}% of a block's parameters here",
            fix="ask for less (a smaller ratio or a larger params), allow more structures, or remove blocks "
                "(method: prune-depth)")
    return best[0], best[1], records


def per_layer_plan(shapes: list[BlockShape], target_total: int, head_steps: list[torch.Tensor | None],
                   channel_steps: list[torch.Tensor | None]) -> list[tuple[int, int]]:
    """``(head steps, channel steps)`` per block so that all blocks together keep at most ``target_total``
    parameters: removal steps taken in order of their (standardised) scores across all blocks, the cheapest first,
    until the budget is met. ``head_steps[b]`` / ``channel_steps[b]``: the scores of block b's successive steps
    (None where that kind is not removed)."""
    plan = [[0, 0] for _ in shapes]
    total = sum(s.kept(0, 0) for s in shapes)
    queue: list[tuple[float, int, int]] = []

    def push(block: int, kind: int) -> None:
        steps = (head_steps, channel_steps)[kind][block]
        limit = (shapes[block].max_heads, shapes[block].max_channels)[kind]
        taken = plan[block][kind]
        if steps is not None and taken < min(limit, len(steps)):
            heapq.heappush(queue, (float(steps[taken]), block, kind))

    for b in range(len(shapes)):
        push(b, 0)
        push(b, 1)
    while total > target_total:
        if not queue:
            most = 1 - total / sum(s.params for s in shapes)
            raise LmshrinkError(
                f"the budget asks the blocks to keep at most {target_total} parameters, but removing every head and "
                f"channel they can lose leaves {total} (at most {100 * most:.1f}% of their parameters)",
                fix="ask for less, allow more structures, or remove blocks (method: prune-depth)")
        _, b, kind = heapq.heappop(queue)
        before = shapes[b].kept(*plan[b])
        plan[b][kind] += 1
        total += shapes[b].kept(*plan[b]) - before
        push(b, kind)
    return [tuple(p) for p in plan]


def standardised(values: torch.Tensor) -> torch.Tensor:
    """``(v - mean) / std`` (FLAP's per-layer standardisation; a constant vector becomes zeros)."""
    values = values.double()
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std()
    return (values - values.mean()) / (std if float(std) > 0 else 1.0)
