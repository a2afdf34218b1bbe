"""Solving one layer from its statistics, with or without asymmetric calibration (``fp_target``): the wrapper
every Hessian-based layer stage's solve goes through."""

from __future__ import annotations

from typing import Callable

import torch

from lmshrink.core.stage import PENDING_OUTPUT_NORM, Stat
from lmshrink.methods.solver import asymmetric_error_terms, fp_target_weight, relative_asymmetric_error
from lmshrink.models.adapters import linear_weight


def solve_layer(stage, job, solve: Callable[[torch.Tensor, torch.Tensor | None], object]):
    """``solve(weight, hessian)`` on the layer of ``job``, with ``weight`` a float32 copy of the layer's weight.

    With ``fp_target`` the sweep runs on the asymmetric target ``W* = W (C + l I)(H~ + l I)^-1`` instead of the
    layer's current weight (``fp_target_weight``), where W is the weight of the same layer in the unmodified copy of
    the block (``job.uncompressed``): the target is the uncompressed model's output, also for a stage that follows
    another one (prune, then GPTQ). Building it from the weight an earlier stage left would aim at that stage's
    output on the uncompressed inputs instead, and when the earlier stage had ``fp_target`` too, apply the drift
    correction twice. The result's ``rel_output_error`` then becomes the asymmetric error
    ``||W X - Q X~||^2 / ||W X||^2``; the sweep's own error on its target is kept as ``rel_output_error_local``.
    """
    hessian = job.stats.hessian
    wanted = Stat.FP_TARGET in stage.needs()
    # None although asked for: the engine has no paired inputs for this layer (a routed expert), so a plain solve
    drift = job.stats.fp_target if wanted else None
    source = job.uncompressed if drift is not None and job.uncompressed is not None else job.module
    weight = linear_weight(source).detach().float().clone()
    original = None
    drift_info: dict = {}
    if drift is not None:
        original = weight
        if drift.identical:  # X~ == X on every token (e.g. block 0's first group): W* = W, skip the solve
            drift_info = {"fp_target_identical_inputs": True}
        else:
            weight, drift_info = fp_target_weight(weight, drift.correction(weight, hessian), hessian,
                                                  damp_percent=stage.damp_percent)
    result = solve(weight, hessian)
    if wanted and drift is None:
        result.info = {**(result.info or {}), "fp_target": "not applied: no paired inputs (routed expert)"}
    if drift is not None:
        terms = asymmetric_error_terms(original, result.weight, hessian, drift.weighted_cross(original))
        norm = drift.output_norm(original)
        result.info = {**(result.info or {}), **drift_info, "fp_target": True,
                       "rel_output_error_local": result.rel_output_error}
        if norm is None:  # ||W X||^2 comes from a later pass of the block: the engine completes the error then
            result.info[PENDING_OUTPUT_NORM] = list(terms)
            result.rel_output_error = None
        else:
            complete_output_error(result.info, terms, norm)
            result.rel_output_error = result.info["rel_output_error"]
    return result


def complete_output_error(info: dict, terms, output_norm: float) -> None:
    """Write the relative asymmetric errors (drift only, and with the solved weight) into ``info`` (a result's info
    or its record line) from ``asymmetric_error_terms`` and the layer's ``||W X||^2``; drops the pending terms."""
    info.pop(PENDING_OUTPUT_NORM, None)
    drift_only, after = (relative_asymmetric_error(t, output_norm) for t in terms)
    info["rel_output_error_drift_only"] = drift_only
    info["rel_output_error"] = after
