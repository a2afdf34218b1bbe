"""The block-by-block compression loop (see docs/design.md).

For each decoder block: the recipe's stages run in order. A layer stage gets, for each linear it selects, the
statistics it asked for (``core.stage.Stat``), collected by hooks while the calibration windows run through the
block; a block stage gets the whole block with its calibration inputs. Then the windows run again through the
compressed block to become the next block's inputs. With true-sequential stages the statistics of a group are
collected after the groups before it are compressed, and each collection pass stops as soon as the group's input
is seen. Stages that read no statistic get no collection pass, and a recipe of only such stages runs no block
forward at all. The engine dispatches on a stage's scope and never imports a method.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.process import cpu_seconds, peak_rss_bytes, release_free_heap
from lmshrink.core.results import RESULT_KINDS
from lmshrink.core.stage import LAST_RESULT, PENDING_OUTPUT_NORM, Scope, StageBase, Stat
from lmshrink.engine.capture import capture_block_inputs, run_block
from lmshrink.engine.checkpoint import Checkpoint, StoredResults
from lmshrink.engine.distributed import Group
from lmshrink.engine.jobs import BlockJob, LayerJob, ModelJob, Task
from lmshrink.engine.offload import BlockStreamer
from lmshrink.engine.passes import collect, pass_sources, plain_linears, projectable, to_device
from lmshrink.engine.replay import PassMemo
from lmshrink.engine.statistics import GroupStats, OutputNorm
from lmshrink.models.adapters import ModelAdapter, linear_dims, linear_weight, set_linear_weight
from lmshrink.models.structure import apply_structure, drop_blocks, signature, structure_diff


@dataclass
class EngineResult:
    """``results``: full layer name -> result; ``layers``: one record per solved layer; ``tensors``: other block
    tensors stages changed (full names, final values on CPU), which a streamed run's writer must take from here."""

    results: dict[str, Any]
    layers: list[dict]
    seconds: float
    peak_rss_bytes: int
    resumed_from_block: int = 0
    blocks: int = 0
    cpu_seconds: float = 0.0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    block_options: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    block_records: list[dict] = field(default_factory=list)  # what block stages reported per block (``record``)
    # structural changes: block -> structure_diff of the block (relative names); the kept blocks' indices in the
    # model the run started from when a stage removed blocks (None when none was removed)
    structures: dict[int, dict[str, Any]] = field(default_factory=dict)
    block_sources: list[int] | None = None
    ranks: int = 1
    # mixture of experts: per block, the calibration tokens the router sent each expert and the experts calibrated
    # on every token instead (``Engine._expert_fallback``)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # wall seconds of this process by part: "forwards" (the calibration windows through blocks: capture, collection
    # passes, final forwards), "statistics" (accumulating statistics in the collection passes' hooks), "solves"
    # (layer solves on this rank), "block_stages", "exchange" (waiting for and moving data between ranks),
    # "checkpoint" (writing progress)
    parts: dict[str, float] = field(default_factory=dict)


def _on_cpu(result):
    """The result with its tensors moved to CPU (results are kept, written and checkpointed from CPU memory), also
    those of a result it holds (a corrected result's base)."""
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, torch.Tensor):
            setattr(result, f.name, value.to("cpu"))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _on_cpu(value)
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


def _for_memos(memos, method: str, *args) -> None:
    """``memo.<method>(*args)`` on each memo that exists (the compressed block's and the reference copy's)."""
    for memo in memos:
        if memo is not None:
            getattr(memo, method)(*args)


def _final_forward(block, batch, h, args, kwargs, device, memo):
    if memo is not None:
        memo.set_batch(batch)
    return run_block(block, h.to(device), args, kwargs).to("cpu")


