"""The compress verb: model + recipe + calibration text -> compressed checkpoint + lmshrink.json record."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lmshrink.core.atomic import atomic_directory, check_output_dir, is_within
from lmshrink.core.digest import fingerprint
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.process import environment, peak_rss_bytes
from lmshrink.core.version import __version__
from lmshrink.data.sources import load_text
from lmshrink.data.windows import calibration_windows, check_seqlen
from lmshrink.engine.checkpoint import Checkpoint, StoredResults, weights_digest
from lmshrink.engine.distributed import Group, RankLost, rank_device
from lmshrink.engine.loop import Engine
from lmshrink.engine.offload import BlockStreamer
from lmshrink.formats.loading import as_loaded, load_model
from lmshrink.formats.lowrank import storage_summary as lowrank_storage
from lmshrink.formats.save import save_quantized
from lmshrink.formats.sparse_bitmask import check_sparse_format, storage_summary
from lmshrink.formats.storage import stored_size
from lmshrink.models.adapters import get_adapter, iter_linears, linear_dims
from lmshrink.models.loader import LoadedModel, count_parameters
from lmshrink.models.structure import STRUCTURE_KEY, block_widths, config_structure, sync_config
from lmshrink.pipeline.checks import LayoutNote, check_recipe
from lmshrink.pipeline.phases import run_phases, snapshot_teacher, split_phases
from lmshrink.pipeline.recipe import Recipe, load_recipe, scale_dtype_for_model

ADAPTER_FOLDER = "adapter"  # where the adapters of a final phase stage with merge: false are written

DEFAULT_CALIBRATION = "enwiki-sample"
DEFAULT_SHARD_BYTES = 4 * 1024**3
# a shard is held in memory while it is written: streamed runs write smaller ones, so writing stays within the
# memory of compressing
STREAMED_SHARD_BYTES = 1024**3

PEAK_RSS_MEASURED = ("peak resident memory of this process from its start to the end of the compression: model "
                     "loading, calibration, every block and, with an output, writing the checkpoint (in a longer "
                     "Python session, whatever ran before too)")


def check_calibration_numbers(nsamples: int, seqlen: int, seed: int) -> None:
    """Refuse calibration numbers that cannot work, before a model is loaded."""
    if nsamples < 1:
        raise LmshrinkError(f"nsamples {nsamples} must be at least 1", fix="pass --nsamples 1 or more")
    check_seqlen(seqlen, None)
    if seed < 0:
        raise LmshrinkError(f"seed {seed} must be 0 or more", fix="pass --seed 0 or more")


def _check_output(out_dir: Path, loaded: LoadedModel) -> tuple[Path, Path]:
    """The resolved output folder and its checkpoint folder (``OUT.partial``), refused before any work when either
    overlaps the input model's folder or the output is an existing file. Whether a non-empty output may be replaced
    is decided once it is known whether ``--resume`` finds progress (``_check_replace``)."""
    protected = [Path(loaded.info.path).resolve()] if loaded.info.path is not None else []
    target = check_output_dir(out_dir, overwrite=True, protected=protected)
    if not target.name:
        raise LmshrinkError(f"output {out_dir} is the file system root", fix="choose an output folder (-o)")
    partial = target.with_name(target.name + ".partial")
    for source in protected:
        if is_within(partial, source) or is_within(source, partial):
            raise LmshrinkError(f"the run's progress folder {partial} (removed when a run starts or ends) overlaps "
                                f"the input model's folder {source}; the input is never modified",
                                fix="choose an output folder whose name plus '.partial' is not the input's folder")
    return target, partial


def _check_replace(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LmshrinkError(f"output folder {out_dir} exists and is not empty",
                            fix="choose a new -o folder, or pass --overwrite to replace it (a run replaces it by itself "
                                "only when the .partial folder beside it holds this run's progress)")


def _sparsity_summary(layers: list[dict]) -> dict[str, Any] | None:
    """Measured sparsity of the pruned layers (from the per-layer records; a layer's last stage counts): overall and
    by layer type."""
    pruned = list({layer["name"]: layer for layer in layers if layer.get("sparsity") is not None}.values())
    if not pruned:
        return None
    by_type: dict[str, list[int]] = {}
    total = [0, 0]
    for layer in pruned:
        weights = layer["out_features"] * layer["in_features"]
        zeros = round(layer["sparsity"] * weights)
        counts = by_type.setdefault(layer["name"].rsplit(".", 1)[-1], [0, 0])
        for acc in (counts, total):
            acc[0] += zeros
            acc[1] += weights
    return {"layers": len(pruned), "overall": total[0] / total[1],
            "by_type": {name: zeros / weights for name, (zeros, weights) in by_type.items()},
            "patterns": sorted({layer.get("pattern") or "unstructured" for layer in pruned})}


def _streamed_source(weights, changed: dict[str, torch.Tensor], source_name=lambda name: name):
    """Where a streamed run's writer reads the block tensors it does not hold: the ones stages changed from the
    engine's result, the rest from the input model's files (under ``source_name(name)``: a kept block's index in
    the files differs when blocks were removed)."""
    return lambda name: changed[name] if name in changed else weights.get(source_name(name))


def _block_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in get_adapter(model).blocks(model).parameters())


def _structure_summary(model: torch.nn.Module, before: int, blocks_before: int, result) -> dict[str, Any]:
    """What a run that changed the model's structure did: parameters (all, and the decoder blocks') before and
    after, the blocks kept, each block's widths, and whether the saved config states it all (plain transformers
    loads it)."""
    widths = block_widths(model)
    recorded = config_structure(model)
    blocks_after = _block_parameters(model)
    return {"parameters_before": before, "parameters_after": count_parameters(model),
            "block_parameters_before": blocks_before, "block_parameters_after": blocks_after,
            "block_parameters_removed": 1 - blocks_after / blocks_before,
            "blocks": len(widths), "blocks_kept": result.block_sources,
            "widths": widths if any(w != widths[0] for w in widths) else widths[:1],
            "uniform": all(w == widths[0] for w in widths),
            "plain_transformers": not recorded,
            "loads_with": "transformers AutoModelForCausalLM.from_pretrained" if not recorded else
                          "lmshrink.load_model only (config.json records per-layer widths under "
                          f"{STRUCTURE_KEY!r}, which transformers cannot build)"}


def compress(model: LoadedModel | str | torch.nn.Module, recipe: str | Recipe | dict, *, output: str | Path | None = None,
             calibration: str | None = None, calibration_split: str = "train", nsamples: int = 128,
             seqlen: int = 512, seed: int = 0, data_dir: str | Path | None = None, device: str = "cpu",
             resume: bool | None = None, overwrite: bool = False, progress: bool = True, tokenizer=None,
             dtype: str = "float32", on_block_done=None, offload: str = "none",
             sparse_format: str = "dense", restart: bool = False, distributed: bool | None = None,
             expert_min_tokens: int | None = None) -> dict[str, Any]:
    """Compress ``model`` in place with ``recipe``; with ``output``, save the checkpoint there.

    ``offload="disk"`` streams the decoder blocks: only the tensors outside the blocks are loaded, each block is read
    from the model's safetensors files when the engine reaches it and dropped when done, and the output is written
    from the results plus the source files, so memory grows with one block, not with the model. It needs a model
    source string or a model loaded with ``load_model(..., lazy_blocks=True)``; the model's blocks end on the meta
    device (not compressed in place) and the results' ``weight`` is empty (``dequantize`` the codes to get it).
    Results and output files are identical to ``offload="none"``.

    With an output, a streamed run keeps the finished blocks' results in its work folder, not in memory; the
    record's ``results`` then reads each one from disk when asked for (from a hidden folder beside the output,
    removed when the mapping is).

    ``sparse_format``: how pruned layers that are not quantized are saved: ``"dense"`` (zeros stored, plain
    transformers loads it) or ``"bitmask"`` (bitmask + kept values, read back by lmshrink; see
    ``formats.sparse_bitmask``). The record's ``summary.sparse_storage`` gives their stored bytes against dense.

    Progress of a killed run (``OUT.partial``, with ``output``): ``resume=None`` (the default) continues this same
    run's progress when there is some, saying so; ``resume=True`` does too and says when there is none;
    ``resume=False`` refuses to start while this run's progress exists; ``restart=True`` discards any progress and
    starts over. Progress of a different run (other model, recipe, calibration or options) is refused unless
    ``restart``.

    ``expert_min_tokens`` (mixture-of-experts models): a routed expert that receives fewer calibration tokens than
    this is calibrated on every token instead (a pass that routes all tokens through it, for its statistics only),
    and the record says so; None (default): a tenth of the mean its block's experts receive. An expert that
    receives none always is. The record's ``experts`` lists each block's tokens per expert and fallbacks.

    ``distributed``: data-parallel calibration over the ranks of the initialised ``torch.distributed`` process
    group (``engine.distributed``): call ``compress`` with the same arguments on every rank; each rank runs its
    share of the calibration windows, the statistics are summed over the ranks, and rank 0 writes the checkpoint
    and the output. The result is the single-process one. None (default): when a group of several ranks is
    initialised; False: never. ``device="cuda"`` means each rank's local GPU.

    Returns the record written to ``lmshrink.json``: recipe, calibration protocol, per-layer errors and times,
    peak memory, bytes on disk, library versions, and ``results`` (name -> QuantResult, not serialized; on rank 0
    only in a data-parallel run, empty on the other ranks).
    """
    group = Group() if distributed is False else Group.current()
    try:
        return _compress(group, model, recipe, output=output, calibration=calibration,
                         calibration_split=calibration_split, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         data_dir=data_dir, device=device, resume=resume, overwrite=overwrite,
                         progress=progress and group.is_root, tokenizer=tokenizer, dtype=dtype,
                         on_block_done=on_block_done, offload=offload, sparse_format=sparse_format,
                         restart=restart, expert_min_tokens=expert_min_tokens)
    except RankLost as lost:
        partial = Path(output).expanduser().resolve() if output is not None else None
        saved = (f"; the blocks finished before it are saved in {partial.with_name(partial.name + '.partial')}"
                 if partial is not None else "")
        raise LmshrinkError(
            f"the data-parallel run stopped: {lost}: another of the {lost.world} ranks ended (it crashed, was "
            f"killed, or stopped with an error of its own){saved}",
            fix=("read the failed rank's own error (torchrun names the rank), then start the same command with "
                 "--resume to go on from the saved blocks") if partial is not None else
                "read the failed rank's own error (torchrun names the rank), then run again") from lost


def _compress(group: Group, model, recipe, *, output, calibration, calibration_split, nsamples, seqlen, seed,
              data_dir, device, resume, overwrite, progress, tokenizer, dtype, on_block_done, offload,
              sparse_format, restart, expert_min_tokens) -> dict[str, Any]:
    if expert_min_tokens is not None and expert_min_tokens < 1:
        raise LmshrinkError(f"expert_min_tokens {expert_min_tokens} must be at least 1 (an expert that receives no "
                            "token is always calibrated on every token)", fix="pass 1 or more, or leave it unset")
    recipe = load_recipe(recipe)
    check_sparse_format(sparse_format)  # before the compression runs
    check_calibration_numbers(nsamples, seqlen, seed)
    if resume and restart:
        raise LmshrinkError("resume and restart both asked for", fix="pass --resume (continue) or --restart "
                                                                     "(discard the progress), not both")
    if offload not in ("none", "disk"):
        raise LmshrinkError(f"offload {offload!r} is not known", fix="use offload='none' or 'disk'")
    streamed = offload == "disk"
    # the text before the model: a missing or empty text set fails before any loading
    calib_name = calibration or DEFAULT_CALIBRATION
    source = load_text(calib_name, calibration_split, data_dir)  # enwiki-sample maps "train" to its calib split
    if streamed and isinstance(model, (str, Path)):
        model = load_model(str(model), dtype=dtype, device="cpu", progress=progress, lazy_blocks=True)
    model = as_loaded(model, tokenizer, dtype=dtype, device="cpu", progress=progress)
    if streamed and model.weights is None:
        raise LmshrinkError("offload='disk' needs a model whose blocks are read from disk, but this model is "
                            "already fully in memory",
                            fix="pass the model source (path or name), or load_model(..., lazy_blocks=True)")
    if not streamed and model.weights is not None:
        raise LmshrinkError("this model was loaded with lazy blocks (their weights are on disk, not in memory)",
                            fix="compress it with offload='disk' (CLI: --offload disk)")
    adapter = get_adapter(model.model)
    adapter.linearize(model.model)  # mixture-of-experts: one linear per expert and projection (models.moe)
    linears = list(iter_linears(model.model))
    layers = [(name, linear_dims(module)[1]) for name, module in linears]
    # what can be saved: float16 scales are not exact in a bfloat16 checkpoint (in memory they stay as they were)
    recipe, dtype_notes = scale_dtype_for_model(recipe, model.model.dtype) if output is not None else (recipe, [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for note in dtype_notes:
            warnings.warn(note, stacklevel=1)
        check_recipe(recipe, layers, dtype=None if output is None else model.model.dtype,  # what saving refuses
                     unpacked=[n for n, m in linears if not isinstance(m, torch.nn.Linear)])
    # facts about the stored layout go to the record only (the GGUF export states them); the rest is printed
    layout_notes = [str(w.message) for w in caught if issubclass(w.category, LayoutNote)]
    notes = [str(w.message) for w in caught if not issubclass(w.category, LayoutNote)]
    for note in notes:
        print(f"lmshrink: warning: {note}", file=sys.stderr)
    out_dir = partial_dir = None
    if output is not None:
        out_dir, partial_dir = _check_output(Path(output), model)
    windows = calibration_windows(model.tokenizer, source, nsamples, seqlen, seed, model.info.max_context)
    checkpoint, saved_state = None, False
    # the ranks of a data-parallel run must run the same thing: their fingerprints must agree
    key = fingerprint(recipe.to_dict(), windows.protocol, model.info.to_dict(), windows.input_ids, device,
                      weights_digest(model.model, model.weights), {"lmshrink": __version__},
                      *([{"expert_min_tokens": expert_min_tokens}] if expert_min_tokens is not None else []))
    group.check_same(key, "model, recipe, calibration or options")
    if out_dir is not None:
        checkpoint = Checkpoint(partial_dir, key)
        blocks = len(adapter.blocks(model.model))

        def check_progress() -> bool:
            saved = None if restart else checkpoint.load()  # refuses progress of another run
            if saved is not None:
                done = int(saved["finished_blocks"])
                if resume is False:
                    raise LmshrinkError(f"{checkpoint.folder} holds this run's progress ({done} of {blocks} blocks "
                                        "done)", fix="continue it (CLI: --resume, or leave both flags out), or "
                                                     "discard it (CLI: --restart)")
                where = (f"resuming at block {done + 1} of {blocks}" if done < blocks else
                         f"all {blocks} blocks are done; resuming after them")
                print(f"lmshrink: {where} ({checkpoint.folder} holds this run's progress; --restart discards it)",
                      file=sys.stderr)
            elif resume:
                print(f"lmshrink: nothing to resume in {checkpoint.folder}; starting from block 1",
                      file=sys.stderr)
            _check_replace(out_dir, overwrite or saved is not None)
            return saved is not None

        saved_state = group.root(check_progress)  # rank 0 reads and writes the work folder
    resume = saved_state
    streamer = BlockStreamer(model.model, model.weights, adapter.block_path(model.model)) if streamed else None
    # phase stages (e.g. recover) split the recipe: the engine runs the stages before the first one, then the phase
    # stages and the engine stages after them run on the whole model (pipeline.phases)
    engine_recipe, phases = split_phases(recipe)
    if phases and streamed:
        raise LmshrinkError(f"{phases[0][0].method} stages work on the whole model, which offload='disk' never holds "
                            "in memory", fix=f"compress without --offload disk, or drop the {phases[0][0].method} stages")
    if phases and group.active:
        raise LmshrinkError(f"{phases[0][0].method} stages train on the whole model in one process; data-parallel "
                            "calibration does not cover them yet",
                            fix=f"run this recipe in a single process (without torchrun), or drop the "
                                f"{phases[0][0].method} stages")
    teacher = snapshot_teacher(model.model) if any(s.needs_teacher for s, _ in phases) else None
    blocks_before = _block_parameters(model.model)
    engine = Engine(model.model, adapter, engine_recipe, windows.input_ids, device=rank_device(device, group),
                    checkpoint=checkpoint, resume=resume, progress=progress, on_block_done=on_block_done,
                    streamer=streamer, group=group, expert_min_tokens=expert_min_tokens)
    result = engine.run()
    phase_records, adapter_files = [], {}
    phases_started = time.perf_counter()
    if phases:
        phase_records, adapter_files = run_phases(
            model.model, model.tokenizer, adapter, phases, result, windows.input_ids, teacher=teacher,
            default_data=calib_name, data_dir=data_dir, device=device, progress=progress,
            max_context=model.info.max_context, checkpoint=checkpoint, resume=resume, on_block_done=on_block_done)
        del teacher
    structural = bool(result.structures) or result.block_sources is not None
    if structural:  # the config follows the new shapes (the writer records what it cannot state)
        sync_config(model.model)
    errors = [layer["rel_output_error"] for layer in result.layers if layer["rel_output_error"] is not None]
    scheme = [{"stage": number + 1, "method": stage.method, **stage.scheme(), "targets": stage.targets,
               "ignore": stage.ignore} for number, stage in enumerate(recipe.stages) if stage.scheme()]
    record: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "scheme": scheme,
        "calibration": windows.protocol,
        "model": model.info.to_dict(),
        "architecture": adapter.describe(model.model),
        "layers": result.layers,
        "summary": {"layers": len(result.layers), "mean_rel_output_error": sum(errors) / len(errors) if errors else None,
                    "max_rel_output_error": max(errors) if errors else None,
                    "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                    "peak_rss_bytes": result.peak_rss_bytes, "peak_rss_measured": PEAK_RSS_MEASURED,
                    "engine_peak_rss_bytes": result.peak_rss_bytes,
                    "resumed_from_block": result.resumed_from_block, "device": device, "offload": offload,
                    "recover_seconds": time.perf_counter() - phases_started if phases else None,
                    **_ranks_summary(group, result)},
        "warnings": notes,
        "notes": layout_notes,
        "environment": environment(),
    }
    if phase_records:
        record["recover"] = phase_records
        record["summary"]["rel_output_error_measured"] = (
            "by the engine, before recovery changed the weights; each merged layer's recover_rel_weight_change is "
            "||W_merged - W_before|| / ||W_before|| of its recover stage's merge")
    if result.block_records:
        record["block_stages"] = result.block_records
    if structural:
        record["structure"] = _structure_summary(model.model, model.info.parameters, blocks_before, result)
    sparsity = _sparsity_summary(result.layers)
    if sparsity is not None:
        record["sparsity"] = sparsity
    block_linears = {name: linear_dims(module) for name, module in linears}
    lowrank = lowrank_storage(model.model, result.results, block_linears)
    if lowrank is not None:
        record["summary"]["lowrank_storage"] = lowrank
    if result.experts:
        record["experts"] = {"min_tokens": expert_min_tokens if expert_min_tokens is not None else
                             "a tenth of the mean tokens per expert of the block (at least 1)",
                             "fallback": "all-tokens: every calibration token routed through the expert, for its "
                                         "statistics only", "blocks": result.experts}
    if result.block_options:
        record["block_options"] = {f"stage {n + 1}": {str(b): options for (m, b), options in sorted(
            result.block_options.items()) if m == n} for n in sorted({m for m, _ in result.block_options})}
    if out_dir is not None:
        def write() -> dict[str, Any] | None:
            quantized = set(result.results)
            ignore = sorted({name for name, _ in iter_linears(model.model) if name not in quantized} | {"lm_head"})
            storage = storage_summary(model.model, result.results, sparse_format)
            if storage is not None:
                record["summary"]["sparse_storage"] = storage
            shapes = {layer["name"]: (layer["out_features"], layer["in_features"]) for layer in result.layers}

            def final_record(folder: Path) -> str:
                # written after the weights: their bytes on disk, and the peak memory with the writing included
                record["summary"]["storage"] = stored_size(folder, shapes)
                record["summary"]["peak_rss_bytes"] = peak_rss_bytes()
                return json.dumps(record, indent=1, default=str)

            save_quantized(model.model, model.tokenizer, result.results, out_dir, ignore=ignore,
                           input_dir=model.info.path, extra_files={"lmshrink.json": final_record},
                           overwrite=overwrite or saved_state,
                           source_tensors=(_streamed_source(model.weights, result.tensors, streamer.source_name)
                                           if streamed else None),
                           sparse_format=sparse_format,
                           max_shard_size=STREAMED_SHARD_BYTES if streamed else DEFAULT_SHARD_BYTES,
                           rename=adapter.checkpoint_name if adapter.spec.checkpoint_renames else None)
            if adapter_files:  # a final recover stage with merge: false: the adapters in PEFT format beside the model
                with atomic_directory(out_dir / ADAPTER_FOLDER, overwrite=True) as staging:
                    for filename, content in adapter_files.items():
                        (staging / filename).write_bytes(content)
            if isinstance(result.results, StoredResults):  # results on disk: out of the work folder, for the caller
                result.results.relocate(out_dir.parent)
            checkpoint.remove()
            return storage

        storage = group.root(write)  # only rank 0 writes; the others wait for it
        if storage is not None:
            record["summary"]["sparse_storage"] = storage
        record["output"] = str(out_dir)
    else:
        record["summary"]["peak_rss_bytes"] = peak_rss_bytes()
    record["results"] = result.results
    return record


def _ranks_summary(group: Group, result) -> dict[str, Any]:
    """The data-parallel group in the record: ranks, and each rank's peak RSS and CPU time (a single process: one)."""
    names = ("forwards", "statistics", "solves", "block_stages", "exchange", "checkpoint")
    peaks = torch.zeros(group.world, dtype=torch.int64)
    seconds = torch.zeros(group.world, 1 + len(names), dtype=torch.float64)
    peaks[group.rank] = result.peak_rss_bytes
    seconds[group.rank] = torch.tensor([result.cpu_seconds, *(result.parts.get(n, 0.0) for n in names)],
                                       dtype=torch.float64)
    group.all_reduce(peaks)
    group.all_reduce(seconds)
    return {"ranks": group.world, "backend": group.backend, "peak_rss_bytes_per_rank": peaks.tolist(),
            "cpu_seconds_per_rank": seconds[:, 0].tolist(),
            "seconds_by_part_per_rank": [{n: round(float(v), 3) for n, v in zip(names, row[1:])} for row in seconds]}
