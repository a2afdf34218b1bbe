"""Width pruning of one decoder block: attention heads and FFN channels scored, removed from every linear that
produces or reads them, and the reading linear (o_proj, down_proj) repaired.

A *unit* is what is removed at once: an FFN channel (a row of gate and up, a column of down), a query head (its
rows of q and its columns of o; grouped-query attention keeps k and v and removes the same number of query heads
from every KV group: ``gqa: queries``), or a whole KV group (its k and v rows, the rows of its query heads and
their columns of o: ``gqa: groups``). Without grouped-query attention a head is a group of one.

Scores (the lower, the sooner removed), from the reading linear's weight ``W`` and its calibration inputs ``x``:

* ``magnitude``: the sum of squares of every weight the unit owns;
* ``activation`` (Minitron): mean ``|x_j|`` of a channel; the root mean square of a head's outputs;
* ``fluctuation`` (FLAP): ``Var(x_j) * ||W_:,j||^2`` summed over the unit's columns: the output variance the unit
  carries, what is lost once its mean is compensated in the bias;
* ``second-order`` (ZipLM / optimal brain surgeon): ``tr(W_S (H^-1_SS)^-1 W_S^T)`` for the unit's columns S and
  the input Hessian H: the output error of removing the unit when the other columns are refit.

Repair of the reading linear, for the kept columns K (removed R), on the calibration statistics:

* ``bias`` (FLAP): ``b += W_:,R E[x_R]``;
* ``lstsq``: ``W'_K = argmin E||W x - W'_K x_K||^2 = W H_:K (H_KK)^-1`` (damped);
* ``lstsq+bias``: the same with a bias term (``[x_K, 1]`` as inputs): the best affine refit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.models.adapters import linear_dims, linear_weight
from lmshrink.models.structure import (
    WidthLayout,
    head_counts,
    head_dim,
    set_ffn_width,
    set_head_counts,
    slice_linear,
)

IMPORTANCES = ("magnitude", "activation", "fluctuation", "second-order")
REPAIRS = ("none", "bias", "lstsq", "lstsq+bias")


@dataclass
class Units:
    """The removable units of one kind (``heads`` or ``channels``) in a block.

    ``columns``: per unit, the reading linear's input columns; ``rows``: per producing linear, per unit, its output
    rows; ``groups``: for ``gqa: queries``, the units (query heads) of each KV group (the same number is removed
    from each); ``cost``: parameters per unit (weights, and bias entries, counting those the repair will add).
    """

    kind: str
    reader: str
    columns: list[torch.Tensor]
    rows: dict[str, list[torch.Tensor]]
    groups: list[list[int]] | None = None
    cost: int = 0
    step_units: int = 1  # units removed per step (queries mode: one per KV group)

    @property
    def count(self) -> int:
        return len(self.columns)

    def steps(self) -> int:
        """How many steps of removal exist (one unit must stay: at least one step of units is kept)."""
        return self.count // self.step_units


def _range(start: int, length: int) -> torch.Tensor:
    return torch.arange(start, start + length, dtype=torch.long)


def head_units(block: nn.Module, layout: WidthLayout, gqa: str) -> Units:
    """The block's attention heads as units (``gqa``: ``groups`` or ``queries``)."""
    if not layout.per_layer_heads:
        raise LmshrinkError(f"the attention of a {type(block).__name__} block reads its head count from the model's "
                            "shared config, so its heads cannot be removed block by block",
                            fix="remove FFN channels only (structures: [channels]) or blocks (method: prune-depth)")
    dim = head_dim(block, layout)
    heads, kv = head_counts(block, layout)
    per_group = heads // kv
    if gqa == "queries" and per_group > 1:
        columns = [_range(h * dim, dim) for h in range(heads)]
        rows = {layout.q: [_range(h * dim, dim) for h in range(heads)]}
        groups = [[g * per_group + i for i in range(per_group)] for g in range(kv)]
        return Units("heads", layout.o, columns, rows, groups=groups, step_units=kv)
    columns = [_range(g * per_group * dim, per_group * dim) for g in range(kv)]
    if layout.fused:  # GPT-2: [q | k | v], each heads * dim wide, no grouped-query attention
        rows = {layout.fused: [torch.cat([_range(part * heads * dim + g * dim, dim) for part in range(3)])
                               for g in range(kv)]}
    else:
        rows = {layout.q: [_range(g * per_group * dim, per_group * dim) for g in range(kv)],
                layout.k: [_range(g * dim, dim) for g in range(kv)],
                layout.v: [_range(g * dim, dim) for g in range(kv)]}
    return Units("heads", layout.o, columns, rows)


