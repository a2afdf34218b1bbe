"""SparseGPT (Frantar & Alistarh 2023): prune with the optimal-brain-surgeon column sweep GPTQ uses.

The shared solver (``methods/solver.py``) visits the input columns in order; ``SparseRule`` decides each column:
weights in the mask become 0 (and, in joint mode, the others are rounded to the quantization grid), and the error
is spread over the columns not yet visited. The mask is adaptive, as in the paper: for unstructured sparsity it is
chosen at the start of each block of columns among that block's up-to-date weights by the OBS saliency
``w^2 / [H^-1]_jj^2`` (``[H^-1]_jj`` read off the Cholesky factor ``U``: the reference uses ``diag(U)`` the same
way); for N:M it is chosen every M columns among the next M up-to-date columns of each row.
"""

from __future__ import annotations

import torch

from lmshrink.core.grids import GridSpec
from lmshrink.core.results import PruneResult, QuantResult
from lmshrink.methods.prune.common import prune_count
from lmshrink.methods.prune.patterns import parse_pattern
from lmshrink.methods.quant.gptq import GridRule, MaskedRule, masked_quant_result
from lmshrink.methods.solver import Sweep, solve_columns


class SparseRule(MaskedRule):
    """SparseGPT's adaptive mask: the weights it selects become 0 (and, in joint mode, the others are rounded with a
    ``GridRule``; see ``MaskedRule``).

    sparsity/pattern: unstructured: exactly ``round(sparsity * out * in)`` weights over the layer, split over the
    column blocks so the cumulative count stays exact; ``N:M``: N per M columns of each row.
    """

    def __init__(self, sparsity: float = 0.0, pattern: str = "unstructured", grid: GridRule | None = None):
        super().__init__(grid=grid)
        self.sparsity = sparsity
        self.n, self.m = parse_pattern(pattern)

    def start(self, sweep: Sweep) -> None:
        columns = sweep.weight.shape[1]
        if self.m and sweep.perm is not None:
            raise ValueError("an N:M mask needs the columns in their original order (no act-order)")
        if self.m and columns % self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m} needs the input width ({columns}) to be a multiple of "
                             f"{self.m}")
        self.hinv_diag = sweep.hinv.diagonal()
        super().start(sweep)

    def start_block(self, sweep: Sweep) -> None:
        if self.m:
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
        if self.m and col % self.m == 0:
            current = sweep.current(col, col + self.m)
            saliency = current.square() / self.hinv_diag[col:col + self.m].square().reshape(1, -1)
            lowest = torch.topk(saliency, self.n, dim=1, largest=False).indices
            self.mask[:, col:col + self.m].scatter_(1, lowest, True)
        return super().decide(sweep, col, w)


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
    weights instead (the SparseGPT reference's choice; the compensation can grow the kept weights past those ranges). ``act_order``
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
        return masked_quant_result(rule, result, spec, {**info, "joint": True})
    mask = rule.original_mask(result.perm)
    return PruneResult.from_weight(result.weight, mask, pattern=pattern, target_sparsity=target,
                                   rel_output_error=result.rel_output_error, info={**info, **result.info()})
