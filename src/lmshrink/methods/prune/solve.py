"""The pruning stages' solve on one layer (the stage modules stay torch-free and call this)."""

from __future__ import annotations

from lmshrink.core.results import PruneResult, QuantResult
from lmshrink.methods.layer import solve_layer
from lmshrink.methods.prune.magnitude import magnitude_prune
from lmshrink.methods.prune.refit import refit_kept_weights
from lmshrink.methods.prune.sparsegpt import sparsegpt_prune
from lmshrink.methods.prune.wanda import wanda_prune
from lmshrink.methods.quant.solve import PRUNED


def prune_magnitude(stage, weight, hessian):
    return magnitude_prune(weight, stage.sparsity, stage.pattern, hessian=hessian)


def prune_wanda(stage, weight, hessian):
    return wanda_prune(weight, hessian, stage.sparsity, stage.pattern)


def prune_sparsegpt(stage, weight, hessian):
    result = sparsegpt_prune(weight, hessian, stage.sparsity, stage.pattern, damp_percent=stage.damp_percent,
                             block_size=stage.block_size, spec=stage.grid(), act_order=stage.act_order,
                             static_groups=stage.static_groups)
    if isinstance(result, QuantResult):  # joint mode
        result.info = {**result.info, "act_order": stage.act_order,
                       "static_groups": stage.static_groups or stage.act_order}
    return result


def solve_prune(stage, job, prune):
    """``prune(stage, weight, hessian)`` on the layer, then the optional least-squares refit of the kept weights;
    the mask is handed over to a later quantizing stage in the block."""

    def solve(weight, hessian):
        result = prune(stage, weight, hessian)
        if stage.refit_iterations:  # a prune-only result (the stage refuses refit_iterations with joint `bits`)
            refit, info = refit_kept_weights(weight, result.weight, result.mask, hessian, stage.refit_iterations,
                                             damp_percent=getattr(stage, "damp_percent", 0.01))
            result = PruneResult.from_weight(refit, result.mask, pattern=result.pattern,
                                             target_sparsity=result.target_sparsity,
                                             rel_output_error=info["rel_output_error"], info={**result.info, **info})
        job.state[PRUNED] = (result.mask if isinstance(result, PruneResult) else result.pruned, stage.pattern)
        return result

    return solve_layer(stage, job, solve)
