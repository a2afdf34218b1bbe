"""The block-by-block compression loop of DESIGN.md.

For each decoder block: hooks collect each linear group's input statistics (the Hessian ``X^T X``) while the
calibration windows run through the block, the recipe's stages solve their layers from them, and the windows run
again through the compressed block to become the next block's inputs. With true-sequential stages the statistics
of a group are collected after the groups before it are compressed, and each collection pass stops as soon as the
group's input is seen. Stages that read no statistic (magnitude pruning, ``_needs_hessian``) get no collection pass,
and a recipe of only such stages runs no block forward at all.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import resource
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..methods.quant.gptq import gptq_quantize
from ..methods.quant.refine import coordinate_descent
from ..methods.quant.refit import refit_scales
from ..methods.quant.rtn import rtn_quantize
from ..methods.prune import (PruneResult, gptq_keep_mask, magnitude_prune, refit_kept_weights, sparsegpt_prune,
                             wanda_prune)
from ..methods.solver import CrossAccumulator, HessianAccumulator, asymmetric_output_error, fp_target_weight
from ..models.adapters import ModelAdapter, linear_dims, linear_weight, set_linear_weight
from ..quant.grids import QuantResult
from ..recipe import GPTQStage, MagnitudeStage, PruneStage, QuantStage, Recipe, StageBase, WandaStage
from .capture import _StopForward, capture_block_inputs, run_block
from .checkpoint import Checkpoint
from .offload import BlockStreamer
from .replay import PassMemo


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads): less sensitive to other jobs than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Hand the heap pages freed so far back to the operating system (glibc keeps them by default).

    A block's passes and solves free hundreds of MB in pieces the allocator keeps mapped, so the next pass starts
    from an inflated resident size. Called after each pass's solves and after each block: on P1 (w4g128 with
    ``fp_target``) the peak RSS was 1.96-2.01 GiB against 2.24-2.42 GiB untrimmed, for about 9% more time than
    trimming once per block (the page faults of touching the memory again; bench/results/memory_trim_p1_w4g128.md).
    Values are unchanged."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class EngineResult:
    results: dict[str, QuantResult]
    layers: list[dict]
    seconds: float
    peak_rss_bytes: int
    resumed_from_block: int = 0
    blocks: int = 0
    cpu_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class DriftStats:
    """What asymmetric calibration (``fp_target``) needs of one linear group besides its Hessian ``X~^T X~``:
    ``cross`` C = ``X^T X~`` and ``reference`` H = ``X^T X`` (X: the group's inputs in the uncompressed model)."""

    cross: CrossAccumulator
    reference: HessianAccumulator


def _collect(block: nn.Module, modules: dict[str, nn.Module], hidden: list[torch.Tensor], args: tuple, kwargs: dict,
             device, stop_at: str | None, memo: PassMemo | None = None,
             reference: tuple[nn.Module, list[torch.Tensor], PassMemo | None] | None = None,
             finish_reference: bool = False):
    """Run the windows through ``block`` and accumulate each named module's input Hessian.

    ``stop_at``: the module after whose input the pass can stop (the rest of the block is not needed).
    ``memo``: reuses the work of earlier passes over the same windows (see ``replay``).
    ``reference``: ``(original block, its input hidden states, its memo or None)`` for asymmetric calibration: each
    batch first runs through the unmodified copy of the block on the uncompressed stream (stopping at ``stop_at``),
    keeping the inputs of the same modules, and the pairs are accumulated into ``DriftStats``.
    ``finish_reference``: the copy runs to its end instead of stopping, and each batch's block output replaces its
    input in the reference stream's list (this pass is the last use of those inputs).
    Returns ``(accumulators, drift)``: ``drift`` maps each module to its ``DriftStats`` (empty without ``reference``).
    """
    accumulators = {name: HessianAccumulator(linear_dims(m)[1], device=device) for name, m in modules.items()}
    drift: dict[str, DriftStats] = {}
    handles = []
    reference_inputs: dict[str, torch.Tensor] = {}
    if reference is not None:
        original, reference_hidden, reference_memo = reference
        if len(reference_hidden) != len(hidden):
            raise RuntimeError(f"{len(reference_hidden)} reference batches for {len(hidden)} calibration batches")
        drift = {name: DriftStats(CrossAccumulator(linear_dims(m)[1], device=device),
                                  HessianAccumulator(linear_dims(m)[1], device=device)) for name, m in modules.items()}
        for name in modules:
            def keep(_module, args, _name=name):
                reference_inputs[_name] = args[0].detach()
                if _name == stop_at and not finish_reference:
                    raise _StopForward
            handles.append(original.get_submodule(name).register_forward_pre_hook(keep))
    for name, module in modules.items():
        def hook(_module, args, _name=name):
            x = args[0].detach()
            accumulators[_name].add_batch(x)
            if drift:
                x_fp = reference_inputs.pop(_name)  # the same tokens in the uncompressed model
                drift[_name].cross.add_batch(x_fp, x)
                drift[_name].reference.add_batch(x_fp)
            if _name == stop_at:
                raise _StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch, h in enumerate(hidden):
                if reference is not None:
                    reference_inputs.clear()
                    if reference_memo is not None:
                        reference_memo.set_batch(batch)
                    try:
                        out = run_block(original, reference_hidden[batch].to(device), args, kwargs)
                        if finish_reference:
                            reference_hidden[batch] = out.to("cpu")
                    except _StopForward:
                        pass
                if memo is not None:
                    memo.set_batch(batch)
                try:
                    run_block(block, h.to(device), args, kwargs)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return accumulators, drift


def _pass_sources(tasks: list[tuple[StageBase, list[list[str]], bool]], reuse: bool) -> list[str | None]:
    """Where each task's statistics come from: "collect" (a collection pass), "shared" (the previous task's pass,
    which covered the same single group: the group's own changes leave its inputs as they were) or None (the
    stage reads none). Sharing is part of pass reuse (``reuse``); a stage with ``fp_target`` shares only a pass
    that collected the uncompressed inputs too."""
    sources: list[str | None] = []
    shared = None  # (groups, with drift?) of the last collection pass, while it holds for the next task
    for stage, groups, collect in tasks:
        wants_drift = bool(getattr(stage, "fp_target", False))
        key = [list(g) for g in groups]
        if not collect:
            sources.append(None)
            shared = None
        elif reuse and shared is not None and shared[0] == key and (shared[1] or not wants_drift):
            sources.append("shared")
        else:
            sources.append("collect")
            # only a one-group pass can be shared: with several groups, the later ones' inputs change
            shared = (key, wants_drift) if len(groups) == 1 else None
    return sources


def _for_memos(memos, method: str, *args) -> None:
    """``memo.<method>(*args)`` on each memo that exists (the compressed block's and the reference copy's)."""
    for memo in memos:
        if memo is not None:
            getattr(memo, method)(*args)


def _on_cpu(result):
    """The result with its tensors moved to CPU (results are kept, written and checkpointed from CPU memory)."""
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, torch.Tensor):
            setattr(result, f.name, value.to("cpu"))
    return result