def channel_units(block: nn.Module, layout: WidthLayout) -> Units:
    """The block's FFN channels as units."""
    width = linear_dims(block.get_submodule(layout.ffn_out))[1]
    columns = [torch.tensor([j]) for j in range(width)]
    if layout.fused_ffn:
        rows = {layout.fused_ffn: [torch.tensor([j, width + j]) for j in range(width)]}
    else:
        rows = {name: [torch.tensor([j]) for j in range(width)] for name in layout.ffn_in}
    return Units("channels", layout.ffn_out, columns, rows)


def unit_cost(block: nn.Module, units: Units, new_biases: set[str]) -> int:
    """Parameters one unit holds: its rows of each producer (with a bias entry where the producer has or will get
    a bias) and its columns of the reader (the units of a kind all have the same size)."""
    cost = 0
    for name, per_unit in units.rows.items():
        module = block.get_submodule(name)
        has_bias = module.bias is not None or name in new_biases
        cost += len(per_unit[0]) * (linear_dims(module)[1] + int(has_bias))
    cost += len(units.columns[0]) * linear_dims(block.get_submodule(units.reader))[0]
    return cost * units.step_units


# -- statistics -----------------------------------------------------------------------------------------------------


@dataclass
class InputStats:
    """The reader's input statistics, per token: ``second`` E[x x^T] (or None), ``mean`` E[x], ``var`` Var(x_j),
    ``mean_abs`` E|x_j|, ``mean_sq`` E[x_j^2]."""

    mean: torch.Tensor
    var: torch.Tensor
    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    second: torch.Tensor | None = None
    # Stat.FP_TARGET: E[x x~^T] and E[x x^T], x: the same inputs in the unpruned model, x~: these
    cross: torch.Tensor | None = None
    reference_second: torch.Tensor | None = None

    @classmethod
    def from_stats(cls, stats) -> "InputStats":
        channels = stats.channels
        tokens = float(channels.tokens)
        mean = channels.sum / tokens
        mean_sq = channels.sq_sum / tokens
        second = cross = reference = None
        if stats.hessian_accumulator is not None:
            second = _per_token(stats.hessian, stats.hessian_accumulator)
        if stats.fp_target is not None:
            cross = _per_token(stats.fp_target.cross.cross, stats.fp_target.cross)
            reference = _per_token(stats.fp_target.reference.hessian, stats.fp_target.reference)
        return cls(mean=mean, var=(mean_sq - mean.square()).clamp_min(0), mean_abs=channels.abs_sum / tokens,
                   mean_sq=mean_sq, second=second, cross=cross, reference_second=reference)


def _per_token(matrix: torch.Tensor, accumulator) -> torch.Tensor:
    """An accumulated ``(2 / nsamples) sum x y^T`` as the mean over tokens ``E[x y^T]``."""
    return matrix * (accumulator.nsamples / (2.0 * accumulator.tokens))


