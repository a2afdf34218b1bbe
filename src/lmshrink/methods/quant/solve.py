"""The quantization stages' solves on one layer (the stage modules stay torch-free and call these)."""

from __future__ import annotations

from lmshrink.methods.layer import solve_layer
from lmshrink.methods.quant.gptq import gptq_keep_mask, gptq_quantize
from lmshrink.methods.quant.refine import coordinate_descent
from lmshrink.methods.quant.refit import refit_scales
from lmshrink.methods.quant.rtn import rtn_quantize

# the hand-over key a pruning stage leaves for a later quantizing stage in the same block: (mask, pattern)
PRUNED = "pruned"


def _keep_pruned(result, mask, pattern):
    """A layer pruned by an earlier stage keeps its zeros: record them for the writer's sparsity_config."""
    if mask is not None:
        result.pruned = mask
        result.info.update(pattern=pattern, sparsity=float((result.weight == 0).sum()) / result.weight.numel())
    return result


def solve_gptq(stage, job):
    """GPTQ on the layer; a layer pruned by an earlier stage of this block keeps its zeros (mask-aware sweep)."""
    mask, pattern = job.state.pop(PRUNED, (None, None))
    spec = stage.grid()

    def solve(weight, hessian):
        if mask is not None:  # check_recipe refuses act-order without static groups here
            result = gptq_keep_mask(weight, hessian, mask, spec, damp_percent=stage.damp_percent,
                                    block_size=stage.block_size, act_order=stage.act_order,
                                    static_groups=stage.static_groups)
            if stage.refit_scales:  # a pruned weight's code is its zero point: 0 whatever the scale
                result.info.update(refit_scales(result, weight, hessian))
        else:
            result = gptq_quantize(weight, hessian, spec, damp_percent=stage.damp_percent,
                                   block_size=stage.block_size, act_order=stage.act_order,
                                   static_groups=stage.static_groups, refit=stage.refit_scales)
        result.info = {**(result.info or {}), "act_order": stage.act_order, "static_groups": stage.static_groups}
        if stage.descent_passes:
            result.info.update(coordinate_descent(result, weight, hessian, stage.descent_passes,
                                                  block_size=stage.block_size, keep=mask))
        return _keep_pruned(result, mask, pattern)

    return solve_layer(stage, job, solve)


def solve_rtn(stage, job):
    """Round to nearest; a pruned layer keeps its zeros (0 is always on the grid)."""
    mask, pattern = job.state.pop(PRUNED, (None, None))

    def solve(weight, hessian):
        result = rtn_quantize(weight, stage.grid(), hessian=hessian)
        result.info = {**(result.info or {}), "act_order": False, "static_groups": False}
        return _keep_pruned(result, mask, pattern)

    return solve_layer(stage, job, solve)
