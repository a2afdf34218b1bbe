"""The block-by-block compression loop of DESIGN.md.

For each decoder block: hooks collect each linear group's input statistics (the Hessian ``X^T X``) while the
calibration windows run through the block, the recipe's stages solve their layers from them, and the windows run
again through the compressed block to become the next block's inputs. With true-sequential stages the statistics
of a group are collected after the groups before it are compressed, and each collection pass stops as soon as the
group's input is seen.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..methods.quant.gptq import gptq_quantize
from ..methods.quant.rtn import rtn_quantize
from ..methods.solver import HessianAccumulator
from ..models.adapters import ModelAdapter, linear_dims, linear_weight, set_linear_weight
from ..quant.grids import QuantResult
from ..recipe import GPTQStage, QuantStage, Recipe
from .capture import _StopForward, capture_block_inputs, run_block
from .checkpoint import Checkpoint
from .offload import BlockStreamer


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class EngineResult:
    results: dict[str, QuantResult]
    layers: list[dict]
    seconds: float
    peak_rss_bytes: int
    resumed_from_block: int = 0
    blocks: int = 0
    notes: list[str] = field(default_factory=list)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _collect(block: nn.Module, modules: dict[str, nn.Module], hidden: list[torch.Tensor], args: tuple, kwargs: dict,
             device, stop_at: str | None) -> dict[str, HessianAccumulator]:
    """Run the windows through ``block`` and accumulate each named module's input Hessian.

    ``stop_at``: the module after whose input the pass can stop (the rest of the block is not needed).
    """
    accumulators = {name: HessianAccumulator(linear_dims(m)[1], device=device) for name, m in modules.items()}
    handles = []
    for name, module in modules.items():
        def hook(_module, args, _name=name):
            accumulators[_name].add_batch(args[0].detach())
            if _name == stop_at:
                raise _StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for h in hidden:
                try:
                    run_block(block, h.to(device), args, kwargs)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _solve(stage: QuantStage, module: nn.Module, hessian: torch.Tensor) -> QuantResult:
    weight = linear_weight(module).detach().float().clone()
    spec = stage.grid()
    if isinstance(stage, GPTQStage):
        result = gptq_quantize(weight, hessian, spec, damp_percent=stage.damp_percent, block_size=stage.block_size,
                               act_order=stage.act_order, static_groups=stage.static_groups)
        result.info = {**(result.info or {}), "act_order": stage.act_order, "static_groups": stage.static_groups}
    else:
        result = rtn_quantize(weight, spec, hessian=hessian)
        result.info = {**(result.info or {}), "act_order": False, "static_groups": False}
    return result


class Engine:
    """Compress ``model`` in place, block by block, following ``recipe``; keeps every layer's QuantResult.

    With ``streamer`` (streamed mode) the blocks' parameters live on the meta device: each block is read from disk
    onto ``device`` when reached and dropped again when done, so the model is not compressed in place (its blocks
    end on meta) and the QuantResults carry codes, scales and zeros but an empty ``weight`` (``dequantize`` gives
    it), so memory holds one dense block at a time.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, recipe: Recipe, calibration: torch.Tensor,
                 device: str | torch.device = "cpu", checkpoint: Checkpoint | None = None, resume: bool = False,
                 progress: bool = True, on_block_done: Callable[[int], None] | None = None, batch_size: int = 8,
                 streamer: BlockStreamer | None = None):
        self.model = model
        self.adapter = adapter
        self.recipe = recipe
        self.calibration = calibration
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.resume = resume
        self.progress = progress
        self.on_block_done = on_block_done
        self.batch_size = batch_size  # windows per block call: fewer, larger matmuls (same results)
        self.streamer = streamer

    def _block_plan(self, index: int, block: nn.Module) -> list[tuple[QuantStage, list[list[str]]]]:
        """For each stage: the groups of this block (relative names) whose layers it selects."""
        prefix = f"{self.adapter.block_path(self.model)}.{index}."
        plan = []
        for stage in self.recipe.stages:
            groups = [[n for n in group if stage.selects(prefix + n)] for group in self.adapter.linear_groups(block)]
            plan.append((stage, [g for g in groups if g]))
        return plan

    def run(self) -> EngineResult:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        blocks = self.adapter.blocks(self.model)
        prefix = self.adapter.block_path(self.model)
        self.model.eval()
        captured = capture_block_inputs(self.model, blocks, self.calibration, self.device)
        hidden = list(torch.cat(captured.hidden).split(self.batch_size))
        results: dict[str, QuantResult] = {}
        layers: list[dict] = []
        first = 0
        if self.checkpoint is not None:
            state = self.checkpoint.load() if self.resume else None
            if state is None:
                self.checkpoint.start()
            else:
                first = state["finished_blocks"]
                layers = state["layers"]
                for index in range(first):
                    for name, result in self.checkpoint.load_block(index).items():
                        if self.streamer is None:
                            module = self.model.get_submodule(name)
                            set_linear_weight(module, result.weight.to(linear_weight(module).dtype))
                        else:
                            result.weight = torch.empty(0)
                        results[name] = result
                hidden = list(self.checkpoint.load_hidden().split(self.batch_size)) if first else hidden
        bar = tqdm(total=len(blocks), initial=first, desc="compress", unit="block", disable=not self.progress,
                   dynamic_ncols=True)
        for index in range(first, len(blocks)):
            block_start = time.perf_counter()
            block = blocks[index]
            if self.streamer is not None:
                self.streamer.load(block, index, self.device)
            else:
                block.to(self.device)
            args = _to_device(captured.args[index], self.device)
            kwargs = _to_device(captured.kwargs[index], self.device)
            block_results: dict[str, QuantResult] = {}
            for stage, groups in self._block_plan(index, block):
                sequential = getattr(stage, "true_sequential", False)
                passes = [[g] for g in groups] if sequential else [groups]
                for pass_groups in passes:
                    firsts = {g[0]: block.get_submodule(g[0]) for g in pass_groups}
                    stats = _collect(block, firsts, hidden, args, kwargs, self.device, stop_at=pass_groups[-1][0])
                    for group in pass_groups:
                        hessian = stats[group[0]].hessian
                        for name in group:
                            module = block.get_submodule(name)
                            t0 = time.perf_counter()
                            result = _solve(stage, module, hessian)
                            set_linear_weight(module, result.weight.to(linear_weight(module).dtype))
                            full = f"{prefix}.{index}.{name}"
                            block_results[full] = result
                            out_f, in_f = linear_dims(module)
                            layers.append({"name": full, "block": index, "method": stage.method,
                                           "out_features": out_f, "in_features": in_f,
                                           "rel_output_error": result.rel_output_error,
                                           "seconds": round(time.perf_counter() - t0, 4),
                                           "tokens": stats[group[0]].tokens,
                                           **{k: v for k, v in (result.info or {}).items()
                                              if k in ("damp_percent", "damp", "damp_retries", "dead_columns",
                                                       "loss")}})
                    del stats
            with torch.no_grad():
                hidden = [run_block(block, h.to(self.device), args, kwargs).to("cpu") for h in hidden]
            if self.streamer is not None:
                self.streamer.release(block)
                for result in block_results.values():
                    result.weight = torch.empty(0)  # the checkpoint and writer need only codes, scales, zeros
            elif self.device.type != "cpu":
                block.to("cpu")
            results.update(block_results)
            errors = " ".join(f"{n.rsplit('.', 1)[-1]}={r.rel_output_error:.4f}" for n, r in block_results.items()
                              if r.rel_output_error is not None)
            if self.progress:
                bar.write(f"block {index + 1}/{len(blocks)} ({time.perf_counter() - block_start:.1f}s) "
                          f"rel. output error: {errors}")
            if self.checkpoint is not None:
                self.checkpoint.save_block(index, block_results, hidden, {"layers": layers})
            bar.update(1)
            if self.on_block_done is not None:
                self.on_block_done(index)
        bar.close()
        return EngineResult(results=results, layers=layers, seconds=time.perf_counter() - started,
                            peak_rss_bytes=peak_rss_bytes(), resumed_from_block=first, blocks=len(blocks))