def _damped_inverse(second: torch.Tensor, damp: float) -> torch.Tensor:
    h = second.double().clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag.add_(damp * float(diag.mean()))
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def scores(block: nn.Module, units: Units, stats: InputStats, importance: str, damp: float) -> torch.Tensor:
    """One score per unit (float64); the lowest are removed first."""
    weight = linear_weight(block.get_submodule(units.reader)).double()
    if importance == "magnitude":
        column_sq = weight.square().sum(dim=0)
        out = torch.stack([column_sq[c].sum() for c in units.columns])
        for name, per_unit in units.rows.items():
            row_sq = linear_weight(block.get_submodule(name)).double().square().sum(dim=1)
            out += torch.stack([row_sq[r].sum() for r in per_unit])
        return out
    if importance == "activation":
        if units.kind == "channels":
            return torch.stack([stats.mean_abs[c].double().sum() for c in units.columns])
        return torch.stack([stats.mean_sq[c].double().sum().sqrt() for c in units.columns])
    if importance == "fluctuation":
        per_column = stats.var.double() * weight.square().sum(dim=0)
        return torch.stack([per_column[c].sum() for c in units.columns])
    if importance == "second-order":
        if stats.second is None:
            raise ValueError("second-order scores need the reader's input Hessian")
        inverse = _damped_inverse(stats.second, damp)
        if all(len(c) == 1 for c in units.columns):
            return weight.square().sum(dim=0) / inverse.diagonal()
        out = []
        for c in units.columns:
            w = weight[:, c]
            out.append(torch.trace(w @ torch.linalg.solve(inverse[c][:, c], w.t())))
        return torch.stack(out)
    raise ValueError(f"unknown importance {importance!r}")


def steps_scores(units: Units, unit_scores: torch.Tensor) -> torch.Tensor:
    """The score of each successive removal step: the step's units' scores summed (queries mode: the next-lowest
    head of every KV group), in removal order (non-decreasing)."""
    if units.groups is None:
        return unit_scores.sort().values
    per_group = torch.stack([unit_scores[g].sort().values for g in units.groups])  # [kv, per_group]
    return per_group.sum(dim=0)


def choose(units: Units, unit_scores: torch.Tensor, steps: int) -> list[int]:
    """The units removed by ``steps`` steps of removal (lowest scores first)."""
    if steps <= 0:
        return []
    if units.groups is None:
        return sorted(unit_scores.argsort()[: steps * units.step_units].tolist())
    removed = []
    for group in units.groups:
        order = unit_scores[group].argsort()[:steps].tolist()
        removed.extend(group[i] for i in order)
    return sorted(removed)


# -- removal and repair -----------------------------------------------------------------------------------------------


