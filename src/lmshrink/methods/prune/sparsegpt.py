"""SparseGPT (Frantar & Alistarh 2023): prune with the optimal-brain-surgeon column sweep GPTQ uses.

The shared solver (``methods/solver.py``) visits the input columns in order; ``SparseRule`` decides each column:
weights in the mask become 0 (and, in joint mode, the others are rounded to the quantization grid), and the error
is spread over the columns not yet visited. The mask is adaptive, as in the paper: for unstructured sparsity it is
chosen at the start of each block of columns among that block's up-to-date weights by the OBS saliency
``w^2 / [H^-1]_jj^2`` (``[H^-1]_jj`` read off the Cholesky factor ``U``: the reference uses ``diag(U)`` the same
way); for N:M it is chosen every M columns among the next M up-to-date columns of each row.
``gptq_keep_mask`` is GPTQ with a fixed mask: the second stage of "prune, then GPTQ" keeps the zeros.
"""

from __future__ import annotations

import torch

from lmshrink.methods.prune.common import PruneResult, parse_pattern, prune_count
from lmshrink.methods.quant.gptq import GridRule
from lmshrink.methods.solver import ColumnRule, Sweep, solve_columns
from lmshrink.quant.grids import GridSpec, QuantResult


class SparseRule(ColumnRule):
    """Zero the masked weights of each column; optionally round the rest with a ``GridRule`` (joint mode).

    sparsity/pattern: the adaptive mask (unstructured: exactly ``round(sparsity * out * in)`` weights over the layer,
    split over the column blocks so the cumulative count stays exact; ``N:M``: N per M columns of each row).
    fixed_mask: bool ``[out, in]`` in the original column order, used instead of an adaptive one.
    grid: a ``GridRule`` whose codes and parameters the rule fills for the kept weights; pruned weights get the
    code of 0.0 (the zero point), so the codes decode to exact zeros there.
    """

    def __init__(self, sparsity: float = 0.0, pattern: str = "unstructured", fixed_mask: torch.Tensor | None = None,
                 grid: GridRule | None = None):
        self.sparsity = sparsity
        self.n, self.m = parse_pattern(pattern)
        self.fixed_mask = fixed_mask
        self.grid = grid

    def start(self, sweep: Sweep) -> None:
        rows, columns = sweep.weight.shape
        if self.m and sweep.perm is not None:
            raise ValueError("an N:M mask needs the columns in their original order (no act-order)")
        if self.m and columns % self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m} needs the input width ({columns}) to be a multiple of "
                             f"{self.m}")
        if self.fixed_mask is not None:
            mask = self.fixed_mask.to(sweep.weight.device, torch.bool)
            self.mask = mask if sweep.perm is None else mask[:, sweep.perm]
        else:
            self.mask = torch.zeros(rows, columns, dtype=torch.bool, device=sweep.weight.device)
        self.hinv_diag = sweep.hinv.diagonal()
        if self.grid is not None:
            self.grid.fit_mask = self.mask  # dynamic groups fit on the kept weights (the mask fills as it is chosen)
            self.grid.start(sweep)

    def start_block(self, sweep: Sweep) -> None:
        if self.fixed_mask is not None or self.m:
            return
        rows = sweep.weight.shape[0]
        i1, i2 = sweep.block_start, sweep.block_end
        count = prune_count(rows * i2, self.sparsity) - prune_count(rows * i1, self.sparsity)
        if count <= 0:
            return
        saliency = sweep.block.square() / self.hinv_diag[i1:i2].square().reshape(1, -1)
        lowest = torch.sort(saliency.reshape(-1), stable=True).indices[:count]
        block_mask = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
        block_mask[lowest] = True
        self.mask[:, i1:i2] = block_mask.reshape(saliency.shape)

    def decide(self, sweep: Sweep, col: int, w: torch.Tensor) -> torch.Tensor:
        if self.m and self.fixed_mask is None and col % self.m == 0:
            current = sweep.current(col, col + self.m)
            saliency = current.square() / self.hinv_diag[col:col + self.m].square().reshape(1, -1)
            lowest = torch.topk(saliency, self.n, dim=1, largest=False).indices
            self.mask[:, col:col + self.m].scatter_(1, lowest, True)
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


