"""Recovery after compression: distil the uncompressed model into LoRA adapters on the compressed one (``recover``
recipe stages), merge them keeping pruned zeros and quantization grids, and run iterative prune-recover schedules.

A recipe with recover stages runs in phases: the compression stages before the first recover stage go through the
block-by-block engine, then the recover stage trains on the whole model, then the next compression stages (a new
engine pass over the recovered model), and so on.
"""

from __future__ import annotations

import copy

from torch import nn

from ...recipe import RECOVER_METHODS, Recipe, RecoverStage
from .distill import distill_loss, held_out_metrics, recover, split_documents
from .lora import adapter_files, attach, load_adapter, lora_delta, merge, pruned_mask
from .memory import memory_report, optimizer_state_bytes

ADAPTER_FOLDER = "adapter"

__all__ = ["ADAPTER_FOLDER", "adapter_files", "attach", "distill_loss", "held_out_metrics", "load_adapter",
           "lora_delta", "memory_report", "merge", "optimizer_state_bytes", "pruned_mask", "recover",
           "run_recovery", "snapshot_teacher", "split_documents", "split_phases"]


def split_phases(recipe: Recipe) -> tuple[Recipe, list[tuple[RecoverStage, Recipe | None]]]:
    """The engine recipe of the first phase, and each recover stage with the compression stages that follow it."""
    first: list = []
    later: list[tuple[RecoverStage, list]] = []
    for stage in recipe.stages:
        if stage.method in RECOVER_METHODS:
            later.append((stage, []))
        elif later:
            later[-1][1].append(stage)
        else:
            first.append(stage)
    return (Recipe(name=recipe.name, stages=first),
            [(stage, Recipe(name=f"{recipe.name}-after-recover-{i + 1}", stages=rest) if rest else None)
             for i, (stage, rest) in enumerate(later)])


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the uncompressed model (the teacher), taken before compression."""
    teacher = copy.deepcopy(model).eval()
    return teacher.requires_grad_(False)


def run_recovery(model: nn.Module, tokenizer, teacher: nn.Module, adapter, phases, engine_result, calibration, *,
                 default_data: str, data_dir=None, device="cpu", progress: bool = True,
                 max_context: int | None = None) -> tuple[list[dict], dict[str, bytes]]:
    """Run the recover stages (and the compression stages between them) after the first engine pass.

    Updates ``engine_result`` in place (``results`` to the merged weights, ``layers``/``seconds`` with later engine
    passes). Returns the recover records and the PEFT adapter files of a final ``merge: false`` stage.
    """
    from ...engine.loop import Engine

    records: list[dict] = []
    files: dict[str, bytes] = {}
    for stage, rest in phases:
        records.append(recover(model, teacher, tokenizer, stage, engine_result.results, default_data=default_data,
                               data_dir=data_dir, device=device, progress=progress, max_context=max_context,
                               adapter_out=files))
        if rest is not None:
            later = Engine(model, adapter, rest, calibration, device=device, progress=progress).run()
            engine_result.results.update(later.results)
            engine_result.layers.extend(later.layers)
            engine_result.seconds += later.seconds
            engine_result.cpu_seconds += later.cpu_seconds
            engine_result.peak_rss_bytes = max(engine_result.peak_rss_bytes, later.peak_rss_bytes)
    return records, files
