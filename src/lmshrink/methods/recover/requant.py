"""Re-quantizing merged layers with GPTQ on their stored grid (``recover`` option ``requantize: gptq``).

After the adapters are merged, a quantized layer's float weights ``W = base + delta`` (masked for pruned layers)
must go back onto the layer's grid. Round-to-nearest (``requantize: round``) picks each code alone; here the codes
are chosen by the GPTQ column sweep (``solver.solve_columns`` with a ``GridRule`` on the fixed grid), which spreads
each column's rounding error over the columns not yet rounded using the Hessian ``X^T X`` of the layer's inputs.
Scales, zero points and group index stay exactly as stored; pruned weights keep code = zero point (exact zeros).

The Hessians come from the calibration windows run through the merged model block by block, as the engine collects
them (``engine.loop._collect``): within a block the linear groups are re-quantized in execution order, each group's
inputs collected after the groups before it are re-quantized (true-sequential), and a block's outputs, computed with
its re-quantized layers, are the next block's inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.adapters import linear_weight, set_linear_weight
from ...quant.grids import QuantResult, dequantize, quantize
from ..prune.sparsegpt import SparseRule
from ..quant.gptq import GridRule
from ..solver import output_error, solve_columns


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
    rule = grid if pruned is None else SparseRule(fixed_mask=pruned, grid=grid)
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


@torch.no_grad()
def requantize_gptq(model: nn.Module, targets: dict[str, tuple[torch.Tensor, QuantResult, torch.Tensor | None]],
                    calibration: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 8,
                    damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True
                    ) -> dict[str, tuple[torch.Tensor, dict]]:
    """Re-quantize the layers ``targets`` (full name -> (float weight, stored QuantResult, pruned mask or None)) of
    ``model`` with ``gptq_on_grid``, block by block on the calibration windows ``calibration`` (``[windows, seqlen]``
    token ids); writes each layer's dequantized weights into ``model`` as it goes.

    ``model`` must hold the merged float weights (the inputs of the first group are those of the merged model).
    Returns name -> (codes, record with ``tokens`` and the output errors of ``gptq_on_grid``).
    """
    from ...engine.capture import capture_block_inputs, run_block
    from ...engine.loop import _collect, _to_device
    from ...models import get_adapter

    if calibration is None or not len(calibration):
        raise ValueError("requantize_gptq needs calibration windows")
    device = torch.device(device)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = adapter.block_path(model)
    last = max((i for i in range(len(blocks)) for n, _ in adapter.linears(blocks[i]) if f"{prefix}.{i}.{n}" in targets),
               default=-1)
    out: dict[str, tuple[torch.Tensor, dict]] = {}
    if last < 0:
        return out
    was_training = model.training
    model.eval()
    captured = capture_block_inputs(model, blocks, calibration, device)
    hidden = list(torch.cat(captured.hidden).split(batch_size))
    try:
        for index in range(last + 1):
            block = blocks[index]
            args = _to_device(captured.args[index], device)
            kwargs = _to_device(captured.kwargs[index], device)
            for group in adapter.linear_groups(block):
                members = [n for n in group if f"{prefix}.{index}.{n}" in targets]
                if not members:
                    continue
                first = block.get_submodule(members[0])
                stats, _ = _collect(block, {members[0]: first}, hidden, args, kwargs, device, stop_at=members[0])
                accumulator = stats[members[0]]
                for name in members:
                    full = f"{prefix}.{index}.{name}"
                    weight, result, pruned = targets[full]
                    codes, info = gptq_on_grid(weight, accumulator.hessian, result, pruned,
                                               damp_percent=damp_percent, block_size=block_size, act_order=act_order)
                    info["tokens"] = accumulator.tokens
                    module = block.get_submodule(name)
                    set_linear_weight(module, dequantize(codes, result.scale, result.zero, result.group_index())
                                      .to(linear_weight(module).dtype))
                    out[full] = (codes, info)
                del stats, accumulator
            if index < last:
                hidden = [run_block(block, h.to(device), args, kwargs).to("cpu") for h in hidden]
    finally:
        model.train(was_training)
    return out
