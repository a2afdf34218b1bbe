"""Rank allocation under a parameter budget: which rank each layer gets so that the factorized layers together keep
a given fraction of their parameters, from each layer's measured error at every rank.

The cost of a rank-r layer is ``r (m + n)`` numbers; its error ``e(r)`` is the relative output error of its
truncation on the calibration inputs (``factorize.truncation_errors``). Starting from rank 1 everywhere, the
allocation raises one rank at a time where the error drops most per parameter spent, until the budget is used
(a greedy solution of the knapsack; exact for convex error curves, which the whitened truncation's are). A layer
never reaches the break-even rank (its factors would hold as many numbers as its dense weight).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.methods.lowrank.factorize import max_rank


@dataclass
class LayerCurve:
    """One layer's error at each rank: ``errors[r]`` for r = 0..min(out, in)."""

    name: str
    out_features: int
    in_features: int
    errors: torch.Tensor


def allocate_ranks(layers: list[LayerCurve], ratio: float) -> dict[str, int]:
    """Ranks that keep at most ``1 - ratio`` of the layers' parameters in total and minimise the sum of their
    relative output errors (greedily); ``name -> rank``."""
    dense = sum(layer.out_features * layer.in_features for layer in layers)
    budget = (1.0 - ratio) * dense
    ranks = {layer.name: 1 for layer in layers}
    spent = sum(layer.out_features + layer.in_features for layer in layers)
    if spent > budget:
        raise LmshrinkError(f"a budget of {1 - ratio:.0%} of the parameters cannot give every layer rank 1",
                            fix="use a smaller ratio")
    by_name = {layer.name: layer for layer in layers}
    caps = {layer.name: max_rank(layer.out_features, layer.in_features) for layer in layers}
    errors = {layer.name: layer.errors.double().tolist() for layer in layers}
    heap: list[tuple[float, int, str]] = []

    def push(name: str, order: int) -> None:
        rank = ranks[name]
        if rank + 1 > caps[name]:
            return
        layer = by_name[name]
        gain = (errors[name][rank] - errors[name][rank + 1]) / (layer.out_features + layer.in_features)
        heapq.heappush(heap, (-gain, order, name))

    for order, layer in enumerate(layers):
        push(layer.name, order)
    order_of = {layer.name: order for order, layer in enumerate(layers)}
    while heap:
        _, _, name = heapq.heappop(heap)
        layer = by_name[name]
        cost = layer.out_features + layer.in_features
        if spent + cost > budget:
            continue  # this layer's next rank does not fit; a narrower layer's may
        ranks[name] += 1
        spent += cost
        push(name, order_of[name])
    return ranks
