"""OWQ (Lee et al., 2024): a few input columns of each layer kept in 16 bits, GPTQ on the rest.

A column's sensitivity is ``H_jj * ||W_:,j - Q(W_:,j)||^2`` (the Hessian diagonal of the layer's inputs times the
column's rounding error on the layer's grid, the paper's definition): the output error rounding that column alone
adds. The ``k`` most sensitive columns are kept; the grid of each row (or group) is fitted on the other columns only,
and the GPTQ sweep visits the kept columns last, so the rounding errors of all the others are compensated into them
before they are stored (rounded to 16 bits, which is all they lose). Their codes on the grid are the zero points, so
the packed grid alone decodes them to 0 and a runtime adds ``x[:, kept] @ values^T``.
"""

from __future__ import annotations

import math

import torch

from lmshrink.core.grids import GridSpec, fake_quantize
from lmshrink.core.results import OutlierQuantResult
from lmshrink.methods.quant.gptq import GridRule
from lmshrink.methods.solver import Sweep, solve_columns

VALUE_BITS = 16


def kept_column_count(in_features: int, extra_bits: float | None, fraction: float | None) -> int:
    """How many input columns a layer keeps: ``round(fraction * in)``, or the fewest whose 16-bit values cost at
    least ``extra_bits`` per weight of the layer, ``ceil(extra_bits * in / 16)``; at most ``in - 1``."""
    if fraction is not None:
        count = round(fraction * in_features)
    else:
        count = math.ceil(extra_bits * in_features / VALUE_BITS - 1e-9)
    return max(0, min(count, in_features - 1))


def column_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """``H_jj * ||W_:,j - Q(W_:,j)||^2`` per input column, ``Q`` rounding to nearest on the layer's grid (its clip
    search weighted by the Hessian diagonal, as RTN does)."""
    diagonal = hessian.diagonal().float()
    weight = weight.float()
    rounded = fake_quantize(weight, spec, diagonal if spec.clip_search else None)
    return diagonal * (weight - rounded).square().sum(dim=0)


class OutlierRule(GridRule):
    """GPTQ's rounding, except for the kept columns: the grids are fitted with them left out (as zeros, which every
    range holds anyway), their codes are the zero points and their values are only rounded to ``value_dtype``."""

    def __init__(self, spec: GridSpec, kept: torch.Tensor, value_dtype: torch.dtype):
        super().__init__(spec, static_groups=True, clip_weighted=True)
        self.kept = kept
        self.value_dtype = value_dtype

    def start(self, sweep: Sweep) -> None:
        kept = self.kept.to(sweep.weight.device)
        kept = kept if sweep.perm is None else kept[sweep.perm]
        weights, diagonal = sweep.weight[:, kept].clone(), sweep.hessian_diag[kept].clone()
        sweep.weight[:, kept] = 0.0
        sweep.hessian_diag[kept] = 0.0
        try:
            super().start(sweep)
        finally:
            sweep.weight[:, kept] = weights
            sweep.hessian_diag[kept] = diagonal
        self.kept_sweep = kept.tolist()

    def decide(self, sweep: Sweep, col: int, w: torch.Tensor) -> torch.Tensor:
        if self.kept_sweep[col]:
            self.codes[:, col] = self.zero[:, self.sweep_groups[col]].to(torch.uint8)
            return w.to(self.value_dtype).float()
        return super().decide(sweep, col, w)


def owq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, kept_columns: int, *,
                 damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True,
                 value_dtype: torch.dtype = torch.float16) -> OutlierQuantResult:
    """OWQ on ``weight`` (``[out, in]``) with input Hessian ``hessian``: the ``kept_columns`` most sensitive columns
    kept in ``value_dtype``, the others rounded onto ``spec``'s grid by GPTQ (act-order among them with
    ``act_order``), the kept ones swept last."""
    columns = weight.shape[1]
    sensitivity = column_sensitivity(weight, hessian, spec)
    ranked = torch.argsort(sensitivity, descending=True, stable=True)
    kept_order = ranked[:kept_columns]
    kept = torch.zeros(columns, dtype=torch.bool, device=sensitivity.device)
    kept[kept_order] = True
    rest = torch.nonzero(~kept).squeeze(1)
    if act_order:
        rest = rest[torch.argsort(hessian.diagonal()[rest], descending=True, stable=True)]
    order = torch.cat([rest, kept_order])
    rule = OutlierRule(spec, kept, value_dtype)
    result = solve_columns(weight, hessian, rule, damp_percent=damp_percent, block_size=block_size, order=order)
    codes = rule.codes[:, torch.argsort(result.perm)]
    chosen = torch.sort(kept_order).values
    values = result.weight[:, chosen].to(value_dtype)
    info = {"method": "owq", **result.info(), "act_order": act_order, "static_groups": True,
            "kept_columns": int(kept_columns), "kept_sensitivity_share": float(
                sensitivity[kept_order].sum() / sensitivity.sum()) if float(sensitivity.sum()) > 0 else 0.0}
    return OutlierQuantResult(codes=codes, scale=rule.scale, zero=rule.zero.to(torch.uint8), g_idx=None,
                              weight=result.weight, spec=spec, rel_output_error=result.rel_output_error, info=info,
                              columns=chosen.to(torch.int64), values=values)


def solve_owq(stage, job):
    """The ``owq`` stage on one layer (with ``fp_target``, on the asymmetric target, like GPTQ)."""
    from lmshrink.core.errors import LmshrinkError
    from lmshrink.methods.layer import solve_layer
    from lmshrink.methods.quant.solve import PRUNED
    from lmshrink.models.adapters import linear_dims, linear_weight

    if PRUNED in job.state:
        raise LmshrinkError(f"layer {job.name} was pruned by an earlier stage, and owq does not keep pruned zeros",
                            fix="quantize pruned layers with gptq or rtn, or drop the pruning stage")
    in_features = linear_dims(job.module)[1]
    count = kept_column_count(in_features, stage.extra_bits, stage.fraction)
    dtype = linear_weight(job.module).dtype
    value_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16

    def solve(weight, hessian):
        return owq_quantize(weight, hessian, stage.grid(), count, damp_percent=stage.damp_percent,
                            block_size=stage.block_size, act_order=stage.act_order, value_dtype=value_dtype)

    return solve_layer(stage, job, solve)
