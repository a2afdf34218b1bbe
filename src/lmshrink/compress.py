"""The compress verb: model + recipe + calibration text -> compressed checkpoint + lmshrink.json record."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import calibration_windows, load_text
from .engine.checkpoint import Checkpoint, fingerprint, weights_digest
from .engine.loop import Engine
from .engine.offload import BlockStreamer
from .errors import LmshrinkError
from .eval.record import environment
from .models import LoadedModel, as_loaded, get_adapter, iter_linears, linear_dims
from .recipe import Recipe, check_recipe, load_recipe, scale_dtype_for_model

DEFAULT_CALIBRATION = "enwiki-sample"


def _check_output(out_dir: Path, loaded: LoadedModel) -> tuple[Path, Path]:
    """The resolved output folder and its checkpoint folder (``OUT.partial``), refused before any work when either
    overlaps the input model's folder or the output is an existing file. Whether a non-empty output may be replaced
    is decided once it is known whether ``--resume`` finds progress (``_check_replace``)."""
    from .formats.atomic import _is_within, check_output_dir

    protected = [Path(loaded.info.path).resolve()] if loaded.info.path is not None else []
    target = check_output_dir(out_dir, overwrite=True, protected=protected)
    if not target.name:
        raise LmshrinkError(f"output {out_dir} is the file system root", fix="choose an output folder (-o)")
    partial = target.with_name(target.name + ".partial")
    for source in protected:
        if _is_within(partial, source) or _is_within(source, partial):
            raise LmshrinkError(f"the run's progress folder {partial} (removed when a run starts or ends) overlaps "
                                f"the input model's folder {source}; the input is never modified",
                                fix="choose an output folder whose name plus '.partial' is not the input's folder")
    return target, partial


def _check_replace(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LmshrinkError(f"output folder {out_dir} exists and is not empty",
                            fix="choose a new -o folder, or pass --overwrite to replace it (--resume replaces it only "
                                "when it finds this run's progress in the .partial folder beside it)")


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


def compress(model: LoadedModel | str | torch.nn.Module, recipe: str | Recipe | dict, *, output: str | Path | None = None,
             calibration: str | None = None, calibration_split: str = "train", nsamples: int = 128,
             seqlen: int = 512, seed: int = 0, data_dir: str | Path | None = None, device: str = "cpu",
             resume: bool = False, overwrite: bool = False, progress: bool = True, tokenizer=None,
             dtype: str = "float32", on_block_done=None, offload: str = "none",
             sparse_format: str = "dense") -> dict[str, Any]:
    """Compress ``model`` in place with ``recipe``; with ``output``, save the checkpoint there.

    ``offload="disk"`` streams the decoder blocks: only the tensors outside the blocks are loaded, each block is read
    from the model's safetensors files when the engine reaches it and dropped when done, and the output is written
    from the results plus the source files, so memory grows with one block, not with the model. It needs a model
    source string or a model loaded with ``load_model(..., lazy_blocks=True)``; the model's blocks end on the meta
    device (not compressed in place) and the results' ``weight`` is empty (``dequantize`` the codes to get it).
    Results and output files are identical to ``offload="none"``.

    ``sparse_format``: how pruned layers that are not quantized are saved: ``"dense"`` (zeros stored, plain
    transformers loads it) or ``"bitmask"`` (bitmask + kept values, read back by lmshrink; see
    ``formats.sparse_bitmask``). The record's ``summary.sparse_storage`` gives their stored bytes against dense.

    Returns the record written to ``lmshrink.json``: recipe, calibration protocol, per-layer errors and times,
    peak memory, library versions, and ``results`` (name -> QuantResult, not serialized).
    """
    recipe = load_recipe(recipe)
    from .formats.sparse_bitmask import check_sparse_format, storage_summary

    check_sparse_format(sparse_format)  # before the compression runs
    if offload not in ("none", "disk"):
        raise LmshrinkError(f"offload {offload!r} is not known", fix="use offload='none' or 'disk'")
    streamed = offload == "disk"
    if streamed and isinstance(model, (str, Path)):
        from .models import load_model

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
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"lmshrink: warning: {note}", file=sys.stderr)
    out_dir = partial_dir = None
    if output is not None:
        out_dir, partial_dir = _check_output(Path(output), model)
    calib_name = calibration or DEFAULT_CALIBRATION
    source = load_text(calib_name, calibration_split, data_dir)  # enwiki-sample maps "train" to its calib split
    windows = calibration_windows(model.tokenizer, source, nsamples, seqlen, seed, model.info.max_context)
    checkpoint, saved_state = None, None
    if out_dir is not None:
        key = fingerprint(recipe.to_dict(), windows.protocol, model.info.to_dict(), windows.input_ids, device,
                          weights_digest(model.model, model.weights), {"lmshrink": __version__})
        checkpoint = Checkpoint(partial_dir, key)
        saved_state = checkpoint.load() if resume else None  # refuses progress of another run
        if resume and saved_state is None:
            print(f"lmshrink: nothing to resume in {checkpoint.folder}; starting from block 1",
                  file=sys.stderr)
        _check_replace(out_dir, overwrite or saved_state is not None)
    streamer = BlockStreamer(model.model, model.weights, adapter.block_path(model.model)) if streamed else None
    # -- recovery (methods/recover): the engine runs the stages before the first recover stage; the recover
    # stages (and any compression stages after them) run on the whole model after it, against a copy of the
    # uncompressed model (the teacher).
    from .methods.recover import run_recovery, snapshot_teacher, split_phases

    engine_recipe, recover_phases = split_phases(recipe)
    if recover_phases and streamed:
        raise LmshrinkError("recover stages train on the whole model, which offload='disk' never holds in memory",
                            fix="compress without --offload disk, or drop the recover stages")
    teacher = snapshot_teacher(model.model) if recover_phases else None
    engine = Engine(model.model, adapter, engine_recipe, windows.input_ids, device=device, checkpoint=checkpoint,
                    resume=resume, progress=progress, on_block_done=on_block_done, streamer=streamer)
    result = engine.run()
    recovery, adapter_files = [], {}
    recover_started = time.perf_counter()
    if recover_phases:
        recovery, adapter_files = run_recovery(
            model.model, model.tokenizer, teacher, adapter, recover_phases, result, windows.input_ids,
            default_data=calib_name, data_dir=data_dir, device=device, progress=progress,
            max_context=model.info.max_context, checkpoint=checkpoint, resume=resume)
        del teacher
    # -- end recovery
    errors = [layer["rel_output_error"] for layer in result.layers if layer["rel_output_error"] is not None]
    record: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "calibration": windows.protocol,
        "model": model.info.to_dict(),
        "architecture": adapter.describe(model.model),
        "layers": result.layers,
        "summary": {"layers": len(result.layers), "mean_rel_output_error": sum(errors) / len(errors) if errors else None,
                    "max_rel_output_error": max(errors) if errors else None,
                    "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                    "peak_rss_bytes": result.peak_rss_bytes,
                    "resumed_from_block": result.resumed_from_block, "device": device, "offload": offload,
                    "recover_seconds": time.perf_counter() - recover_started if recover_phases else None},
        "warnings": notes,
        "environment": environment(),
    }
    if recovery:
        record["recover"] = recovery
        record["summary"]["rel_output_error_measured"] = (
            "by the engine, before recovery changed the weights; each merged layer's recover_rel_weight_change is "
            "||W_merged - W_before|| / ||W_before|| of its recover stage's merge")
    sparsity = _sparsity_summary(result.layers)
    if sparsity is not None:
        owl = getattr(engine, "owl_sparsities", {})
        if owl:
            sparsity["owl_block_sparsity"] = {f"stage {n + 1}": {str(b): s for (m, b), s in sorted(owl.items())
                                                                  if m == n} for n in sorted({m for m, _ in owl})}
        record["sparsity"] = sparsity
    if out_dir is not None:
        from .formats.compressed_tensors import save_quantized

        quantized = set(result.results)
        ignore = sorted({name for name, _ in iter_linears(model.model) if name not in quantized} | {"lm_head"})
        storage = storage_summary(model.model, result.results, sparse_format)
        if storage is not None:
            record["summary"]["sparse_storage"] = storage
        save_quantized(model.model, model.tokenizer, result.results, out_dir, ignore=ignore, input_dir=model.info.path,
                       extra_files={"lmshrink.json": json.dumps(record, indent=1, default=str)},
                       overwrite=overwrite or saved_state is not None,
                       source_tensors=model.weights.get if streamed else None, sparse_format=sparse_format)
        if adapter_files:  # a final recover stage with merge: false: the adapters in PEFT format beside the model
            from .formats.atomic import atomic_directory
            from .methods.recover import ADAPTER_FOLDER

            with atomic_directory(out_dir / ADAPTER_FOLDER, overwrite=True) as staging:
                for filename, content in adapter_files.items():
                    (staging / filename).write_bytes(content)
        checkpoint.remove()
        record["output"] = str(out_dir)
    record["results"] = result.results
    return record