def _share_weights(model: nn.Module, block_results: dict) -> None:
    """Point each finished result's ``weight`` at its layer's parameter instead of keeping an equal copy.

    In-memory runs leave the model holding exactly the results' weights; for float32 models the result's float32
    copy is redundant (about as large as the model's block weights), so it becomes a view of the parameter. Layers
    whose dtype differs keep their copy. The view follows later in-place writes to the model.
    """
    for name, result in block_results.items():
        module = model.get_submodule(name)
        weight = linear_weight(module)
        if weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.equal(weight, result.weight):
            result.weight = weight


def _final_forward(block, batch, h, args, kwargs, device, memo):
    if memo is not None:
        memo.set_batch(batch)
    return run_block(block, h.to(device), args, kwargs).to("cpu")


# Masks of the layers pruned in the current block, for a later stage that must keep their zeros (prune, then GPTQ).
# Cleared at the start of every block (``Engine._block_plan``), so at most one block's masks are held.
_PRUNED_MASKS: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, str]]" = weakref.WeakKeyDictionary()


def _needs_hessian(stage: StageBase) -> bool:
    """Whether ``stage``'s solver reads its layers' input Hessians (the statistic a collection pass accumulates).

    Magnitude pruning does not: its mask depends on ``|W|`` alone (``magnitude_prune``), so its layers get no
    collection pass; their ``rel_output_error`` and ``tokens`` are None (that diagnostic was the Hessian's only use).
    Every other stage does (RTN too: its clip search weights columns by the Hessian diagonal).
    """
    return not isinstance(stage, MagnitudeStage) or bool(stage.refit_iterations)


