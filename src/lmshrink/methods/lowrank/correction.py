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

_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


def correction_rank(stage, out_features: int, in_features: int) -> int:
    """The stage's rank for an ``out x in`` layer: ``rank``, or the most that fits ``bits_per_weight``."""
    if stage.rank is not None:
        return stage.rank
    bits = stage.correction_bits() * out_features * in_features
    return math.floor(bits / (_BITS[stage.storage_dtype] * (out_features + in_features)) + 1e-9)


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
    if stage.fp_target and not drift.identical:
        target, info = fp_target_weight(weight, drift.cross.cross.to(hessian.device), hessian,
                                        damp_percent=stage.damp_percent)
    lower, whitening_info = cholesky_whitening(hessian)
    truncation = truncated_svd(target - compressed, rank, lower)
    result = CorrectedResult.from_factors(base, truncation.left, truncation.right, storage_dtype=stage.storage_dtype)

    def error(solved: torch.Tensor) -> float:
        if stage.fp_target:
            return asymmetric_output_error(weight, solved, drift.reference.hessian, drift.cross.cross, hessian)[1]
        return output_error(weight, solved, hessian)

    result.rel_output_error = error(result.weight)
    result.info = {**info, **whitening_info, "correction_rank": rank, "rank": rank,
                   "stored_params": rank * (out_features + in_features), "storage_dtype": stage.storage_dtype,
                   "base_rel_output_error": error(compressed), "fp_target": stage.fp_target,
                   "base_kind": base.kind}
    return result
