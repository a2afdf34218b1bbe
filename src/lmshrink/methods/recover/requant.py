"""Re-quantizing merged layers with GPTQ on their stored grid (``recover`` option ``requantize: gptq``).

After the adapters are merged, a quantized layer's float weights ``W = base + delta`` (masked for pruned layers)
must go back onto the layer's grid. Round-to-nearest (``requantize: round``) picks each code alone; here the codes
are chosen by the GPTQ column sweep (``solver.solve_columns`` with a ``GridRule`` on the fixed grid), which spreads
each column's rounding error over the columns not yet rounded using the Hessian ``X^T X`` of the layer's inputs.
Scales, zero points and group index stay exactly as stored; pruned weights keep code = zero point (exact zeros).

The Hessians come from the calibration windows run through the merged model block by block: the pipeline runs the
engine with a ``RequantizeStage`` (true-sequential: within a block the linear groups are re-quantized in execution
order, each group's inputs collected after the groups before it are re-quantized, and a block's outputs, computed
with its re-quantized layers, are the next block's inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import PrivateAttr

from lmshrink.core.grids import dequantize, quantize
from lmshrink.core.results import QuantResult
from lmshrink.methods.quant.gptq import GridRule, MaskedRule
from lmshrink.methods.solver import output_error, solve_columns
from lmshrink.methods.stage_base import LayerSolveStage


def gptq_on_grid(weight: torch.Tensor, hessian: torch.Tensor, result: QuantResult, pruned: torch.Tensor | None = None,
                 *, damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True
                 ) -> tuple[torch.Tensor, dict]:
    """Codes for ``weight`` (``[out, in]`` float) on ``result``'s grid chosen by the GPTQ sweep with ``hessian``.

    pruned: bool ``[out, in]``, True where the weight must stay exactly 0 (its code is the zero point). Returns the
    uint8 codes (original column order) and a record: the relative output error ``||(W - Q) X||^2 / ||W X||^2`` of
    these codes and of round-to-nearest on the same grid, with the same Hessian.
    """
    g_idx = result.group_index()
    grid = GridRule(result.spec, grid=(result.scale, result.zero, g_idx))
    rule = grid if pruned is None else MaskedRule(pruned, grid)
    solved = solve_columns(weight, hessian, rule, damp_percent=damp_percent, block_size=block_size,
                           act_order=act_order)
    codes = grid.codes if solved.perm is None else grid.codes[:, torch.argsort(solved.perm)]
    codes = codes.cpu()
    target = weight.float().to(hessian.device)
    rounded = quantize(target.cpu(), result.scale, result.zero, result.spec.maxq, g_idx)
    info = {"rel_output_error": output_error(target, dequantize(codes, result.scale, result.zero, g_idx)
                                             .to(hessian.device), hessian),
            "rel_output_error_round": output_error(target, dequantize(rounded, result.scale, result.zero, g_idx)
                                                   .to(hessian.device), hessian),
            "damp_percent": solved.damp_percent, "damp_retries": solved.damp_retries,
            "dead_columns": solved.dead_columns, "tokens": None}
    return codes, info


class RequantizeStage(LayerSolveStage):
    """The GPTQ sweep on each target layer's stored grid, run by the engine after a ``requantize: gptq`` merge (not a
    recipe stage: the pipeline builds it with the merged weights). ``targets``: full layer name -> (merged float
    weight, stored QuantResult, pruned mask or None); ``solved`` receives name -> (codes, record)."""

    method: Literal["requantize-gptq"] = "requantize-gptq"
    true_sequential: bool = True
    _targets: dict = PrivateAttr(default_factory=dict)
    _solved: dict = PrivateAttr(default_factory=dict)

    @classmethod
    def for_targets(cls, targets: dict) -> "RequantizeStage":
        stage = cls()
        stage._targets = targets
        return stage

    @property
    def solved(self) -> dict[str, tuple[torch.Tensor, dict]]:
        return self._solved

    def selects(self, name: str) -> bool:
        return name in self._targets

    def solve(self, job) -> QuantResult:
        weight, stored, pruned = self._targets[job.name]
        codes, info = gptq_on_grid(weight, job.stats.hessian, stored, pruned)
        info["tokens"] = job.stats.tokens
        self._solved[job.name] = (codes, info)
        return dataclasses.replace(stored, codes=codes, weight=dequantize(codes, stored.scale, stored.zero,
                                                                          stored.group_index()),
                                   rel_output_error=info["rel_output_error"], info=info)