def _solve(stage: StageBase, module: nn.Module, hessian: torch.Tensor | None,
           drift: DriftStats | None = None, uncompressed: nn.Module | None = None) -> QuantResult | PruneResult:
    """Solve one layer for ``stage``: a QuantResult for quantization (and joint SparseGPT), a PruneResult for pruning.

    A layer pruned by an earlier stage of this block keeps its zeros through GPTQ (mask-aware sweep) and RTN (0 is
    always on the grid). ``drift`` (stages with ``fp_target``): the sweep runs on the asymmetric target
    ``W* = W (C + l I)(H~ + l I)^-1`` instead of the layer's current weight (``fp_target_weight``), where W is the
    weight of ``uncompressed`` (the same layer in the unmodified copy of the block): the target is the uncompressed
    model's output, also for a stage that follows another one (prune, then GPTQ). Building it from the weight an
    earlier stage left would aim at that stage's output on the uncompressed inputs instead, and when the earlier stage
    had ``fp_target`` too, apply the drift correction twice (P1: sparse50 then w4g128, both with ``fp_target``, gave
    WikiText-2 perplexity 1358 that way).
    """
    source = uncompressed if drift is not None and uncompressed is not None else module
    weight = linear_weight(source).detach().float().clone()
    original = None
    drift_info: dict = {}
    if drift is not None:
        original = weight
        if drift.cross.identical:  # X~ == X on every token (e.g. block 0's first group): W* = W, skip the solve
            drift_info = {"fp_target_identical_inputs": True}
        else:
            weight, drift_info = fp_target_weight(weight, drift.cross.cross.to(hessian.device), hessian,
                                                  damp_percent=stage.damp_percent)
    result = _solve_stage(stage, module, weight, hessian)
    if drift is not None:
        # rel_output_error becomes the asymmetric error ||W X - Q X~||^2 / ||W X||^2 (against the uncompressed
        # layer on the uncompressed inputs); the sweep's own error on its target is kept as *_local
        reference, cross = drift.reference.hessian.to(hessian.device), drift.cross.cross.to(hessian.device)
        drift_only, after = asymmetric_output_error(original, result.weight, reference, cross, hessian)
        result.info = {**(result.info or {}), **drift_info, "fp_target": True,
                       "rel_output_error_local": result.rel_output_error,
                       "rel_output_error_drift_only": drift_only, "rel_output_error": after}
        result.rel_output_error = after
    return result


