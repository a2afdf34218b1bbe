"""Rank allocation under a parameter budget: which rank each layer gets so that the factorized layers together keep
a given fraction of their parameters, from each layer's measured error at every rank.

The cost of a rank-r layer is ``r (m + n)`` numbers; its error ``e(r)`` is the relative output error of its
truncation on the calibration inputs (``factorize.truncation_errors``). Starting from rank 1 everywhere, the
allocation takes, one at a time, the step where the error drops most per parameter spent, until no step fits the
budget (a greedy solution of the knapsack; exact for convex error curves, which the whitened truncation's are). A
layer's steps are one more rank (never up to the break-even rank, where its factors would hold as many numbers as its
dense weight) or, from any rank, back to its dense weight.
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


def allocate_ranks(layers: list[LayerCurve], ratio: float, allow_dense: bool = True) -> dict[str, int | None]:
    """Ranks that keep at most ``1 - ratio`` of the layers' parameters in total and minimise the sum of their
    relative output errors (greedily); ``name -> rank``, or None for a layer better left dense: with
    ``allow_dense``, a layer at rank r may step back to its dense weight (error 0) for the ``m n - r (m + n)``
    numbers that costs. Steps that lower no error are not taken, so the budget may be left partly unspent."""
    dense = sum(layer.out_features * layer.in_features for layer in layers)
    budget = (1.0 - ratio) * dense
    ranks: dict[str, int | None] = {layer.name: 1 for layer in layers}
    spent = sum(layer.out_features + layer.in_features for layer in layers)
    if spent > budget:
        raise LmshrinkError(f"a budget of {1 - ratio:.0%} of the parameters cannot give every layer rank 1",
                            fix="use a smaller ratio")
    by_name = {layer.name: layer for layer in layers}
    caps = {layer.name: max_rank(layer.out_features, layer.in_features) for layer in layers}
    errors = {layer.name: layer.errors.double().tolist() for layer in layers}
    order_of = {layer.name: order for order, layer in enumerate(layers)}
    version = {layer.name: 0 for layer in layers}  # heap entries of an older rank are stale
    heap: list[tuple[float, int, str, bool, int]] = []

    def push(name: str) -> None:
        """The layer's candidate steps from its current rank: one more rank (while it gains), and, with
        ``allow_dense``, straight to its dense weight (error 0), which a flat error curve may only reach so."""
        rank, layer = ranks[name], by_name[name]
        if rank is None:
            return
        width = layer.out_features + layer.in_features
        if rank < caps[name] and errors[name][rank] > errors[name][rank + 1]:
            gain = (errors[name][rank] - errors[name][rank + 1]) / width
            heapq.heappush(heap, (-gain, order_of[name], name, False, version[name]))
        if allow_dense and errors[name][rank] > 0:
            cost = layer.out_features * layer.in_features - rank * width
            heapq.heappush(heap, (-errors[name][rank] / cost, order_of[name], name, True, version[name]))

    for layer in layers:
        push(layer.name)
    while heap:
        _, _, name, dense, seen = heapq.heappop(heap)
        if seen != version[name]:
            continue
        layer = by_name[name]
        width = layer.out_features + layer.in_features
        cost = layer.out_features * layer.in_features - ranks[name] * width if dense else width
        if spent + cost > budget:
            continue  # this step does not fit; a cheaper one may
        ranks[name] = None if dense else ranks[name] + 1
        spent += cost
        version[name] += 1
        push(name)
    return ranks
