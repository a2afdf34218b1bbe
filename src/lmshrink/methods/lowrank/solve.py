"""The ``svd`` and ``basis-sharing`` stages' solves on one layer, and the sensitivity-based rank allocation."""

from __future__ import annotations

from typing import Any

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import LowRankResult
from lmshrink.core.stage import Stat
from lmshrink.methods.lowrank.allocation import LayerCurve, allocate_ranks
from lmshrink.methods.lowrank.common import (
    dtype_name,
    group_first_selection,
    layer_rank,
    low_rank_info,
    relative_weight_error,
    statistics_needs,
)
from lmshrink.methods.lowrank.factorize import (
    activation_scale,
    cholesky_whitening,
    refit_left,
    truncated_svd,
    truncation_errors,
)
from lmshrink.methods.solver import asymmetric_output_error, fp_target_weight, output_error
from lmshrink.models.adapters import linear_dims, linear_weight


def _weighting(stage, hessian: torch.Tensor | None, channels) -> tuple[torch.Tensor | None, dict]:
    """The column weighting of the stage's truncation: None (plain), ASVD's scale, or SVD-LLM's Cholesky factor."""
    if stage.whitening == "cholesky":
        return cholesky_whitening(hessian)
    if stage.whitening == "asvd":
        return activation_scale(channels.abs_sum / max(channels.tokens, 1), stage.alpha), {}
    return None, {}


def solve_svd(stage, job) -> LowRankResult:
    """Factorize the layer at its rank with the stage's weighting; with ``fp_target`` truncate the asymmetric target,
    with ``update`` refit the left factor toward the uncompressed outputs (SVD-LLM's update)."""
    drift = job.stats.fp_target if Stat.FP_TARGET in stage.needs() else None
    source = job.uncompressed if drift is not None and job.uncompressed is not None else job.module
    weight = linear_weight(source).detach().float().clone()
    out_features, in_features = weight.shape
    rank = layer_rank(stage, job.name, out_features, in_features)
    hessian = job.stats.hessian
    weighting, info = _weighting(stage, hessian, job.stats.channels)
    target = weight
    # drift is None although asked for: a routed expert, whose inputs do not pair up (the engine records it)
    if stage.fp_target and drift is not None and not drift.identical:
        target, target_info = fp_target_weight(weight, drift.correction(weight, hessian), hessian,
                                               damp_percent=stage.damp_percent)
        info.update(target_info)
    truncation = truncated_svd(target, rank, weighting)
    left = truncation.left
    if stage.update:
        cross = None if drift is None or drift.identical else drift.cross.cross
        before = left @ truncation.right
        if drift is not None:
            info["rel_output_error_before_update"] = asymmetric_output_error(
                weight, before, hessian, drift.weighted_cross(weight), drift.output_norm(weight))[1]
        left = refit_left(weight, truncation.right, hessian, cross)
    result = LowRankResult.from_factors(left, truncation.right, merge=stage.merge,
                                        storage_dtype=dtype_name(linear_weight(job.module)))
    info = low_rank_info(rank, out_features, in_features, whitening=stage.whitening, **info,
                         rel_weight_error=relative_weight_error(weight, result.weight), merged=stage.merge)
    if drift is not None:
        info["rel_output_error_local"] = output_error(weight, result.weight, hessian)
        drift_only, after = asymmetric_output_error(weight, result.weight, hessian, drift.weighted_cross(weight),
                                                    drift.output_norm(weight))
        info.update(rel_output_error_drift_only=drift_only, fp_target=stage.fp_target, update=stage.update)
        result.rel_output_error = after
    elif hessian is not None:
        result.rel_output_error = output_error(weight, result.weight, hessian)
    result.info = info
    return result


def allocate_by_sensitivity(stage, job, number: int) -> None:
    """Per-layer ranks for stage ``number`` from a dense statistics pass: each selected layer's relative output
    error at every rank under the stage's weighting (``truncation_errors``), then ``allocate_ranks`` under the
    budget ``ratio`` of all selected layers' parameters; set as the stage's ``ranks`` per block."""
    select, first_of = group_first_selection(job, stage.selects)

    def observe(index, block, stats):
        curves = []
        for name, module in job.adapter.linears(block):
            if not stage.selects(f"{job.prefix}.{index}.{name}"):
                continue
            group = stats[first_of[name]]
            weight = linear_weight(module).detach().float()
            weighting, _ = _weighting(stage, group.hessian, group.channels)
            out_features, in_features = linear_dims(module)
            curves.append(LayerCurve(f"{index}:{name}", out_features, in_features,
                                     truncation_errors(weight, group.hessian, weighting)))
        return curves

    per_block = job.statistics_pass(statistics_needs(stage.whitening), select, observe)
    curves = [curve for block in per_block for curve in block]
    if not curves:
        raise LmshrinkError(f"svd stage {number + 1} selects no layer", fix="check its targets")
    ranks = allocate_ranks(curves, stage.budget_ratio())
    by_block: dict[int, dict[str, Any]] = {}
    for key, rank in ranks.items():
        index, _, name = key.partition(":")
        options = by_block.setdefault(int(index), {"ranks": {}})
        if rank is None:  # left dense: this block's variant of the stage does not select it
            options.setdefault("ignore", list(stage.ignore)).append(f"{job.prefix}.{index}.{name}")
        else:
            options["ranks"][name] = rank
    for index, options in by_block.items():
        job.set_block_options(number, index, options)
    kept = sum(c.out_features * c.in_features if rank is None else rank * (c.out_features + c.in_features)
               for c, rank in zip(curves, ranks.values()))
    dense = sum(c.out_features * c.in_features for c in curves)
    job.log(f"svd stage {number + 1}: sensitivity allocation keeps {kept / dense:.3f} of {len(curves)} layers' "
            f"parameters, {sum(r is None for r in ranks.values())} of them dense; ranks by block in the record's "
            "block_options")


