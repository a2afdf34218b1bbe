"""The allocator: one option per layer, minimising the total cost with the total weight (stored bytes, latency)
at most a budget. This is the multiple-choice knapsack problem; it is solved exactly.

Method: dynamic programming over the layers, keeping only states (weight so far, cost so far) that no other state
dominates (no more weight and no more cost), and dropping states whose cost plus a lower bound of the best
completion already exceeds a known feasible solution. The bound is the linear-programming relaxation of the
remaining layers (each layer's lower convex hull of (weight, cost), upgrades taken greedily by cost saved per unit
of weight, the last one fractionally), which is tight when layers are many; the known solution is that greedy
rounded down. Both prunings keep an optimal state, so the answer is optimal (tests check it against brute force).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class InfeasibleBudget(ValueError):
    """No choice fits: ``minimum`` is the smallest total weight any choice reaches."""

    def __init__(self, minimum: float, budget: float):
        super().__init__(f"the smallest total weight any choice reaches is {minimum}, over the budget {budget}")
        self.minimum = minimum
        self.budget = budget


@dataclass
class Allocation:
    choice: list[int]  # per layer, the index of its option in the caller's list
    cost: float
    weight: float
    lower_bound: float  # the LP relaxation's optimum (cost >= this; equal when no layer is split)
    states: int  # the most states the search held at once


def _candidates(costs, weights):
    """Per layer: (weight, cost, option index) of the options it can take, undominated, by increasing weight."""
    items = []
    for layer, (layer_costs, layer_weights) in enumerate(zip(costs, weights)):
        options = sorted((float(w), float(c), j) for j, (c, w) in enumerate(zip(layer_costs, layer_weights))
                         if c is not None and w is not None and math.isfinite(c) and math.isfinite(w))
        if not options:
            raise ValueError(f"layer {layer} has no option it can take")
        kept = []
        for w, c, j in options:
            if not kept or c < kept[-1][1]:
                if kept and kept[-1][0] == w:
                    kept.pop()
                kept.append((w, c, j))
        items.append(kept)
    return items


def _hull_points(options) -> list[int]:
    """Positions (into ``options``, sorted by weight) of the lower convex hull of (weight, cost), lightest first."""
    hull = [0]
    for position in range(1, len(options)):
        point = options[position]
        while len(hull) >= 2:
            (w1, c1, _), (w2, c2, _) = options[hull[-2]], options[hull[-1]]
            # drop the middle point when it lies on or above the line from hull[-2] to the new point
            if (c2 - c1) * (point[0] - w1) >= (point[1] - c1) * (w2 - w1):
                hull.pop()
            else:
                break
        hull.append(position)
    return hull


def _hull(options) -> list[tuple[float, float]]:
    """The hull's segments (weight added, cost added), slopes rising."""
    points = [options[p] for p in _hull_points(options)]
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(points, points[1:])]


class _SuffixBound:
    """LP lower bounds of the best cost of layers ``i..n-1`` within a remaining weight, for every ``i``."""

    def __init__(self, items):
        n = len(items)
        self.base_weight = np.zeros(n + 1)
        self.base_cost = np.zeros(n + 1)
        self.cum_weight: list[np.ndarray] = [np.zeros(1)] * (n + 1)
        self.cum_cost: list[np.ndarray] = [np.zeros(1)] * (n + 1)
        self.slope: list[np.ndarray] = [np.zeros(1)] * (n + 1)
        segments: list[tuple[float, float]] = []
        for i in range(n - 1, -1, -1):
            self.base_weight[i] = self.base_weight[i + 1] + items[i][0][0]
            self.base_cost[i] = self.base_cost[i + 1] + items[i][0][1]
            segments = sorted(segments + _hull(items[i]), key=lambda s: s[1] / s[0])
            dw = np.array([s[0] for s in segments])
            dc = np.array([s[1] for s in segments])
            self.cum_weight[i] = np.concatenate([[0.0], np.cumsum(dw)])
            self.cum_cost[i] = np.concatenate([[0.0], np.cumsum(dc)])
            self.slope[i] = np.concatenate([dc / dw, [0.0]]) if len(dw) else np.zeros(1)

    def __call__(self, i: int, remaining: np.ndarray) -> np.ndarray:
        room = remaining - self.base_weight[i]
        cum_w, cum_c, slope = self.cum_weight[i], self.cum_cost[i], self.slope[i]
        k = np.searchsorted(cum_w, np.maximum(room, 0.0), side="right") - 1
        k = np.minimum(k, len(cum_w) - 1)
        bound = self.base_cost[i] + cum_c[k] + (np.maximum(room, 0.0) - cum_w[k]) * slope[np.minimum(k, len(slope) - 1)]
        bound = np.where(k >= len(cum_w) - 1, self.base_cost[i] + cum_c[-1], bound)
        return np.where(room < 0, np.inf, bound)