def _solve_stage(stage: StageBase, module: nn.Module, weight: torch.Tensor,
                 hessian: torch.Tensor | None) -> QuantResult | PruneResult:
    if isinstance(stage, PruneStage):
        if isinstance(stage, MagnitudeStage):
            result = magnitude_prune(weight, stage.sparsity, stage.pattern, hessian=hessian)
        elif isinstance(stage, WandaStage):
            result = wanda_prune(weight, hessian, stage.sparsity, stage.pattern)
        else:
            result = sparsegpt_prune(weight, hessian, stage.sparsity, stage.pattern, damp_percent=stage.damp_percent,
                                     block_size=stage.block_size, spec=stage.grid(), act_order=stage.act_order,
                                     static_groups=stage.static_groups)
            if isinstance(result, QuantResult):
                result.info = {**result.info, "act_order": stage.act_order,
                               "static_groups": stage.static_groups or stage.act_order}
        if stage.refit_iterations:  # a prune-only result (the stage refuses refit_iterations with joint `bits`)
            refit, info = refit_kept_weights(weight, result.weight, result.mask, hessian, stage.refit_iterations,
                                             damp_percent=getattr(stage, "damp_percent", 0.01))
            result = PruneResult.from_weight(refit, result.mask, pattern=result.pattern,
                                             target_sparsity=result.target_sparsity,
                                             rel_output_error=info["rel_output_error"], info={**result.info, **info})
        mask = result.mask if isinstance(result, PruneResult) else result.pruned
        _PRUNED_MASKS[module] = (mask, stage.pattern)
        return result
    spec = stage.grid()
    mask, pattern = _PRUNED_MASKS.pop(module, (None, None))
    if isinstance(stage, GPTQStage):
        if mask is not None:  # check_recipe refuses act-order without static groups here
            result = gptq_keep_mask(weight, hessian, mask, spec, damp_percent=stage.damp_percent,
                                    block_size=stage.block_size, act_order=stage.act_order,
                                    static_groups=stage.static_groups)
            if stage.refit_scales:  # a pruned weight's code is its zero point: 0 whatever the scale
                result.info.update(refit_scales(result, weight, hessian))
        else:
            result = gptq_quantize(weight, hessian, spec, damp_percent=stage.damp_percent, block_size=stage.block_size,
                                   act_order=stage.act_order, static_groups=stage.static_groups,
                                   refit=stage.refit_scales)
        result.info = {**(result.info or {}), "act_order": stage.act_order, "static_groups": stage.static_groups}
        if stage.descent_passes:
            # the damping the sweep finally used (raised there if its Cholesky factorisation failed)
            result.info.update(coordinate_descent(result, weight, hessian, stage.descent_passes,
                                                  block_size=stage.block_size, keep=mask))
    else:
        result = rtn_quantize(weight, spec, hessian=hessian)
        result.info = {**(result.info or {}), "act_order": False, "static_groups": False}
    if mask is not None:  # the pruned zeros are kept: record them for the writer's sparsity_config
        result.pruned = mask
        result.info.update(pattern=pattern, sparsity=float((result.weight == 0).sum()) / result.weight.numel())
    return result


