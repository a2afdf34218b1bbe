"""Phases of a recipe: the engine runs the stages before the first phase stage (e.g. ``recover``), then each phase
stage works on the whole model, then the engine runs the stages after it on the result, and so on. Every engine
phase has its own checkpoint (resume), streaming refusal and progress; phase stages save their own state in the
run's work folder."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmshrink.core.digest import fingerprint
from lmshrink.core.stage import PhaseStage
from lmshrink.engine.checkpoint import Checkpoint, weights_digest
from lmshrink.engine.loop import Engine, EngineResult
from lmshrink.methods.recover.requant import RequantizeStage
from lmshrink.models.adapters import get_adapter
from lmshrink.pipeline.recipe import Recipe


def split_phases(recipe: Recipe) -> tuple[Recipe, list[tuple[PhaseStage, Recipe | None]]]:
    """The engine recipe of the first phase, and each phase stage with the engine stages that follow it."""
    first: list = []
    later: list[tuple[PhaseStage, list]] = []
    for stage in recipe.stages:
        if isinstance(stage, PhaseStage):
            later.append((stage, []))
        elif later:
            later[-1][1].append(stage)
        else:
            first.append(stage)
    return (Recipe(name=recipe.name, stages=first, order=recipe.order),
            [(stage, Recipe(name=f"{recipe.name}-after-{stage.method}-{i + 1}", stages=rest, order=recipe.order)
              if rest else None)
             for i, (stage, rest) in enumerate(later)])


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the uncompressed model (the teacher), taken before compression.

    Only the decoder blocks are copied: the tensors outside them (embeddings, final norm, output head) are shared
    with ``model``, since compression and recovery change only block linears (the embeddings of SmolLM2-135M are a
    fifth of its weights).
    """
    prefix = get_adapter(model).block_path(model) + "."
    shared = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(prefix)}
    teacher = copy.deepcopy(model, memo=shared).eval()
    return teacher.requires_grad_(False)


def requantize_on_grid(model: nn.Module, targets: dict[str, tuple], calibration: torch.Tensor, *, device="cpu",
                       progress: bool = False) -> dict[str, tuple]:
    """GPTQ codes for each target layer (full name -> (merged float weight, stored QuantResult, pruned mask or None))
    on its stored grid, with the Hessians the engine collects on ``calibration`` block by block, true-sequentially;
    the model's layers end holding the re-quantized weights. Returns name -> (codes, record)."""
    stage = RequantizeStage.for_targets(targets)
    Engine(model, get_adapter(model), [stage], calibration, device=device, progress=progress).run()
    return stage.solved


@dataclass
class Session:
    """The ``core.stage.PhaseSession`` of one run."""

    model: nn.Module
    tokenizer: Any
    teacher: nn.Module | None
    stages: list[PhaseStage]
    results: dict[str, Any]
    layers: list[dict]
    calibration: torch.Tensor
    default_data: str
    data_dir: Any
    device: Any
    progress: bool
    max_context: int | None
    work_folder: Path | None
    key: str
    resume: bool
    exit_stack: contextlib.ExitStack
    state: dict[str, Any] = field(default_factory=dict)
    adapter_files: dict[str, bytes] = field(default_factory=dict)

    def requantize_on_grid(self, model: nn.Module, targets: dict[str, tuple]) -> dict[str, tuple]:
        return requantize_on_grid(model, targets, self.calibration, device=self.device)

    def temporary_folder(self, prefix: str) -> Path:
        return Path(self.exit_stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def run_phases(model: nn.Module, tokenizer, adapter, phases: list[tuple[PhaseStage, Recipe | None]],
               result: EngineResult, calibration: torch.Tensor, *, teacher: nn.Module | None, default_data: str,
               data_dir=None, device="cpu", progress: bool = True, max_context: int | None = None,
               checkpoint: Checkpoint | None = None, resume: bool = False,
               on_block_done: Callable[[int], None] | None = None) -> tuple[list[dict], dict[str, bytes]]:
    """Run the phase stages (and the engine stages between and after them) after the first engine phase.

    Updates ``result`` in place (``results``, ``layers``, times and peak memory with the later engine phases).
    Returns the phase stages' records and the files they leave to write beside the output (e.g. PEFT adapters).
    With ``checkpoint`` (the run's work folder), phase stages save their state in it, each later engine phase gets
    a checkpoint of its own (``phase-N``), and ``resume`` continues all of them.
    """
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        session = Session(model=model, tokenizer=tokenizer, teacher=teacher, stages=[s for s, _ in phases],
                          results=result.results, layers=result.layers, calibration=calibration,
                          default_data=default_data, data_dir=data_dir, device=device, progress=progress,
                          max_context=max_context, work_folder=checkpoint.folder if checkpoint is not None else None,
                          key=checkpoint.key if checkpoint is not None else "", resume=resume, exit_stack=stack)
        # the student's blocks by their index in the teacher (blocks a stage removed have none)
        session.state["block_sources"] = result.block_sources
        for number, (stage, _) in enumerate(phases, start=1):
            stage.before_phases(session, number)
        for number, (stage, rest) in enumerate(phases, start=1):
            records.append(stage.run_phase(session, number))
            if rest is None:
                continue
            phase_checkpoint = None
            if checkpoint is not None:  # the model as this phase starts is part of what the progress belongs to
                phase_checkpoint = Checkpoint(checkpoint.folder / f"phase-{number + 1}",
                                              fingerprint(checkpoint.key, "phase", number + 1,
                                                          weights_digest(model)))
            later = Engine(model, adapter, rest, calibration, device=device, progress=progress,
                           checkpoint=phase_checkpoint, resume=resume, on_block_done=on_block_done).run()
            result.results.update(later.results)
            result.layers.extend(later.layers)
            result.tensors.update(later.tensors)
            if later.block_sources is not None:  # blocks removed again: indices into the model this phase began with
                result.block_sources = (later.block_sources if result.block_sources is None
                                        else [result.block_sources[i] for i in later.block_sources])
                session.state["block_sources"] = result.block_sources
            result.seconds += later.seconds
            result.cpu_seconds += later.cpu_seconds
            result.peak_rss_bytes = max(result.peak_rss_bytes, later.peak_rss_bytes)
        return records, session.adapter_files