def _quant_result(rule: SparseRule, result, spec: GridSpec, info: dict) -> QuantResult:
    grid = rule.grid
    codes = grid.codes if result.perm is None else grid.codes[:, torch.argsort(result.perm)]
    mask = rule.original_mask(result.perm)
    zeros = float((result.weight == 0).sum()) / result.weight.numel()
    info = {**info, **result.info(), "static_groups": grid.static_groups, "sparsity": zeros,
            "pruned_fraction": float(mask.sum()) / mask.numel()}
    return QuantResult(codes=codes, scale=grid.scale, zero=grid.zero.to(torch.uint8), g_idx=None,
                       weight=result.weight, spec=spec, rel_output_error=result.rel_output_error, info=info,
                       pruned=mask)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                    damp_percent: float = 0.01, block_size: int = 128, spec: GridSpec | None = None,
                    cholesky_dtype: torch.dtype = torch.float32, act_order: bool = False,
                    static_groups: bool = False) -> PruneResult | QuantResult:
    """Prune ``weight`` (``[out, in]``) with SparseGPT given the layer's Hessian ``X^T X`` (``[in, in]``, fp32).

    ``pattern``: ``"unstructured"`` (``sparsity`` of the layer, mask chosen per ``block_size`` columns) or
    ``"N:M"``. With ``spec`` (joint mode) the kept weights are also quantized in the same sweep and a QuantResult is
    returned whose codes decode to exact zeros where pruned; otherwise a PruneResult. Joint-mode group grids are
    fitted when the sweep reaches each group, on the up-to-date weights with the pruned ones (as far as the mask is
    chosen by then: the whole group when it lies in one mask block) set to 0, so the error compensation that grows
    the kept weights cannot push them off the grid; ``static_groups`` fits them before the sweep on the original
    weights instead (the SparseGPT reference's choice, which on SmolLM2 clips the grown weights). ``act_order``
    (unstructured only) sweeps the columns by decreasing Hessian diagonal; the mask is then chosen per block of
    ``block_size`` columns in that order, and joint-mode groups are static (fitted on the original column groups).
    """
    n, m = parse_pattern(pattern)
    target = n / m if m else sparsity
    grid = None if spec is None else GridRule(spec, static_groups=static_groups or act_order, clip_weighted=True)
    rule = SparseRule(sparsity=target, pattern=pattern, grid=grid)
    if act_order and m:
        raise ValueError(f"act_order with pattern {pattern}: an N:M mask needs the columns in their original order")
    result = solve_columns(weight, hessian, rule, damp_percent=damp_percent, block_size=block_size,
                           act_order=act_order, cholesky_dtype=cholesky_dtype)
    info = {"method": "sparsegpt", "pattern": pattern, "target_sparsity": target, "act_order": act_order}
    if grid is not None:
        return _quant_result(rule, result, spec, {**info, "joint": True})
    mask = rule.original_mask(result.perm)
    return PruneResult.from_weight(result.weight, mask, pattern=pattern, target_sparsity=target,
                                   rel_output_error=result.rel_output_error, info={**info, **result.info()})


def gptq_keep_mask(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, spec: GridSpec,
                   damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True,
                   static_groups: bool = True, cholesky_dtype: torch.dtype = torch.float32) -> QuantResult:
    """GPTQ on a pruned layer that keeps its zeros: weights in ``mask`` (bool ``[out, in]``) stay exactly 0 (their
    code is the zero point), the others are rounded with error compensation as in ``gptq_quantize``.

    act-order needs static groups here (a permuted ``g_idx`` is not returned).
    """
    if act_order and not static_groups:
        raise ValueError("gptq_keep_mask supports act-order only with static groups")
    rule = SparseRule(fixed_mask=mask, grid=GridRule(spec, static_groups=static_groups, clip_weighted=True))
    result = solve_columns(weight, hessian, rule, damp_percent=damp_percent, block_size=block_size,
                           act_order=act_order, cholesky_dtype=cholesky_dtype)
    return _quant_result(rule, result, spec, {"method": "gptq", "kept_mask": True})
