"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2023): blocks with more outlier weights are pruned less.

A dense pre-pass runs the calibration windows through the unpruned model block by block and collects each linear
layer's input column norms. A block's outlier ratio is the share of its Wanda scores ``|W_ij| * ||X_j||`` (over all
its targeted layers together) above ``m`` times their mean. The ratios are mapped linearly onto ``[0, 2*lambda]``,
shifted so their mean is the target density ``1 - sparsity``, and each block's sparsity is one minus its value
(as the OWL reference does), kept within bounds with the mean held at the target.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from lmshrink.methods.prune.wanda import wanda_score


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


class ColumnNorms:
    """Running ``sum_t x_t^2`` per input column of one linear layer (``||X_j||^2``), fp32."""

    def __init__(self, in_features: int, device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.reshape(-1, x.shape[-1]).float().square().sum(dim=0)


def block_outlier_ratios(blocks: list[nn.Module], hidden: list[torch.Tensor],
                         layers_of: Callable[[int, nn.Module], dict[str, nn.Module]],
                         weight_of: Callable[[nn.Module], torch.Tensor],
                         forward: Callable[[int, nn.Module, torch.Tensor], torch.Tensor],
                         load: Callable[[int, nn.Module], None], release: Callable[[int, nn.Module], None],
                         m: float) -> list[float]:
    """The dense pre-pass: for each block (in order) the outlier ratio of its layers' Wanda scores.

    ``layers_of(index, block)``: the block's targeted linear layers by name; ``weight_of(module)``: its ``[out, in]``
    weight; ``forward(index, block, h)``: the block's output for a batch of windows ``h``; ``load``/``release``:
    bring a block onto the compute device and back. ``hidden``: block 0's inputs (batches); they are propagated
    through the dense blocks (the list is not modified).
    """
    ratios = []
    for index, block in enumerate(blocks):
        load(index, block)
        modules = layers_of(index, block)
        norms = {name: ColumnNorms(weight_of(mod).shape[1], weight_of(mod).device) for name, mod in modules.items()}
        handles = [mod.register_forward_pre_hook(lambda _m, args, _n=name: norms[_n].add(args[0].detach()))
                   for name, mod in modules.items()]
        try:
            with torch.no_grad():
                hidden = [forward(index, block, h) for h in hidden]
        finally:
            for handle in handles:
                handle.remove()
        if modules:
            scores = [wanda_score(weight_of(mod), norms[name].sq) for name, mod in modules.items()]
            ratios.append(outlier_ratio(scores, m))
        else:
            ratios.append(float("nan"))
        release(index, block)
    return ratios