class Engine:
    """Compress ``model`` in place, block by block, following ``recipe``; keeps every layer's QuantResult.

    With ``streamer`` (streamed mode) the blocks' parameters live on the meta device: each block is read from disk
    onto ``device`` when reached and dropped again when done, so the model is not compressed in place (its blocks
    end on meta) and the QuantResults carry codes, scales and zeros but an empty ``weight`` (``dequantize`` gives
    it), so memory holds one dense block at a time.

    Stages with ``fp_target`` (asymmetric calibration) make the engine keep a second stream of hidden states, the
    uncompressed model's: both start from the captured block-0 inputs; each block is copied before any of its layers
    is solved, the copy gives the uncompressed inputs of the layers during those stages' statistics passes (paired
    token by token with the compressed inputs) and at the end of the block carries the uncompressed stream to the
    next block. The stream is checkpointed with the compressed one. Pass reuse (``reuse_passes``) applies to both
    the compressed block and the copy (same results, tested).
    In streamed mode the copy is of the one loaded block.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, recipe: Recipe, calibration: torch.Tensor,
                 device: str | torch.device = "cpu", checkpoint: Checkpoint | None = None, resume: bool = False,
                 progress: bool = True, on_block_done: Callable[[int], None] | None = None, batch_size: int = 8,
                 streamer: BlockStreamer | None = None, reuse_passes: bool = True):
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
        # skip work repeated between passes (PassMemo, and one collection pass for consecutive stages on the same
        # group); same results
        self.reuse_passes = reuse_passes
        self._verified: dict = {}

    def _owl_allocation(self, blocks, hidden: list[torch.Tensor], captured) -> dict[tuple[int, int], float]:
        """For each OWL stage, every block's sparsity from a dense pre-pass: ``{(stage number, block): sparsity}``.

        Blocks the stage selects no layer of keep the stage's target and do not count in the mean.
        """
        from ..methods.prune.owl import block_outlier_ratios, owl_sparsities

        prefix = self.adapter.block_path(self.model)
        allocation: dict[tuple[int, int], float] = {}

        def load(index, block):
            if self.streamer is not None:
                self.streamer.load(block, index, self.device)
            else:
                block.to(self.device)

        def release(index, block):
            if self.streamer is not None:
                self.streamer.release(block)
            elif self.device.type != "cpu":
                block.to("cpu")

        def forward(index, block, h):
            args = _to_device(captured.args[index], self.device)
            kwargs = _to_device(captured.kwargs[index], self.device)
            return run_block(block, h.to(self.device), args, kwargs).to("cpu")

        for number, stage in enumerate(self.recipe.stages):
            if getattr(stage, "allocation", "uniform") != "owl":
                continue

            def layers_of(index, block, _stage=stage):
                return {n: m for n, m in self.adapter.linears(block) if _stage.selects(f"{prefix}.{index}.{n}")}

            ratios = block_outlier_ratios(list(blocks), hidden, layers_of, linear_weight, forward, load, release,
                                          stage.owl_m)
            counted = [i for i, r in enumerate(ratios) if r == r]  # NaN: no selected layer in that block
            values = owl_sparsities([ratios[i] for i in counted], stage.sparsity, stage.owl_lambda)
            allocation.update({(number, i): v for i, v in zip(counted, values)})
            if self.progress:
                print(f"OWL stage {number + 1}: block sparsities " + " ".join(f"{v:.3f}" for v in values)
                      + " (outlier ratios " + " ".join(f"{ratios[i]:.4f}" for i in counted) + ")", file=sys.stderr)
        return allocation

    def _block_plan(self, index: int, block: nn.Module) -> list[tuple[QuantStage, list[list[str]]]]:
        """For each stage: the groups of this block (relative names) whose layers it selects."""
        prefix = f"{self.adapter.block_path(self.model)}.{index}."
        _PRUNED_MASKS.clear()  # the previous block's pruned layers are done
        plan = []
        for number, stage in enumerate(self.recipe.stages):
            owl = getattr(self, "owl_sparsities", {})
            if (number, index) in owl:  # OWL: this block's own sparsity
                stage = stage.model_copy(update={"sparsity": owl[(number, index)]})
            groups = [[n for n in group if stage.selects(prefix + n)] for group in self.adapter.linear_groups(block)]
            plan.append((stage, [g for g in groups if g]))
        return plan

    def _block_tasks(self, plan: list[tuple[StageBase, list[list[str]]]],
                     group_of: dict[str, int]) -> list[tuple[StageBase, list[list[str]], bool]]:
        """The block's work as ``(stage, groups solved after one collection pass, collect?)`` in running order.

        Stage order (the recipe's default ``order``): each stage over the whole block, then the next. Group order:
        every stage on a group before the next group, when each task covers a single group (true-sequential
        stages and stages without statistics); a stage that collects the statistics of several groups in one pass
        (``true_sequential: false``) needs the block as the stages before it left it, so such recipes keep stage
        order.
        """
        tasks = []
        for number, (stage, groups) in enumerate(plan):
            if not groups:  # the stage selects nothing in this block
                continue
            collect = _needs_hessian(stage)
            if not collect or getattr(stage, "true_sequential", False):  # without statistics: any order
                tasks.extend((number, stage, [g], collect) for g in groups)
            else:
                tasks.append((number, stage, groups, collect))
        if self.recipe.order == "group" and all(len(t[2]) == 1 for t in tasks):
            tasks.sort(key=lambda t: (group_of[t[2][0][0]], t[0]))
        return [(stage, groups, collect) for _, stage, groups, collect in tasks]

    def run(self) -> EngineResult:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        cpu_started = cpu_seconds()
        blocks = self.adapter.blocks(self.model)
        prefix = self.adapter.block_path(self.model)
        self.model.eval()
        captured = capture_block_inputs(self.model, blocks, self.calibration, self.device)
        hidden = list(torch.cat(captured.hidden).split(self.batch_size))
        captured.hidden = []  # the per-window copies are now in `hidden`: do not hold them twice
        self.owl_sparsities = self._owl_allocation(blocks, hidden, captured)  # dense pre-pass, before any restore
        # a block's outputs are the next block's calibration inputs: not needed when no stage collects statistics
        # (e.g. magnitude-only recipes), and then left as they are
        forward_blocks = any(_needs_hessian(stage) for stage in self.recipe.stages)
        # asymmetric calibration: the uncompressed model's hidden states, block by block (None when not asked for)
        fp_target = any(getattr(stage, "fp_target", False) for stage in self.recipe.stages)
        reference_hidden = list(hidden) if fp_target else None
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
                    loaded = self.checkpoint.load_block(index)
                    for name, result in loaded.items():
                        if self.streamer is None:
                            module = self.model.get_submodule(name)
                            set_linear_weight(module, result.weight.to(linear_weight(module).dtype))
                        else:
                            result.weight = torch.empty(0)
                        results[name] = result
                    if self.streamer is None:
                        _share_weights(self.model, loaded)
                hidden = list(self.checkpoint.load_hidden().split(self.batch_size)) if first else hidden
                if fp_target and first:
                    reference_hidden = list(self.checkpoint.load_reference_hidden().split(self.batch_size))
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
            all_groups = self.adapter.linear_groups(block)
            group_of = {name: i for i, group in enumerate(all_groups) for name in group}
            memo = PassMemo(block, all_groups, self._verified) if self.reuse_passes else None
            # the unmodified block, copied before the memo patches its containers and before any solve
            original = copy.deepcopy(block) if fp_target else None
            # the copy never changes, so the memo's invalidation (as if the compressed block's groups changed) is
            # only conservative there: its passes reuse work the same way
            reference_memo = (PassMemo(original, all_groups, self._verified)
                              if memo is not None and original is not None else None)
            with contextlib.ExitStack() as memos:
                for m in (memo, reference_memo):
                    if m is not None:
                        memos.enter_context(m)
                tasks = self._block_tasks(self._block_plan(index, block), group_of)
                sources = _pass_sources(tasks, self.reuse_passes)
                # the copy of the block is needed up to the last fp_target collection pass: that pass runs it to its
                # end, and its outputs are the uncompressed stream's next inputs (no final forward of the copy)
                last_drift = max((i for i, (t, source) in enumerate(zip(tasks, sources))
                                  if source == "collect" and getattr(t[0], "fp_target", False)), default=None)
                shared_stats = None  # the statistics (and drift) of the last collection pass
                for number, (stage, pass_groups, collect) in enumerate(tasks):
                    firsts = {g[0]: block.get_submodule(g[0]) for g in pass_groups}
                    changes = {group_of[g[0]] for g in pass_groups}
                    finishing = number == last_drift  # this pass is the copy's last: it runs to the block's end
                    # without a pass too: drop what these changes invalidate
                    if memo is not None:
                        memo.begin_pass(changes)
                    if reference_memo is not None:
                        reference_memo.begin_pass(changes, keep=not finishing)
                    stats, drift = {}, {}
                    wants_drift = getattr(stage, "fp_target", False)
                    if sources[number] == "shared":
                        # an earlier stage just solved this very group after the same pass; its inputs depend only
                        # on the groups before it, so its statistics still hold
                        stats, drift = shared_stats[0], (shared_stats[1] if wants_drift else {})
                    elif collect:
                        reference = (original, reference_hidden, reference_memo) if wants_drift else None
                        stats, drift = _collect(block, firsts, hidden, args, kwargs, self.device,
                                                stop_at=pass_groups[-1][0], memo=memo, reference=reference,
                                                finish_reference=finishing)
                        shared_stats = (stats, drift)
                    _for_memos((memo, reference_memo), "end_pass")
                    for group in pass_groups:
                        hessian = stats[group[0]].hessian if collect else None
                        for name in group:
                            module = block.get_submodule(name)
                            t0 = time.perf_counter()
                            layer_drift = drift.get(group[0])
                            result = _solve(stage, module, hessian, layer_drift,
                                            original.get_submodule(name) if layer_drift is not None else None)
                            set_linear_weight(module, result.weight.to(linear_weight(module).dtype))
                            full = f"{prefix}.{index}.{name}"
                            block_results[full] = _on_cpu(result) if self.device.type != "cpu" else result
                            out_f, in_f = linear_dims(module)
                            layers.append({"name": full, "block": index, "method": stage.method,
                                           "out_features": out_f, "in_features": in_f,
                                           "rel_output_error": result.rel_output_error,
                                           "seconds": round(time.perf_counter() - t0, 4),
                                           "tokens": stats[group[0]].tokens if collect else None,
                                           **{k: v for k, v in (result.info or {}).items()
                                              if k in ("damp_percent", "damp", "damp_retries", "dead_columns",
                                                       "loss", "sparsity", "target_sparsity", "pattern",
                                                       "refit_rows", "refit_iterations", "refit_rows_kept",
                                                       "rel_output_error_before_refit",
                                                       "rel_output_error_local", "rel_output_error_drift_only",
                                                       "fp_target_damp_retries", "cd_passes",
                                                       "cd_changed_codes", "rel_output_error_before_cd")}})
                    del stats, drift
                    release_free_heap()  # the pass's inputs and statistics are freed: the next pass starts lower
                del shared_stats
                if forward_blocks:
                    _for_memos((memo, reference_memo), "begin_pass", None)
                    with torch.no_grad():
                        # each batch's outputs replace its inputs at once: one stream's worth of memory, not two
                        for b, h in enumerate(hidden):
                            hidden[b] = _final_forward(block, b, h, args, kwargs, self.device, memo)
                        # the last fp_target pass ran the copy to its end (reference_hidden holds its outputs)
                        if original is not None and last_drift is None:
                            for b, h in enumerate(reference_hidden):
                                reference_hidden[b] = _final_forward(original, b, h, args, kwargs, self.device,
                                                                     reference_memo)
            del original, reference_memo
            if self.streamer is not None:
                self.streamer.release(block)
                for result in block_results.values():
                    result.weight = torch.empty(0)  # the checkpoint and writer need only codes, scales, zeros
            else:
                if self.device.type != "cpu":
                    block.to("cpu")
                _share_weights(self.model, block_results)
            results.update(block_results)
            release_free_heap()  # the final forwards' and the block copy's memory
            errors = " ".join(f"{n.rsplit('.', 1)[-1]}={r.rel_output_error:.4f}" for n, r in block_results.items()
                              if r.rel_output_error is not None)
            if self.progress:
                bar.write(f"block {index + 1}/{len(blocks)} ({time.perf_counter() - block_start:.1f}s) "
                          f"rel. output error: {errors}")
            if self.checkpoint is not None:
                self.checkpoint.save_block(index, block_results, hidden, {"layers": layers},
                                           reference_hidden=reference_hidden)
            bar.update(1)
            if self.on_block_done is not None:
                self.on_block_done(index)
        bar.close()
        return EngineResult(results=results, layers=layers, seconds=time.perf_counter() - started,
                            peak_rss_bytes=peak_rss_bytes(), resumed_from_block=first, blocks=len(blocks),
                            cpu_seconds=cpu_seconds() - cpu_started)
