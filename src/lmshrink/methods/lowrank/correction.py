"""Low-rank correction of an earlier stage's error (EoRA / LQER style), fitted in the whitened space.

After a stage left the layer at ``Q`` (quantized or pruned), the correction ``L R`` of rank r minimises
``||(W* - Q - L R) X~^T||^2`` over the calibration inputs X~ the layer gets in the model being compressed: the
truncated SVD of ``(W* - Q) S``, ``S S^T = X~^T X~`` (``factorize.truncated_svd`` with Cholesky whitening). ``W*``
is the uncompressed weight W, or with ``fp_target`` its asymmetric target ``W C H~^-1``, for which the same
truncation minimises ``||W X^T - (Q + L R) X~^T||^2`` (X: the layer's inputs in the uncompressed model). The
factors are rounded to their storage dtype.
"""

from __future__ import annotations

import math

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import CorrectedResult, LowRankResult
from lmshrink.core.stage import LAST_RESULT
from lmshrink.methods.lowrank.factorize import check_rank, cholesky_whitening, truncated_svd
from lmshrink.methods.solver import asymmetric_output_error, fp_target_weight, output_error
from lmshrink.models.adapters import linear_weight

def correction_rank(stage, out_features: int, in_features: int) -> int:
    """The stage's rank for an ``out x in`` layer: ``rank``, or the most that fits ``bits_per_weight`` at the
    factors' stored bits per element."""
    if stage.rank is not None:
        return stage.rank
    bits = stage.correction_bits() * out_features * in_features
    return math.floor(bits / (stage.element_bits() * (out_features + in_features)) + 1e-9)


def _quantized_factors(stage, residual: torch.Tensor, truncation, hessian: torch.Tensor):
    """GPTQ on the correction's factors: the right one on the layer's input Hessian H, then the left one refit for
    the quantized right one ``Q_R`` (least squares toward the residual) and quantized on ``Q_R H Q_R^T``."""
    from lmshrink.core.grids import GridSpec
    from lmshrink.methods.lowrank.factorize import refit_left
    from lmshrink.methods.quant.gptq import gptq_quantize

    spec = GridSpec(bits=stage.factor_bits, group_size=stage.factor_group_size, symmetric=False, clip_search=True,
                    scale_dtype="float16")
    right = gptq_quantize(truncation.right, hessian, spec)
    right_q = right.weight.to(hessian.device)
    left = gptq_quantize(refit_left(residual, right_q, hessian), right_q @ hessian @ right_q.t(), spec)
    return left, right


def solve_correction(stage, job) -> CorrectedResult:
    base = job.state.get(LAST_RESULT)
    if base is None:
        raise LmshrinkError(f"lowrank-correction: no earlier stage of the recipe compressed {job.name} in its block, "
                            "so there is no error to correct",
                            fix="put lowrank-correction after a gptq, rtn or pruning stage that selects the same layers")
    if isinstance(base, (LowRankResult, CorrectedResult)):
        raise LmshrinkError(f"lowrank-correction: {job.name} is already {base.kind} (stage before it)",
                            fix="correct quantized or pruned layers only, once each")
    if job.uncompressed is None:
        raise LmshrinkError("lowrank-correction needs the uncompressed layer, which the engine keeps with "
                            "Stat.FP_TARGET", fix="report this: the stage declares Stat.FP_TARGET")
    weight = linear_weight(job.uncompressed).detach().float().clone()
    out_features, in_features = weight.shape
    rank = correction_rank(stage, out_features, in_features)
    if rank < 1:
        raise LmshrinkError(f"lowrank-correction: {stage.correction_bits():g} bits per weight of {job.name} "
                            f"({out_features} x {in_features}) do not hold a rank-1 correction in "
                            f"{stage.storage_dtype}", fix="raise bits_per_weight, or give a rank")
    check_rank(job.name, out_features, in_features, rank)
    hessian = job.stats.hessian
    drift = job.stats.fp_target
    compressed = base.dense().float()
    target, info = weight, {}
    # drift is None: a routed expert, whose inputs do not pair up (the engine records it); the local objective then
    if stage.fp_target and drift is not None and not drift.identical:
        target, info = fp_target_weight(weight, drift.correction(weight, hessian), hessian,
                                        damp_percent=stage.damp_percent)
    lower, whitening_info = cholesky_whitening(hessian)
    truncation = truncated_svd(target - compressed, rank, lower)
    if stage.factor_bits is not None:
        left, right = _quantized_factors(stage, target - compressed, truncation, hessian)
        result = CorrectedResult.from_quantized(base, left, right)
    else:
        result = CorrectedResult.from_factors(base, truncation.left, truncation.right,
                                              storage_dtype=stage.storage_dtype)

    def error(solved: torch.Tensor) -> float:
        if stage.fp_target and drift is not None:
            return asymmetric_output_error(weight, solved, hessian, drift.weighted_cross(weight),
                                           drift.output_norm(weight))[1]
        return output_error(weight, solved, hessian)

    result.rel_output_error = error(result.weight)
    result.info = {**info, **whitening_info, "correction_rank": rank, "rank": rank,
                   "stored_params": rank * (out_features + in_features),
                   "storage_dtype": f"int{stage.factor_bits}" if stage.factor_bits else stage.storage_dtype,
                   "base_rel_output_error": error(compressed), "fp_target": stage.fp_target,
                   "base_kind": base.kind}
    return result
