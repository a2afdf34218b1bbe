"""GPTQ/OPTQ: round columns to the grid one by one and compensate the error on the columns not yet rounded."""

from __future__ import annotations

import torch

from lmshrink.core.grids import GridSpec, fit_grid_float, fit_groups_float, group_index
from lmshrink.core.results import QuantResult
from lmshrink.methods.quant.refit import refit_scales
from lmshrink.methods.solver import ColumnRule, Sweep, solve_columns


class GridRule(ColumnRule):
    """The GPTQ decision: round each column to its group's grid, recording codes and grid parameters.

    static_groups (or per-channel grids): every group's parameters are fitted before the sweep on the original
    weights (dead inputs zeroed), groups being contiguous in the original column order, so act-order does not
    change which columns share a scale. Otherwise (the GPTQ reference default) a group is fitted on the
    up-to-date weights when the sweep reaches its first column, groups being contiguous in sweep order.
    clip_weighted: weight the clip search by the Hessian diagonal. fit_mask: optional bool ``[out, in]`` tensor in
    sweep order (read when a dynamic group is fitted, so it may be filled during the sweep): weights marked in it are
    fitted as 0 (joint prune + quantize: pruned weights become exact zeros, so only the kept ones shape the grid).

    grid: a fixed grid ``(scale [out, groups], zero [out, groups], g_idx [in])`` in the original column order (e.g. a
    stored ``QuantResult``'s): nothing is fitted, the sweep only chooses the codes on it (re-quantizing a layer whose
    weights changed, keeping its scales, zeros and group index).
    """

    def __init__(self, spec: GridSpec, static_groups: bool = True, clip_weighted: bool = False,
                 grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 fit_mask: torch.Tensor | None = None):
        self.spec = spec
        self.fit_mask = fit_mask
        self.static_groups = static_groups or spec.group_size == -1 or grid is not None
        self.clip_weighted = clip_weighted
        self.grid = grid

    def start(self, sweep: Sweep) -> None:
        weight = sweep.weight
        rows, columns = weight.shape
        self.width = self.spec.group_width(columns)
        self.codes = torch.empty(rows, columns, dtype=torch.uint8, device=weight.device)
        perm = sweep.perm
        inverse = None if perm is None else torch.argsort(perm)
        if self.grid is not None:
            scale, zero, g_idx = self.grid
            if (scale.shape != zero.shape or scale.shape[0] != rows or tuple(g_idx.shape) != (columns,)
                    or int(g_idx.min()) < 0 or int(g_idx.max()) >= scale.shape[1]):
                raise ValueError(f"fixed grid (scale {tuple(scale.shape)}, zero {tuple(zero.shape)}, g_idx "
                                 f"{tuple(g_idx.shape)}) does not fit a [{rows}, {columns}] weight")
            self.scale = scale.to(weight.device, torch.float32)
            self.zero = zero.to(weight.device, torch.float32)
            self.g_idx = g_idx.to(weight.device, torch.long)
            sweep_groups = self.g_idx if perm is None else self.g_idx[perm]
        elif self.static_groups:
            original = weight if perm is None else weight[:, inverse]
            diag = None
            if self.clip_weighted:
                diag = sweep.hessian_diag if perm is None else sweep.hessian_diag[inverse]
            self.scale, self.zero = fit_groups_float(original, self.spec, diag)
            g_idx = group_index(columns, self.width, weight.device)
            self.g_idx = g_idx
            sweep_groups = g_idx if perm is None else g_idx[perm]
        else:
            n_groups = self.spec.num_groups(columns)
            self.scale = torch.empty(rows, n_groups, dtype=torch.float32, device=weight.device)
            self.zero = torch.empty_like(self.scale)
            sweep_groups = group_index(columns, self.width, weight.device)
            self.g_idx = sweep_groups if perm is None else sweep_groups[inverse]
        self.sweep_groups = sweep_groups.tolist()

    def decide(self, sweep: Sweep, col: int, w: torch.Tensor) -> torch.Tensor:
        group = self.sweep_groups[col]
        if not self.static_groups and col % self.width == 0:
            end = min(col + self.width, sweep.columns)
            diag = sweep.hessian_diag[col:end] if self.clip_weighted else None
            current = sweep.current(col, end)
            if self.fit_mask is not None:
                current = current.masked_fill(self.fit_mask[:, col:end], 0.0)
            self.scale[:, group], self.zero[:, group] = fit_grid_float(current, self.spec, diag)
        scale = self.scale[:, group]
        zero = self.zero[:, group]
        codes = torch.clamp(torch.round(w / scale) + zero, 0, self.spec.maxq)
        self.codes[:, col] = codes.to(torch.uint8)
        return (codes - zero) * scale