class Engine:
    """Compress ``model`` in place, block by block, with ``stages`` (a list of stages, or a recipe: anything with
    ``stages`` and ``order``); keeps every layer's result.

    With ``streamer`` (streamed mode) the blocks' parameters live on the meta device: each block is read from disk
    onto ``device`` when reached and dropped again when done, so the model is not compressed in place (its blocks
    end on meta) and the results carry their compact form with an empty ``weight``, so memory holds one dense
    block at a time.

    Stages that need ``Stat.FP_TARGET`` (asymmetric calibration) make the engine keep a second stream of hidden
    states, the uncompressed model's: both start from the captured block-0 inputs; each block is copied before any
    of its layers is solved, the copy gives the uncompressed inputs of the layers during those stages' statistics
    passes (paired token by token with the compressed inputs) and at the end of the block carries the uncompressed
    stream to the next block. The stream is checkpointed with the compressed one. Pass reuse (``reuse_passes``)
    applies to both the compressed block and the copy (same results, tested).

    With a ``group`` of several ranks (data-parallel calibration, ``engine.distributed``) every rank runs the same
    engine on its own batches of windows: statistics are summed over the ranks before a layer is solved, each layer
    is solved by one rank and its result sent to the others, the checkpoint is written by rank 0 (the hidden states
    gathered there, in the single-process layout) and only rank 0 keeps the results. The result is the
    single-process one, whatever the number of ranks.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, stages, calibration: torch.Tensor,
                 device: str | torch.device = "cpu", checkpoint: Checkpoint | None = None, resume: bool = False,
                 progress: bool = True, on_block_done: Callable[[int], None] | None = None, batch_size: int = 8,
                 streamer: BlockStreamer | None = None, reuse_passes: bool = True, order: str | None = None,
                 group: Group | None = None, expert_min_tokens: int | None = None):
        if hasattr(stages, "stages"):  # a recipe
            order = order or stages.order
            stages = stages.stages
        self.model = model
        self.adapter = adapter
        self.stages: Sequence[StageBase] = list(stages)
        self.order = order or "stage"
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
        self._transforms: list[StageBase] = []  # stages whose before_blocks ran: their transform_block applies
        self._changed: dict[int, set[str]] = {}  # block -> tensors (relative names) transforms or stages changed
        self._sources: list[int] | None = None  # kept block -> its index in the model the run started from
        self._options: dict[tuple[int, int], dict[str, Any]] = {}
        # data-parallel ranks (engine.distributed): each runs its own calibration batches, statistics are summed
        # over all, each layer is solved by one rank; a single process is a group of one
        self.group = group or Group()
        # a routed expert that receives fewer calibration tokens is calibrated on every token (None: a tenth of the
        # mean its block's experts receive); one that receives none always is
        self.expert_min_tokens = expert_min_tokens
        self._experts_record: dict[str, dict[str, Any]] = {}  # block -> routed tokens per expert and fallbacks
        self.parts: dict[str, float] = {}  # wall seconds by part of the work (EngineResult.parts)

    @contextlib.contextmanager
    def _timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - started

    def _collect(self, *args, **kwargs) -> dict[str, GroupStats]:
        """``collect``, its time counted under "forwards" less the statistics' own under "statistics"."""
        before = self.parts.get("statistics", 0.0)
        with self._timed("forwards"):
            stats = collect(*args, clock=self.parts, **kwargs)
        self.parts["forwards"] -= self.parts.get("statistics", 0.0) - before
        return stats

    # -- blocks on and off the compute device ---------------------------------------------------------------------
    def _transform(self, index: int, block: nn.Module, stages) -> None:
        for stage in stages:
            changed = stage.transform_block(index, block)
            if changed:
                self._changed.setdefault(index, set()).update(changed)

    def _load(self, index: int, block: nn.Module) -> None:
        if self.streamer is not None:  # read from disk: every transform applies again
            self.streamer.load(block, index, self.device)
            self._transform(index, block, self._transforms)
        else:
            block.to(self.device)

    def _release(self, block: nn.Module) -> None:
        if self.streamer is not None:
            self.streamer.release(block)
        elif self.device.type != "cpu":
            block.to("cpu")

    # -- model-wide passes ----------------------------------------------------------------------------------------
    def _statistics_pass(self, needs: frozenset[Stat], select, observe, streams: bool = False) -> list:
        """``ModelJob.statistics_pass``: the dense model, block by block, from freshly captured block-0 inputs."""
        if Stat.FP_TARGET in needs:
            raise ValueError("a statistics pass runs the model as it is: Stat.FP_TARGET has no meaning there")
        if streams and self.group.active:
            raise LmshrinkError(
                f"a model-wide pass that reads the blocks' hidden states (e.g. block removal by influence) sees only "
                f"its rank's calibration batches: not supported across the {self.group.world} ranks of a "
                "data-parallel run", fix="run this recipe in a single process (without torchrun)")
        blocks = self.adapter.blocks(self.model)
        prefix = self.adapter.block_path(self.model)
        with self._timed("forwards"):
            captured, hidden, _ = self._capture(blocks)
        observations = []
        for index, block in enumerate(blocks):
            self._load(index, block)
            args = to_device(captured.args[index], self.device)
            kwargs = to_device(captured.kwargs[index], self.device)
            modules = {n: m for n, m in self.adapter.linears(block) if select(f"{prefix}.{index}.{n}")}
            outputs: list[torch.Tensor] = []
            stats = self._collect(block, modules, needs, hidden, args, kwargs, self.device, stop_at=None,
                                  outputs=outputs)
            self._reduce(stats)
            if streams:
                observations.append(observe(index, block, stats, hidden, outputs))
            else:
                observations.append(observe(index, block, stats))
            hidden = outputs
            del stats
            self._release(block)
        return observations

    def _drop_blocks(self, remove: list[int]) -> None:
        """``ModelJob.drop_blocks``: remove blocks before the loop; what is keyed by block index follows."""
        if self.group.active:
            raise LmshrinkError(
                f"removing blocks (structured depth pruning) is supported in a single process only, not across the "
                f"{self.group.world} ranks of a data-parallel run", fix="run this recipe in a single process "
                "(without torchrun)")
        kept = drop_blocks(self.model, remove, self.adapter)
        new = {old: i for i, old in enumerate(kept)}
        self._sources = [(self._sources or list(range(len(kept) + len(set(remove)))))[old] for old in kept]
        if self.streamer is not None:
            self.streamer.sources = self._sources
        self._changed = {new[i]: names for i, names in self._changed.items() if i in new}
        remapped = {(n, new[b]): o for (n, b), o in self._options.items() if b in new}
        self._options.clear()  # in place: the ModelJob holds this dict
        self._options.update(remapped)

    def _before_blocks(self, prefix: str) -> dict[tuple[int, int], dict[str, Any]]:
        job = ModelJob(model=self.model, adapter=self.adapter, blocks=self.adapter.blocks(self.model), prefix=prefix,
                       progress=self.progress, _statistics_pass=self._statistics_pass,
                       _drop_blocks=self._drop_blocks, block_options=self._options, calibration=self.calibration)
        for number, stage in enumerate(self.stages):
            stage.before_blocks(job, number)
            self._transforms.append(stage)
            if self.streamer is None:  # in memory: each block is transformed once, here
                for index, block in enumerate(self.adapter.blocks(self.model)):
                    self._transform(index, block, [stage])
        return self._options

    def _restore(self, index: int, block: nn.Module, saved: dict[str, torch.Tensor], options) -> None:
        """On resume: each block stage re-applies to finished block ``index`` the structure its work gave it (e.g.
        quantizers on its layers), from the tensors it saved."""
        prefix = f"{self.adapter.block_path(self.model)}.{index}."
        tensors = {name[len(prefix):]: value for name, value in saved.items() if name.startswith(prefix)}
        for stage, groups in self._block_plan(index, block, options):
            if groups and stage.scope is Scope.BLOCK:
                stage.restore_block(index, block, groups, tensors)

    # -- calibration batches, statistics and solves across ranks -------------------------------------------------
    def _capture(self, blocks) -> tuple[Any, list[torch.Tensor], int]:
        """Block-0 inputs of this rank's batches: ``(captured arguments, hidden batches, number of batches)``.

        The windows form batches of ``batch_size`` in their order; a rank captures the windows of its own batches
        (all of them in a single process), so each batch holds the same windows whatever the number of ranks.
        """
        windows = self.calibration.shape[0]
        spans = [(start, min(start + self.batch_size, windows)) for start in range(0, windows, self.batch_size)]
        self.group.check_batches(len(spans), self.batch_size)
        mine = self.group.batches(len(spans))
        index = torch.cat([torch.arange(*spans[b]) for b in mine])
        captured = capture_block_inputs(self.model, blocks, self.calibration[index], self.device)
        flat = torch.cat(captured.hidden)
        captured.hidden = []  # the per-window copies are now in the batches: do not hold them twice
        return captured, list(flat.split([spans[b][1] - spans[b][0] for b in mine])), len(spans)

    def _reduce(self, stats: dict[str, GroupStats]) -> None:
        """Sum each group's statistics over the ranks (nothing to do in a single process)."""
        if self.group.active:
            with self._timed("exchange"):
                for name in sorted(stats):  # the same order on every rank
                    stats[name].reduce(self.group)

    def _owners(self, block: nn.Module, groups: list[list[str]]) -> dict[str, int]:
        """The rank that solves each layer: within each group, the largest layers first, each to the rank with the
        least work so far in that group (the same on every rank)."""
        owners = {}
        for group in groups:
            load = [0] * self.group.world
            sizes = {n: linear_dims(block.get_submodule(n))[0] * linear_dims(block.get_submodule(n))[1] for n in group}
            for name in sorted(group, key=lambda n: (-sizes[n], group.index(n))):
                rank = min(range(self.group.world), key=lambda r: (load[r], r))
                owners[name] = rank
                load[rank] += sizes[name]
        return owners

    def _share(self, owner: int, result, seconds: float, state: dict[str, Any]) -> tuple[Any, float]:
        """The result (and solve time) of a layer solved on rank ``owner``, on every rank; the layer's hand-over for
        later stages (``state``) is updated in place to the owner's."""
        if not self.group.active:
            return result, seconds
        with self._timed("exchange"):
            return self._exchange(owner, result, seconds, state)

    def _exchange(self, owner: int, result, seconds: float, state: dict[str, Any]) -> tuple[Any, float]:
        mine = self.group.rank == owner
        header, tensors = None, None
        if mine:
            tensors, meta = result.to_state()
            header = {"kind": result.kind, "meta": meta, "seconds": seconds, "state": bool(state)}
        header = self.group.broadcast_json(header, owner)
        tensors = self.group.broadcast_tensors(tensors, owner)
        if header["state"]:
            handed = self.group.broadcast_object(dict(state) if mine else None, owner)
            state.clear()
            state.update(handed)
        if not mine:
            result = RESULT_KINDS[header["kind"]].from_state(tensors, header["meta"])
        return result, header["seconds"]

    def _expert_fallback(self, index: int, block: nn.Module, task: Task, stats: dict[str, GroupStats],
                         experts: dict[str, int], group_of: dict[str, int], hidden, args, kwargs,
                         memo: PassMemo | None) -> dict[str, dict[str, Any]]:
        """Routed experts of ``task`` with fewer calibration tokens than the threshold get statistics from every
        token instead (a pass routing all tokens through them, for calibration only; the block's output still
        counts the router's choice), never a zero or NaN statistic. Replaces their entries in ``stats``; returns
        what each expert group's record says (routed tokens, fallback) and keeps the block's token counts."""
        routed = {g[0]: int(stats[g[0]].tokens or 0) for g in task.groups if g[0] in experts and g[0] in stats}
        if not routed:
            return {}
        mean = sum(routed.values()) / len(routed)
        threshold = max(1, self.expert_min_tokens if self.expert_min_tokens is not None else math.ceil(mean / 10))
        starved = sorted((n for n, tokens in routed.items() if tokens < threshold), key=lambda n: group_of[n])
        down = self.adapter.spec.moe.projections[2]
        kinds = {n: "down" if n.endswith("." + down) else "gate_up" for n in routed}
        entry = self._experts_record.setdefault(str(index), {"min_tokens": threshold, "tokens": {}, "fallback": {}})
        entry["tokens"].update({str(experts[n]): tokens for n, tokens in routed.items() if kinds[n] == "gate_up"})
        for kind in sorted(set(kinds.values())):
            entry["fallback"][kind] = [experts[n] for n in starved if kinds[n] == kind]
        notes = {n: {"expert": experts[n], "routed_tokens": tokens} for n, tokens in routed.items()}
        if not starved:
            return notes
        if memo is not None:
            memo.begin_pass({group_of[n] for n in starved})
        with self.adapter.experts_module(block).routing_all({experts[n] for n in starved}):
            fallback = self._collect(block, {n: block.get_submodule(n) for n in starved}, task.needs(), hidden,
                                     args, kwargs, self.device, stop_at=starved[-1], memo=memo)
        if memo is not None:
            memo.end_pass()
        self._reduce(fallback)
        for name in starved:
            stats[name] = fallback[name]
            notes[name].update(fallback="all-tokens", fallback_tokens=int(fallback[name].tokens or 0))
        return notes

    def _check_data_parallel(self) -> None:
        if not self.group.active:
            return
        refused = [stage.method for stage in self.stages if not stage.supports_data_parallel()]
        if refused:
            raise LmshrinkError(
                f"stage(s) {', '.join(refused)} do not support data-parallel calibration: they compute from their "
                f"rank's calibration batches without summing over the {self.group.world} ranks",
                fix="run these recipes in a single process (without torchrun)")
        # a block stage that reads Stat.FP_TARGET (e.g. prune-width with fp_target) runs the
        # block's uncompressed copy on its own rank's batches only
        drift = [stage.method for stage in self.stages
                 if stage.scope is Scope.BLOCK and Stat.FP_TARGET in stage.needs()]
        if drift:
            raise LmshrinkError(
                f"block stage(s) {', '.join(drift)} read Stat.FP_TARGET (the uncompressed model's inputs), which is "
                f"supported in a single process only, not across the {self.group.world} ranks of a data-parallel run",
                fix="run these recipes in a single process (without torchrun)")

    def _open_checkpoint(self) -> dict[str, Any]:
        """Rank 0: the saved progress to resume from (``first`` finished blocks and their records), or a fresh
        work folder."""
        state = self.checkpoint.load() if self.resume else None
        if state is None:
            self.checkpoint.start()
            return {"first": 0, "layers": [], "experts": {}, "block_records": []}
        if state.get("block_sources") != self._sources:
            raise LmshrinkError(
                f"{self.checkpoint.folder} holds progress on blocks {state.get('block_sources')} of the model, "
                f"but this run's stages kept blocks {self._sources}",
                fix=self.checkpoint.start_over_fix)
        return {"first": state["finished_blocks"], "layers": state["layers"], "experts": state.get("experts", {}),
                "block_records": state.get("block_records", [])}

    def _saved_batches(self, stream: torch.Tensor | None, count: int) -> list[torch.Tensor]:
        """This rank's batches of a saved stream (read on rank 0 and sent to the others)."""
        batches = list(stream.split(self.batch_size)) if stream is not None else None
        return self.group.scatter_batches(batches, count)

    # -- one block's plan -----------------------------------------------------------------------------------------
    def _block_plan(self, index: int, block: nn.Module, options) -> list[tuple[StageBase, list[list[str]]]]:
        """For each stage: its variant for this block and the groups of this block (relative names) it selects."""
        prefix = f"{self.adapter.block_path(self.model)}.{index}."
        plan = []
        for number, stage in enumerate(self.stages):
            if (number, index) in options:
                stage = stage.model_copy(update=options[(number, index)])
            groups = [[n for n in group if stage.selects(prefix + n)] for group in self.adapter.linear_groups(block)]
            plan.append((stage, [g for g in groups if g]))
        return plan

    @staticmethod
    def _split_experts(task: Task, experts: dict[str, int] | None) -> list[Task]:
        """``task`` as it is, or, for a stage that reads ``Stat.FP_TARGET``, split where its groups go from other
        layers to routed experts and back: the experts' tasks collect the rest of the statistics without it."""
        if not experts or Stat.FP_TARGET not in task.stage.needs():
            return [task]
        parts: list[Task] = []
        for group in task.groups:
            routed = group[0] in experts
            if parts and (Stat.FP_TARGET in parts[-1].drop) == routed:
                parts[-1].groups.append(group)
            else:
                parts.append(Task(task.number, task.stage, [group],
                                  drop=frozenset({Stat.FP_TARGET}) if routed else frozenset()))
        return parts

    def _block_tasks(self, plan: list[tuple[StageBase, list[list[str]]]], group_of: dict[str, int],
                     steps: list[int] | None = None, experts: dict[str, int] | None = None) -> list[Task]:
        """The block's work in running order.

        Stage order (the recipe's default ``order``): each stage over the whole block, then the next. Group order:
        every stage on a group before the next group, when each task covers a single group (true-sequential layer
        stages and stages without statistics); a stage that collects the statistics of several groups in one pass
        needs the block as the stages before it left it, and a block stage takes the whole block, so such recipes
        keep stage order. ``steps`` (the adapter's ``independent_steps``): consecutive groups of one step, whose
        inputs do not depend on each other's weights (the experts of a MoE block), make one true-sequential task,
        collected in one pass with the same statistics as one pass per group.
        """
        tasks: list[Task] = []
        for number, (stage, groups) in enumerate(plan):
            if not groups or stage.scope is Scope.MODEL:
                continue
            if stage.scope is Scope.BLOCK:
                tasks.append(Task(number, stage, groups, block=True))
            elif not stage.needs() or stage.sequential:  # without statistics: any order
                runs: list[list[list[str]]] = []
                for g in groups:
                    at = group_of[g[0]]
                    if (runs and steps is not None and steps[at] == steps[group_of[runs[-1][-1][0]]]
                            and at == group_of[runs[-1][-1][0]] + 1):
                        runs[-1].append(g)
                    else:
                        runs.append([g])
                for run in runs:
                    tasks.extend(self._split_experts(Task(number, stage, run), experts))
            else:
                tasks.extend(self._split_experts(Task(number, stage, groups), experts))
        if self.order == "group" and all(not t.block and len(t.groups) == 1 for t in tasks):
            tasks.sort(key=lambda t: (group_of[t.groups[0][0]], t.number))
        return tasks

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> EngineResult:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        cpu_started = cpu_seconds()
        prefix = self.adapter.block_path(self.model)
        self.model.eval()
        self._check_data_parallel()
        options = self._before_blocks(prefix)  # before any restore: on resume they run again
        blocks = self.adapter.blocks(self.model)  # after any removal of blocks
        with self._timed("forwards"):
            captured, hidden, batches = self._capture(blocks)
        root = self.group.is_root  # the rank that keeps the results and writes the checkpoint
        # a block's outputs are the next block's calibration inputs: not needed when no stage reads the block's
        # inputs (e.g. magnitude-only recipes), and then left as they are
        forward_blocks = any(stage.needs() or stage.scope is Scope.BLOCK for stage in self.stages)
        # asymmetric calibration: the uncompressed model's hidden states, block by block (None when not asked for)
        fp_target = any(Stat.FP_TARGET in stage.needs() for stage in self.stages)
        reference_hidden = list(hidden) if fp_target else None
        # streamed runs with a work folder keep finished blocks' results on disk, not in memory: memory then holds
        # one block's results, however deep the model
        stored = self.streamer is not None and self.checkpoint is not None
        results: dict[str, Any] | StoredResults = StoredResults() if stored else {}
        tensors: dict[str, torch.Tensor] = {}
        structures: dict[int, dict[str, Any]] = {}
        layers: list[dict] = []
        block_records: list[dict] = []
        first = 0
        if self.checkpoint is not None:
            opened = self.group.root(self._open_checkpoint)
            first, layers = opened["first"], opened["layers"]
            block_records = opened["block_records"]
            self._experts_record = opened["experts"]
            if first:
                for index in range(first if root else 0):
                    structure = self.checkpoint.load_structure(index)
                    if structure:  # the block's new shapes first, then its values
                        apply_structure(blocks[index], structure,
                                        device="meta" if self.streamer is not None else None)
                        structures[index] = structure
                    if stored:  # the results stay in the block files
                        results.add_block(self.checkpoint.block_path(index))
                        saved_tensors = self.checkpoint.load_block_tensors(index)
                        self._restore(index, blocks[index], saved_tensors, options)
                        tensors.update(saved_tensors)
                        continue
                    loaded, saved_tensors = self.checkpoint.load_block(index)
                    for name, result in loaded.items():
                        if self.streamer is None:
                            module = self.model.get_submodule(name)
                            set_linear_weight(module, result.weight.to(linear_weight(module).dtype))
                        else:
                            result.weight = torch.empty(0)
                        results[name] = result
                    self._restore(index, blocks[index], saved_tensors, options)
                    for name, value in saved_tensors.items():
                        if self.streamer is None:
                            with torch.no_grad():
                                self.model.state_dict(keep_vars=True)[name].copy_(value)
                        tensors[name] = value
                    if self.streamer is None:
                        _share_weights(self.model, loaded)
                hidden = self._saved_batches(self.checkpoint.load_hidden() if root else None, batches)
                if fp_target:
                    reference_hidden = self._saved_batches(
                        self.checkpoint.load_reference_hidden() if root else None, batches)
        bar = tqdm(total=len(blocks), initial=first, desc="compress", unit="block", disable=not self.progress,
                   dynamic_ncols=True)
        for index in range(first, len(blocks)):
            block_start = time.perf_counter()
            records_before = len(layers)
            block = blocks[index]
            self._load(index, block)
            shape_before = signature(block)  # what the stages change in the block's structure is found from this
            args = to_device(captured.args[index], self.device)
            kwargs = to_device(captured.kwargs[index], self.device)
            block_results: dict[str, Any] = {}
            changed = set(self._changed.get(index, ()))
            all_groups = self.adapter.linear_groups(block)
            group_of = {name: i for i, group in enumerate(all_groups) for name in group}
            owners = self._owners(block, all_groups)
            memo = PassMemo(block, all_groups, self._verified) if self.reuse_passes else None
            # the unmodified block, copied before the memo patches its containers and before any solve
            original = copy.deepcopy(block) if fp_target else None
            # the copy never changes, so the memo's invalidation (as if the compressed block's groups changed) is
            # only conservative there: its passes reuse work the same way
            reference_memo = (PassMemo(original, all_groups, self._verified)
                              if memo is not None and original is not None else None)
            handover: dict[str, dict[str, Any]] = {}  # what a stage leaves for a later one, per layer
            # output norms of the copy's layers (relative name), summed in the first pass that runs each, and the
            # record lines waiting for them (stages that take ||W X||^2 after the solve: fp_target_projected)
            norms: dict[str, OutputNorm] = {}
            pending: list[tuple[StageBase, dict, Any]] = []
            with contextlib.ExitStack() as memos:
                for m in (memo, reference_memo):
                    if m is not None:
                        memos.enter_context(m)
                experts = self.adapter.expert_groups(block)  # routed experts' groups: first linear -> expert
                tasks = self._block_tasks(self._block_plan(index, block, options), group_of,
                                          self.adapter.independent_steps(block), experts)
                sources = pass_sources(tasks, self.reuse_passes)
                # the copy of the block is needed up to the last fp_target collection pass: that pass runs it to its
                # end, and its outputs are the uncompressed stream's next inputs (no final forward of the copy)
                last_drift = max((i for i, (t, source) in enumerate(zip(tasks, sources))
                                  if source == "collect" and Stat.FP_TARGET in t.needs()), default=None)
                shared_stats: dict[str, GroupStats] = {}  # the statistics of the last collection pass
                for number, task in enumerate(tasks):
                    stage = task.stage
                    if task.block:
                        every = set(range(len(all_groups)))  # a block stage may change any group: nothing reused
                        _for_memos((memo, reference_memo), "begin_pass", every)
                        reference = ((original, reference_hidden, reference_memo)
                                     if Stat.FP_TARGET in stage.needs() else None)
                        with self._timed("block_stages"):
                            outcome = self._run_block_stage(task, index, block, hidden, args, kwargs, handover,
                                                            memo, reference, original)
                        _for_memos((memo, reference_memo), "end_pass")
                        changed.update(outcome.changed)
                        if outcome.record:
                            block_records.append({"block": index, "stage": task.number + 1, "method": stage.method,
                                                  **outcome.record})
                        for name, result in outcome.results.items():
                            self._keep(stage, block, index, name, result, block_results, layers, None, 0.0,
                                       outcome.records.get(name, {}))
                            handover.setdefault(name, {})[LAST_RESULT] = result
                        for name, extra in outcome.records.items():  # layers changed without a result
                            if name not in outcome.results:
                                self._record(stage, block, index, name, layers, extra)
                        release_free_heap()
                        continue
                    firsts = {g[0]: block.get_submodule(g[0]) for g in task.groups}
                    changes = {group_of[g[0]] for g in task.groups}
                    finishing = number == last_drift  # this pass is the copy's last: it runs to the block's end
                    # without a pass too: drop what these changes invalidate
                    if memo is not None:
                        memo.begin_pass(changes)
                    if reference_memo is not None:
                        reference_memo.begin_pass(changes, keep=not finishing)
                    stats: dict[str, GroupStats] = {}
                    needs = task.needs()
                    if sources[number] == "shared":
                        # an earlier stage just solved this very group after the same pass; its inputs depend only
                        # on the groups before it, so its statistics still hold
                        stats = shared_stats
                    elif sources[number] == "collect":
                        reference = (original, reference_hidden, reference_memo) if Stat.FP_TARGET in needs else None
                        # the pass runs the copy through the task's layers: a stage that reads fp_target only
                        # through each layer's own weight takes it per layer where that is cheaper
                        projected = (projectable(original, task.groups) if finishing and reference is not None
                                     and stage.fp_target_projected else None)
                        # every stage reading this pass's fp_target (the tasks that share it too) must take
                        # ||W X||^2 after its solve for the pass to sum output norms instead of X^T X
                        shares = itertools.takewhile(lambda pair: pair[1] == "shared",
                                                     zip(tasks[number + 1:], sources[number + 1:]))
                        readers = [stage] + [t.stage for t, _ in shares if Stat.FP_TARGET in t.needs()]
                        late = (self._late_norms(original, task.groups, projected or {}, norms)
                                if reference is not None and all(r.fp_target_projected for r in readers) else None)
                        watch = {n: v for n, v in norms.items() if not v.ready} if reference is not None else None
                        stats = self._collect(block, firsts, needs, hidden, args, kwargs, self.device,
                                              stop_at=task.groups[-1][0], memo=memo, reference=reference,
                                              finish_reference=finishing, projected=projected, late=late,
                                              watch=watch)
                        self._reduce(stats)
                        if watch:
                            self._seal(watch, len(hidden))
                        shared_stats = stats
                    _for_memos((memo, reference_memo), "end_pass")
                    expert_notes: dict[str, dict[str, Any]] = {}
                    if sources[number] == "collect" and any(g[0] in experts for g in task.groups):
                        expert_notes = self._expert_fallback(index, block, task, stats, experts, group_of, hidden,
                                                             args, kwargs, memo)
                    # each rank solves the layers it owns (all of them in a single process); a layer's solve reads
                    # only its own weight, so every layer of the task is solved before any result is written back
                    solved: dict[str, tuple[Any, float]] = {}
                    for group in task.groups:
                        group_stats = stats.get(group[0]) or GroupStats()
                        for name in group:
                            if owners[name] != self.group.rank:
                                continue
                            t0 = time.perf_counter()
                            job = LayerJob(name=f"{prefix}.{index}.{name}", module=block.get_submodule(name),
                                           uncompressed=original.get_submodule(name) if original is not None else None,
                                           stats=group_stats.for_layer(name), state=handover.setdefault(name, {}))
                            solved[name] = (stage.solve(job), time.perf_counter() - t0)
                            self.parts["solves"] = self.parts.get("solves", 0.0) + solved[name][1]
                    for group in task.groups:
                        group_stats = stats.get(group[0]) or GroupStats()
                        for name in group:
                            result, seconds = solved.pop(name, (None, 0.0))
                            result, seconds = self._share(owners[name], result, seconds,
                                                          handover.setdefault(name, {}))
                            notes = {**expert_notes.get(group[0], {}), **stage.record(result)}
                            if Stat.FP_TARGET in task.drop:
                                notes["fp_target"] = "not applied: a routed expert's inputs do not pair up"
                            self._keep(stage, block, index, name, result, block_results, layers, group_stats.tokens,
                                       seconds, notes)
                            if PENDING_OUTPUT_NORM in layers[-1]:
                                pending.append((stage, layers[-1], block_results[layers[-1]["name"]]))
                            # on every rank: a later stage may build on it (a correction)
                            handover.setdefault(name, {})[LAST_RESULT] = result
                    del stats, solved
                    release_free_heap()  # the pass's inputs and statistics are freed: the next pass starts lower
                del shared_stats
                self._complete_errors(pending, norms, f"{prefix}.{index}.")
                if forward_blocks:
                    _for_memos((memo, reference_memo), "begin_pass", None)
                    with torch.no_grad(), self._timed("forwards"):
                        # each batch's outputs replace its inputs at once: one stream's worth of memory, not two
                        for b, h in enumerate(hidden):
                            hidden[b] = _final_forward(block, b, h, args, kwargs, self.device, memo)
                        # the last fp_target pass ran the copy to its end (reference_hidden holds its outputs)
                        if original is not None and last_drift is None:
                            for b, h in enumerate(reference_hidden):
                                reference_hidden[b] = _final_forward(original, b, h, args, kwargs, self.device,
                                                                     reference_memo)
            del original, reference_memo
            structure = structure_diff(shape_before, signature(block))
            if structure:  # reshaped parameters are saved whole: resume and the writer take them from here
                if self.group.active:
                    raise LmshrinkError(
                        f"block {index}'s structure changed (e.g. structured pruning) in a data-parallel run of "
                        f"{self.group.world} ranks: structural changes are supported in a single process only",
                        fix="run this recipe in a single process (without torchrun)")
                structures[index] = structure
                changed.update(structure.get("parameters", {}))
            block_tensors = self._changed_tensors(block, index, changed, block_results) if root else {}
            tensors.update(block_tensors)
            if self.streamer is not None:
                self.streamer.release(block)
                for result in block_results.values():
                    result.weight = torch.empty(0)  # the checkpoint and writer need only the compact form
            else:
                if self.device.type != "cpu":
                    block.to("cpu")
                _share_weights(self.model, block_results)
            if root and not stored:
                results.update(block_results)
            if self.progress:  # one short line per block (the record keeps every layer's error)
                errors = {n.rsplit(".", 1)[-1]: r.rel_output_error for n, r in block_results.items()
                          if r.rel_output_error is not None}
                errors.update({line["name"].rsplit(".", 1)[-1]: line["rel_output_error"]
                               for line in layers[records_before:]
                               if line["name"] not in block_results and line.get("rel_output_error") is not None})
                worst = max(errors, key=errors.get) if errors else None
                summary = (f": relative output error mean {sum(errors.values()) / len(errors):.4f}, max "
                           f"{errors[worst]:.4f} ({worst})" if errors else "")
                bar.write(f"block {index + 1}/{len(blocks)} ({time.perf_counter() - block_start:.1f}s){summary}")
            if self.checkpoint is not None:
                # rank 0 writes the hidden states of every rank, in the single-process layout
                with self._timed("exchange"):
                    saved_hidden = self.group.gather_batches(hidden, batches)
                    saved_reference = (self.group.gather_batches(reference_hidden, batches)
                                       if reference_hidden is not None else None)
                if root:
                    with self._timed("checkpoint"):
                        self.checkpoint.save_block(index, block_results, saved_hidden,
                                                   {"layers": layers, "experts": self._experts_record,
                                                    "block_records": block_records,
                                                    "block_sources": self._sources},
                                                   reference_hidden=saved_reference, tensors=block_tensors,
                                                   structure=structure)
                    if stored:
                        results.add_block(self.checkpoint.block_path(index))
                del saved_hidden, saved_reference
            del block_results  # rank 0 keeps them (in memory, or in the block file); other ranks never write
            release_free_heap()  # the final forwards', the block copy's and the saved results' memory
            bar.update(1)
            if self.on_block_done is not None:
                self.on_block_done(index)
        bar.close()
        return EngineResult(results=results, layers=layers, seconds=time.perf_counter() - started,
                            peak_rss_bytes=peak_rss_bytes(), resumed_from_block=first, blocks=len(blocks),
                            cpu_seconds=cpu_seconds() - cpu_started, tensors=tensors, block_options=options,
                            block_records=block_records, structures=structures, block_sources=self._sources,
                            ranks=self.group.world, experts=self._experts_record,
                            parts={k: round(v, 3) for k, v in sorted(self.parts.items())})

    def _late_norms(self, original: nn.Module, groups: list[list[str]], projected: dict[str, list[str]],
                    norms: dict[str, OutputNorm]) -> dict[str, dict[str, OutputNorm]]:
        """The groups of a pass whose fp_target reference Hessian can be the members' output norms (plain linears
        not taken per layer): first name -> member -> its norm in ``norms`` (added there if new)."""
        late = {}
        for group in groups:
            if group[0] in projected or not plain_linears(original, group):
                continue
            late[group[0]] = {n: norms.setdefault(n, OutputNorm(linear_dims(original.get_submodule(n))[0],
                                                                device=self.device)) for n in group}
        return late

    def _seal(self, watch: dict[str, OutputNorm], batches: int) -> None:
        """After a pass: keep the output norms it summed over every calibration batch (on every rank), summed over
        the ranks; reset the others for a later pass."""
        names = sorted(watch)
        flags = torch.tensor([watch[n].covers(batches) for n in names], dtype=torch.int64).reshape(len(names), 2)
        full, seen = flags[:, 0].contiguous(), flags[:, 1].contiguous()
        self.group.all_reduce(full, op="min")
        self.group.all_reduce(seen, op="max")
        for name, whole, ran in zip(names, full.tolist(), seen.tolist()):
            if whole and ran:
                watch[name].reduce(self.group)
                watch[name].ready = True
            else:
                watch[name].reset()

    @staticmethod
    def _complete_errors(pending: list[tuple[StageBase, dict, Any]], norms: dict[str, OutputNorm],
                         prefix: str) -> None:
        """The asymmetric errors of layers solved before the copy ran through them, now that it has (their record
        lines and results)."""
        for stage, line, result in pending:
            norm = norms.get(line["name"].removeprefix(prefix))
            if norm is None or not norm.ready:  # no pass ran the copy through the layer on every batch
                line.pop(PENDING_OUTPUT_NORM)
                line["rel_output_error"] = None
                line["fp_target_output_error"] = "not measured: the copy never ran through the layer after its solve"
                continue
            stage.complete_output_error(line, norm.value)
            info = getattr(result, "info", None)
            if info and PENDING_OUTPUT_NORM in info:
                stage.complete_output_error(info, norm.value)
                result.rel_output_error = info["rel_output_error"]

    def _keep(self, stage: StageBase, block: nn.Module, index: int, name: str, result, block_results: dict,
              layers: list[dict], tokens: int | None, seconds: float, extra: dict) -> None:
        """Write a solved layer's result into the block and keep it with its record line."""
        module = block.get_submodule(name)
        set_linear_weight(module, result.weight.to(linear_weight(module).dtype))
        full = f"{self.adapter.block_path(self.model)}.{index}.{name}"
        block_results[full] = _on_cpu(result) if self.device.type != "cpu" else result
        out_f, in_f = linear_dims(module)
        layers.append({"name": full, "block": index, "method": stage.method, "objective": stage.objective(),
                       "out_features": out_f, "in_features": in_f, "rel_output_error": result.rel_output_error,
                       "seconds": round(seconds, 4), "tokens": tokens, **extra})

    def _record(self, stage: StageBase, block: nn.Module, index: int, name: str, layers: list[dict],
                extra: dict) -> None:
        """The record line of a layer a block stage changed without a result (e.g. reshaped)."""
        out_f, in_f = linear_dims(block.get_submodule(name))
        layers.append({"name": f"{self.adapter.block_path(self.model)}.{index}.{name}", "block": index,
                       "method": stage.method, "out_features": out_f, "in_features": in_f,
                       "rel_output_error": extra.get("rel_output_error"), **extra})

    def _run_block_stage(self, task: Task, index: int, block: nn.Module, hidden: list[torch.Tensor], args, kwargs,
                         handover: dict, memo: PassMemo | None, reference=None, original: nn.Module | None = None):
        def forward(batch: int, h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return _final_forward(block, batch, h, args, kwargs, self.device, memo)

        def collect_block(needs: frozenset[Stat], modules: dict[str, nn.Module]) -> dict[str, GroupStats]:
            if Stat.FP_TARGET in needs and reference is None:
                raise ValueError(f"stage {task.stage.method!r} asks for Stat.FP_TARGET in its block solve but not in "
                                 "its needs()")
            # with Stat.FP_TARGET: the block's copy from before any stage changed it runs on the uncompressed stream
            stats = collect(block, modules, needs, hidden, args, kwargs, self.device, stop_at=None, memo=memo,
                            reference=reference if Stat.FP_TARGET in needs else None)
            self._reduce(stats)
            return stats

        job = BlockJob(index=index, prefix=f"{self.adapter.block_path(self.model)}.{index}", block=block,
                       groups=task.groups, adapter=self.adapter, inputs=hidden, state=handover, device=self.device,
                       _forward=forward, _collect=collect_block, _all_reduce=self.group.all_reduce,
                       ranks=self.group.world, uncompressed=original)
        return task.stage.solve_block(job)

    def _changed_tensors(self, block: nn.Module, index: int, changed: set[str], block_results: dict
                         ) -> dict[str, torch.Tensor]:
        """The final values of the block tensors stages or transforms changed, other than the weights of layers
        with a result (those are in the result)."""
        prefix = f"{self.adapter.block_path(self.model)}.{index}."
        out = {}
        state = block.state_dict(keep_vars=True)
        for name in sorted(changed):
            if name.endswith(".weight") and prefix + name[: -len(".weight")] in block_results:
                continue
            out[prefix + name] = state[name].detach().to("cpu").clone()
        return out