def solve_shared(stage, job, factors: dict) -> LowRankResult:
    """The layer's coefficients against its group's shared basis (computed before the block loop); with
    ``refit`` the coefficients are refit by least squares on the layer's inputs in the model being compressed."""
    entry = factors.get(job.name)
    if entry is None:
        raise LmshrinkError(f"basis-sharing: layer {job.name} got no basis in the statistics pass before the blocks",
                            fix="report this; the stage's targets must select the same layers in every pass")
    weight = linear_weight(job.module).detach().float().clone()
    out_features, in_features = weight.shape
    left, right, basis, info = entry["left"], entry["right"], entry["basis"], dict(entry["info"])
    left, right = left.to(weight.device), right.to(weight.device)
    rel_output_error = info.pop("rel_output_error_dense_inputs", None)
    if stage.refit:
        info["rel_output_error_before_update"] = output_error(weight, left @ right, job.stats.hessian)
        left = refit_left(weight, right, job.stats.hessian)
    result = LowRankResult.from_factors(left, right, basis=basis, merge=stage.merge,
                                        storage_dtype=dtype_name(linear_weight(job.module)))
    rank = result.rank
    stored = rank * out_features + (rank * in_features if entry["owner"] else 0)
    result.info = {**low_rank_info(rank, out_features, in_features), "stored_params": stored, "basis": basis,
                   "whitening": "cholesky", "merged": stage.merge, **info,
                   "rel_weight_error": relative_weight_error(weight, result.weight)}
    if stage.refit:
        result.rel_output_error = output_error(weight, result.weight, job.stats.hessian)
        result.info["update"] = True
    else:  # the layer's error on the dense model's inputs, measured in the statistics pass
        result.rel_output_error = rel_output_error
    return result


def solve_factor_gptq(stage, job) -> LowRankResult:
    """GPTQ on the factors the layer's earlier ``svd`` stage left: the right factor B on the layer's input Hessian
    H; the left factor refit for the quantized ``Q_B`` (``min ||A B X - A' Q_B X||``) and quantized on the Hessian
    of its own input, ``Q_B H Q_B^T``."""
    from lmshrink.core.stage import LAST_RESULT
    from lmshrink.methods.quant.gptq import gptq_quantize

    factorized = job.state.get(LAST_RESULT)
    if not isinstance(factorized, LowRankResult) or factorized.merge or factorized.quantized:
        raise LmshrinkError(f"gptq-factors: {job.name} has no float factors from an earlier svd stage of its block",
                            fix="put gptq-factors right after an svd stage (without merge) on the same layers")
    if factorized.basis is not None:
        raise LmshrinkError(f"gptq-factors: {job.name} shares its basis {factorized.basis!r} with other layers",
                            fix="quantize the factors of per-layer factorizations (svd) only")
    hessian = job.stats.hessian
    spec = stage.grid()
    options = dict(damp_percent=stage.damp_percent, block_size=stage.block_size, act_order=stage.act_order,
                   static_groups=True, refit=stage.refit_scales)
    right = gptq_quantize(factorized.right, hessian, spec, **options)
    product = factorized.left @ factorized.right
    left_target = refit_left(product, right.weight, hessian)
    right_q = right.weight.to(hessian.device)
    left = gptq_quantize(left_target, right_q @ hessian @ right_q.t(), spec, **options)
    result = LowRankResult.from_quantized(left, right, storage_dtype=factorized.storage_dtype)
    result.rel_output_error = output_error(product, result.weight, hessian)
    result.info = {**factorized.info, "factor_bits": spec.bits, "factor_group_size": spec.group_size,
                   "rel_output_error_factorized": factorized.rel_output_error,
                   "rel_weight_error": relative_weight_error(product, result.weight)}
    return result
