"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2023): blocks with more outlier weights are pruned less.

A dense pre-pass (the engine's statistics pass, asked for by the pruning stage's ``before_blocks``) runs the
calibration windows through the unpruned model block by block and collects each linear layer's input column norms. A block's outlier ratio is the share of its Wanda scores ``|W_ij| * ||X_j||`` (over all
its targeted layers together) above ``m`` times their mean. The ratios are mapped linearly onto ``[0, 2*lambda]``,
shifted so their mean is the target density ``1 - sparsity``, and each block's sparsity is one minus its value
(as the OWL reference does), kept within bounds with the mean held at the target.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lmshrink.methods.prune.wanda import wanda_score
from lmshrink.models.adapters import linear_weight


def outlier_ratio(scores: Iterable[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (flattened together) above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel()


def owl_sparsities(ratios: list[float], sparsity: float, lam: float, floor: float = 0.0,
                   ceiling: float = 0.99) -> list[float]:
    """Per-block sparsities from outlier ratios: mean ``sparsity``, spread ``2 * lam``, more outliers -> sparser less.

    Equal ratios (or one block) give the uniform target. Values are kept in ``[floor, ceiling]``: a block may move
    up to ``2 * lam * (n - 1) / n`` from the target, so near the ends of the range (or with a large ``lam``) some
    hit a bound; the others are then shifted together, in order, until the mean is the target again (the reference
    clips at its low end only and lets the mean drift).
    """
    if not floor <= sparsity <= ceiling:
        raise ValueError(f"target sparsity {sparsity} is outside [{floor}, {ceiling}]")
    values = torch.tensor(ratios, dtype=torch.float64)
    spread = float(values.max() - values.min()) if len(ratios) else 0.0
    if spread == 0.0:
        return [sparsity] * len(ratios)
    density = (values - values.min()) / spread * (2 * lam)
    density = density - density.mean() + (1.0 - sparsity)
    result = (1.0 - density).clamp(floor, ceiling)
    for _ in range(len(ratios) + 1):  # each round pins at least one more block at a bound, or ends
        error = float(result.mean()) - sparsity
        if abs(error) <= 1e-12:
            break
        movable = result > floor if error > 0 else result < ceiling
        result = torch.where(movable, result - error * len(ratios) / int(movable.sum()), result)
        result = result.clamp(floor, ceiling)
    return [float(v) for v in result]


def block_outlier_ratio(block: nn.Module, stats: dict, m: float) -> float:
    """The outlier ratio of one block's selected layers (``stats``: relative name -> ``Stat.CHANNELS`` of its
    input, in the block's linear order) from the dense pre-pass, or NaN when the block has none."""
    if not stats:
        return float("nan")
    scores = [wanda_score(linear_weight(block.get_submodule(name)), channels.channels.sq_sum)
              for name, channels in stats.items()]
    return outlier_ratio(scores, m)