def refit(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, stats: InputStats, repair: str,
          damp: float) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The reader's new ``[out, |keep|]`` weight and bias for its kept input columns; and a record with the
    relative output error ``E||V [x;1] - V' [x;1]||^2 / E||V [x;1]||^2`` before and after the repair (V = [W, b])."""
    w = weight.double()
    n = w.shape[1]
    removed = torch.ones(n, dtype=torch.bool)
    removed[keep] = False
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    mean = stats.mean.double()
    new_w = w[:, keep].clone()
    new_b = b.clone()
    if repair == "bias":
        new_b = b + w[:, removed] @ mean[removed]
    elif repair in ("lstsq", "lstsq+bias"):
        if stats.second is None:
            raise ValueError("a least-squares repair needs the reader's input Hessian")
        second = stats.second.double()
        h_kk = second[keep][:, keep]
        # the target is W x on these inputs, or (fp_target) on the unpruned model's: E[x~_K x^T] W^T
        rhs = (stats.cross.double()[:, keep].t() if stats.cross is not None else second[keep]) @ w.t()  # [|K|, out]
        if repair == "lstsq+bias":
            size = len(keep)
            system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            system[:size, :size] = h_kk
            system[:size, size] = mean[keep]
            system[size, :size] = mean[keep]
            system[size, size] = 1.0
            rhs = torch.cat([rhs, (mean @ w.t()).unsqueeze(0)])
        else:
            system = h_kk.clone()
        diag = system.diagonal()[: len(keep)]
        diag.add_(damp * float(diag.mean().clamp_min(1e-12)))
        solution = torch.linalg.solve(system, rhs)  # [|K| (+1), out]
        new_w = solution[: len(keep)].t().contiguous()
        if repair == "lstsq+bias":
            new_b = b + solution[len(keep)]
    record = {}
    if stats.cross is not None and stats.reference_second is not None and stats.second is not None:
        reference, cross, second = (stats.reference_second.double(), stats.cross.double(), stats.second.double())
        base = float(torch.einsum("oi,ij,oj->", w, reference, w))

        def aimed(kept_w):  # E||W x - W'_K x~_K||^2 / E||W x||^2
            cross_term = float(torch.einsum("oi,ij,oj->", w, cross[:, keep], kept_w))
            own = float(torch.einsum("oi,ij,oj->", kept_w, second[keep][:, keep], kept_w))
            return max(base - 2 * cross_term + own, 0.0) / max(base, 1e-30)

        record = {"rel_output_error_before_repair": aimed(w[:, keep]), "rel_output_error": aimed(new_w),
                  "error_target": "the unpruned model's outputs (fp_target)"}
    elif stats.second is not None:
        augmented = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        augmented[:n, :n] = stats.second.double()
        augmented[:n, n] = mean
        augmented[n, :n] = mean
        augmented[n, n] = 1.0
        full = torch.cat([w, b.unsqueeze(1)], dim=1)
        base = float(torch.einsum("oi,ij,oj->", full, augmented, full))

        def error(kept_w, kept_b):
            other = torch.zeros_like(full)
            other[:, keep] = kept_w
            other[:, n] = kept_b
            diff = full - other
            return float(torch.einsum("oi,ij,oj->", diff, augmented, diff)) / max(base, 1e-30)

        record = {"rel_output_error_before_repair": error(w[:, keep], b), "rel_output_error": error(new_w, new_b)}
    return new_w.float(), (new_b.float() if (bias is not None or repair in ("bias", "lstsq+bias")) else None), record


def remove(block: nn.Module, layout: WidthLayout, units: Units, removed: list[int], stats: InputStats | None,
           repair: str, damp: float, bias_companions: list[str] | None) -> dict:
    """Remove ``removed`` units from the block in place (producers' rows, the reader's columns) and repair the
    reader; returns its record (kept and removed units, output errors)."""
    gone = set(removed)
    keep_units = [u for u in range(units.count) if u not in gone]
    if not keep_units:
        raise LmshrinkError(f"removing every {units.kind[:-1]} of a block leaves nothing", fix="prune less")
    counts = None
    if units.kind == "heads":
        heads, kv = head_counts(block, layout)
        if units.groups is not None:  # queries: k and v stay
            counts = (len(keep_units), kv)
        else:
            counts = (len(keep_units) * heads // kv, len(keep_units))
    keep_columns = torch.cat([units.columns[u] for u in keep_units]).sort().values
    for name, per_unit in units.rows.items():
        slice_linear(block.get_submodule(name), rows=torch.cat([per_unit[u] for u in keep_units]).sort().values)
    reader = block.get_submodule(units.reader)
    weight = linear_weight(reader).float()
    bias = reader.bias.detach().float() if reader.bias is not None else None
    record: dict = {}
    if repair == "none" or stats is None:
        new_w, new_b = weight[:, keep_columns], bias
    else:
        new_w, new_b, record = refit(weight, bias, keep_columns, stats, repair, damp)
    added_bias = bias is None and new_b is not None
    slice_linear(reader, weight=new_w, bias=new_b)
    if added_bias:  # the config's flag gives these projections a bias too: zeros, so nothing changes
        for name in bias_companions or []:
            module = block.get_submodule(name)
            if module.bias is None:
                slice_linear(module, bias=torch.zeros(linear_dims(module)[0]))
    if counts is not None:
        set_head_counts(block, layout, *counts)
    else:
        set_ffn_width(block, layout, len(keep_columns))
    record["kept"] = len(keep_units)
    record["removed"] = len(removed)
    return record