class MaskedRule(ColumnRule):
    """Weights in the mask become 0; the others are decided by ``grid`` (rounded onto it), or kept without one.

    mask: bool ``[out, in]`` in the original column order, or None for a mask a subclass fills during the sweep
    (``self.mask``, in sweep order). With a grid the masked weights get the code of 0.0 (the zero point), so the
    codes decode to exact zeros there, and group grids are fitted on the kept weights only.
    """

    def __init__(self, mask: torch.Tensor | None = None, grid: GridRule | None = None):
        self.fixed_mask = mask
        self.grid = grid

    def start(self, sweep: Sweep) -> None:
        rows, columns = sweep.weight.shape
        if self.fixed_mask is not None:
            mask = self.fixed_mask.to(sweep.weight.device, torch.bool)
            self.mask = mask if sweep.perm is None else mask[:, sweep.perm]
        else:
            self.mask = torch.zeros(rows, columns, dtype=torch.bool, device=sweep.weight.device)
        if self.grid is not None:
            self.grid.fit_mask = self.mask  # dynamic groups fit on the kept weights (the mask fills as it is chosen)
            self.grid.start(sweep)

    def decide(self, sweep: Sweep, col: int, w: torch.Tensor) -> torch.Tensor:
        pruned = self.mask[:, col]
        if self.grid is None:
            return w.masked_fill(pruned, 0.0)
        q = self.grid.decide(sweep, col, w)
        group = self.grid.sweep_groups[col]
        self.grid.codes[:, col] = torch.where(pruned, self.grid.zero[:, group].to(torch.uint8),
                                              self.grid.codes[:, col])
        return q.masked_fill(pruned, 0.0)

    def original_mask(self, perm: torch.Tensor | None) -> torch.Tensor:
        """The mask in the original column order."""
        return self.mask if perm is None else self.mask[:, torch.argsort(perm)]


def masked_quant_result(rule: MaskedRule, result, spec: GridSpec, info: dict) -> QuantResult:
    """The QuantResult of a masked sweep: codes in the original column order, the mask as ``pruned``."""
    grid = rule.grid
    codes = grid.codes if result.perm is None else grid.codes[:, torch.argsort(result.perm)]
    mask = rule.original_mask(result.perm)
    zeros = float((result.weight == 0).sum()) / result.weight.numel()
    info = {**info, **result.info(), "static_groups": grid.static_groups, "sparsity": zeros,
            "pruned_fraction": float(mask.sum()) / mask.numel()}
    return QuantResult(codes=codes, scale=grid.scale, zero=grid.zero.to(torch.uint8), g_idx=None,
                       weight=result.weight, spec=spec, rel_output_error=result.rel_output_error, info=info,
                       pruned=mask)



def gptq_keep_mask(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, spec: GridSpec,
                   damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True,
                   static_groups: bool = True, cholesky_dtype: torch.dtype = torch.float32) -> QuantResult:
    """GPTQ on a pruned layer that keeps its zeros: weights in ``mask`` (bool ``[out, in]``) stay exactly 0 (their
    code is the zero point), the others are rounded with error compensation as in ``gptq_quantize``.

    act-order needs static groups here (a permuted ``g_idx`` is not returned).
    """
    if act_order and not static_groups:
        raise ValueError("gptq_keep_mask supports act-order only with static groups")
    rule = MaskedRule(mask, GridRule(spec, static_groups=static_groups, clip_weighted=True))
    result = solve_columns(weight, hessian, rule, damp_percent=damp_percent, block_size=block_size,
                           act_order=act_order, cholesky_dtype=cholesky_dtype)
    return masked_quant_result(rule, result, spec, {"method": "gptq", "kept_mask": True})


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: GridSpec,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = True,
    clip_weighted: bool = True,
    cholesky_dtype: torch.dtype = torch.float32,
    refit: bool = False,
) -> QuantResult:
    """Quantize ``weight`` (``[out, in]``) with GPTQ given the layer's Hessian ``X^T X`` (``[in, in]``, fp32).

    act_order: quantize columns by decreasing Hessian diagonal (``desc_act``). static_groups: group grids fitted
    on the original weights before the sweep, so with act-order ``g_idx`` stays contiguous (returned as None);
    without static groups and with act-order ``g_idx`` is a real permuted map. clip_weighted: with
    ``spec.clip_search``, weight the clip search by the Hessian diagonal. refit: after the sweep, replace the
    group scales by the least-squares ones for the chosen codes (``refit.refit_scales``). ``info`` records the
    solver's loss, final damping, retries, dead inputs and time.
    """
    rule = GridRule(spec, static_groups=static_groups, clip_weighted=clip_weighted)
    result = solve_columns(weight, hessian, rule, damp_percent=damp_percent, block_size=block_size,
                           act_order=act_order, cholesky_dtype=cholesky_dtype)
    codes = rule.codes
    if result.perm is not None:
        codes = codes[:, torch.argsort(result.perm)]
    contiguous = group_index(weight.shape[1], rule.width, rule.g_idx.device)
    g_idx = None if torch.equal(rule.g_idx, contiguous) else rule.g_idx
    info = {"method": "gptq", "static_groups": rule.static_groups, **result.info()}
    quantized = QuantResult(codes=codes, scale=rule.scale, zero=rule.zero.to(torch.uint8), g_idx=g_idx,
                            weight=result.weight, spec=spec, rel_output_error=result.rel_output_error, info=info)
    if refit:
        info.update(refit_scales(quantized, weight, hessian))
        info["rel_output_error"] = quantized.rel_output_error
    return quantized