def _greedy(items, budget: float) -> float:
    """The cost of a feasible choice: every layer at its lightest option, then hull upgrades by most cost saved
    per unit of weight, each taken when it fits (a layer's later upgrades only after its earlier ones)."""
    upgrades = []
    for layer, options in enumerate(items):
        points = _hull_points(options)
        for step, (a, b) in enumerate(zip(points, points[1:])):
            dw, dc = options[b][0] - options[a][0], options[b][1] - options[a][1]
            upgrades.append((dc / dw, layer, step, dw, dc))
    weight = sum(o[0][0] for o in items)
    cost = sum(o[0][1] for o in items)
    done = [0] * len(items)
    for _, layer, step, dw, dc in sorted(upgrades):
        if done[layer] == step and weight + dw <= budget:
            weight, cost, done[layer] = weight + dw, cost + dc, step + 1
    return cost


def allocate(costs, weights, budget: float) -> Allocation:
    """Choose one option per layer: ``costs[i][j]`` and ``weights[i][j]`` of option ``j`` on layer ``i`` (None or
    inf: layer ``i`` cannot take option ``j``), minimising the summed cost with the summed weight <= ``budget``.

    Raises ``InfeasibleBudget`` (with the smallest reachable weight) when nothing fits."""
    items = _candidates(costs, weights)
    n = len(items)
    lightest = sum(o[0][0] for o in items)
    if lightest > budget:
        raise InfeasibleBudget(lightest, budget)
    bound = _SuffixBound(items)
    incumbent = _greedy(items, budget)
    tolerance = 1e-9 * max(1.0, abs(incumbent))

    state_weight = np.zeros(1)
    state_cost = np.zeros(1)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    largest = 1
    for i, options in enumerate(items):
        w = np.array([o[0] for o in options])
        c = np.array([o[1] for o in options])
        new_weight = (state_weight[:, None] + w[None, :]).ravel()
        new_cost = (state_cost[:, None] + c[None, :]).ravel()
        parent = np.repeat(np.arange(len(state_weight)), len(options))
        pick = np.tile(np.arange(len(options)), len(state_weight))
        keep = new_cost + bound(i + 1, budget - new_weight) <= incumbent + tolerance
        new_weight, new_cost, parent, pick = new_weight[keep], new_cost[keep], parent[keep], pick[keep]
        order = np.lexsort((new_cost, new_weight))
        new_weight, new_cost, parent, pick = new_weight[order], new_cost[order], parent[order], pick[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], new_cost[:-1]]))
        undominated = new_cost < best_before
        state_weight, state_cost = new_weight[undominated], new_cost[undominated]
        parents.append(parent[undominated])
        picks.append(pick[undominated])
        largest = max(largest, len(state_weight))
    best = int(np.argmin(state_cost))
    choice = [0] * n
    index = best
    for i in range(n - 1, -1, -1):
        choice[i] = items[i][int(picks[i][index])][2]
        index = int(parents[i][index])
    return Allocation(choice=choice, cost=float(state_cost[best]), weight=float(state_weight[best]),
                      lower_bound=float(bound(0, np.array([float(budget)]))[0]), states=largest)
