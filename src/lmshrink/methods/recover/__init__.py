"""Recovery after compression: distil the uncompressed model into LoRA adapters on the compressed one (``recover``
recipe stages), merge them keeping pruned zeros and quantization grids, and run iterative prune-recover schedules.

A recipe with recover stages runs in phases: the compression stages before the first recover stage go through the
block-by-block engine, then the recover stage trains on the whole model, then the next compression stages (a new
engine pass over the recovered model), and so on.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path

from torch import nn

from ...recipe import RECOVER_METHODS, Recipe, RecoverStage
from .distill import (_Forward, checkpointed_blocks, distill_loss, head_distill_loss, held_out_metrics, hidden_mse,
                      prepare_teacher_cache, recover, split_documents, stage_windows, step_loss, teacher_cache_key,
                      topk_distill_loss, topk_head_distill_loss, topk_kl)
from .lora import adapter_files, attach, load_adapter, lora_delta, merge, pruned_mask
from .memory import memory_report, optimizer_state_bytes
from .teacher_cache import block_bytes, release_blocks

ADAPTER_FOLDER = "adapter"

__all__ = ["ADAPTER_FOLDER", "adapter_files", "attach", "checkpointed_blocks", "distill_loss", "head_distill_loss",
           "held_out_metrics", "hidden_mse", "load_adapter", "lora_delta", "step_loss", "memory_report", "merge",
           "optimizer_state_bytes", "prepare_teacher_cache", "pruned_mask", "recover", "run_recovery",
           "snapshot_teacher", "split_documents", "split_phases", "stage_windows", "teacher_cache_key",
           "topk_distill_loss", "topk_head_distill_loss", "topk_kl"]


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
    return (Recipe(name=recipe.name, stages=first, order=recipe.order),
            [(stage, Recipe(name=f"{recipe.name}-after-recover-{i + 1}", stages=rest, order=recipe.order)
              if rest else None)
             for i, (stage, rest) in enumerate(later)])


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the uncompressed model (the teacher), taken before compression.

    Only the decoder blocks are copied: the tensors outside them (embeddings, final norm, output head) are shared
    with ``model``, since compression and recovery change only block linears (the embeddings of SmolLM2-135M are a
    fifth of its weights).
    """
    from ...models import get_adapter

    prefix = get_adapter(model).block_path(model) + "."
    shared = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(prefix)}
    teacher = copy.deepcopy(model, memo=shared).eval()
    return teacher.requires_grad_(False)


def _note_weight_change(layers: list[dict], change: dict[str, float], phase: int) -> None:
    """Add the merge's relative weight change to the last engine record of each merged layer (the engine's
    ``rel_output_error`` was measured before recovery changed the weights)."""
    seen: set[str] = set()
    for layer in reversed(layers):
        name = layer["name"]
        if name in change and name not in seen:
            seen.add(name)
            layer.setdefault("recover_rel_weight_change", {})[f"recover {phase}"] = change[name]


def run_recovery(model: nn.Module, tokenizer, teacher: nn.Module, adapter, phases, engine_result, calibration, *,
                 default_data: str, data_dir=None, device="cpu", progress: bool = True,
                 max_context: int | None = None, checkpoint=None, resume: bool = False
                 ) -> tuple[list[dict], dict[str, bytes]]:
    """Run the recover stages (and the compression stages between them) after the first engine pass.

    Updates ``engine_result`` in place (``results`` to the merged weights, ``layers``/``seconds`` with later engine
    passes; each merged layer's record gets ``recover_rel_weight_change``). Returns the recover records and the PEFT
    adapter files of a final ``merge: false`` stage (``calibration``, the engine's windows, also gives the Hessians of
    ``requantize: gptq`` merges). With ``checkpoint`` (the engine's work folder), each recover
    stage saves its progress in ``<work folder>/recover-<n>``, and ``resume`` continues from it.

    Stages with ``teacher_cache: topk`` get their teacher caches first (``<work folder>/recover-<n>-teacher-topk``,
    reused on ``resume`` when complete and written for the same windows and options; without a work folder, a
    temporary folder removed at the end). Once every remaining stage has its cache, the teacher's decoder blocks are
    freed (``teacher`` cannot run afterwards).
    """
    from ...engine.loop import Engine

    records: list[dict] = []
    files: dict[str, bytes] = {}
    with contextlib.ExitStack() as stack:
        caches = {}
        state_keys = {number: f"{checkpoint.key}-recover-{number}" if checkpoint is not None else ""
                      for number in range(1, len(phases) + 1)}
        for number, (stage, _) in enumerate(phases, start=1):
            if stage.teacher_cache != "topk":
                continue
            if checkpoint is not None:
                folder = checkpoint.folder / f"recover-{number}-teacher-topk"
            else:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmshrink-teacher-"))) / "topk"
            windows = stage_windows(stage, tokenizer, default_data, data_dir, max_context)
            caches[number] = prepare_teacher_cache(teacher, stage, windows, folder,
                                                   teacher_cache_key(stage, windows, state_keys[number]),
                                                   reuse=resume, device=device, progress=progress)
        blocks = _Forward(teacher).blocks
        teacher_bytes, freed = block_bytes(blocks), False
        for number, (stage, rest) in enumerate(phases, start=1):
            if caches and not freed and all(s.teacher_cache == "topk" for s, _ in phases[number - 1:]):
                release_blocks(blocks, keep=model)
                freed = True
            state_dir = checkpoint.folder / f"recover-{number}" if checkpoint is not None else None
            record = recover(model, teacher, tokenizer, stage, engine_result.results, default_data=default_data,
                             data_dir=data_dir, device=device, progress=progress, max_context=max_context,
                             adapter_out=files, state_dir=state_dir, state_key=state_keys[number], resume=resume,
                             teacher_cache=caches.get(number), calibration=calibration)
            if number in caches:
                record["teacher_cache"].update(teacher_block_bytes=teacher_bytes, teacher_blocks_freed=freed)
            records.append(record)
            if "merge" in record:
                _note_weight_change(engine_result.layers, record["merge"]["rel_weight_change"], number)
            if rest is not None:
                later = Engine(model, adapter, rest, calibration, device=device, progress=progress).run()
                engine_result.results.update(later.results)
                engine_result.layers.extend(later.layers)
                engine_result.seconds += later.seconds
                engine_result.cpu_seconds += later.cpu_seconds
                engine_result.peak_rss_bytes = max(engine_result.peak_rss_bytes, later.peak_rss_bytes)
    return records, files
