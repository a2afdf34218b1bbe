"""The Python API: the same verbs as the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmshrink.core.actquant import ActSpec, KVSpec
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.process import environment
from lmshrink.data.sources import load_text
from lmshrink.data.windows import evaluation_windows
from lmshrink.eval.bench import bench
from lmshrink.eval.kl import kl_divergence
from lmshrink.eval.perplexity import perplexity
from lmshrink.eval.size import model_size
from lmshrink.eval.sparsity import model_sparsity
from lmshrink.eval.tasks.runner import evaluate_tasks
from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder, load_quantized_results
from lmshrink.formats.gguf_export import export_gguf
from lmshrink.formats.gptq_export import export_gptq
from lmshrink.formats.hf_folder import natural_key
from lmshrink.formats.loading import as_loaded, load_model
from lmshrink.formats.lowrank import is_lowrank_folder
from lmshrink.formats.onnx_export import export_onnx
from lmshrink.formats.runtime_scheme import read_runtime
from lmshrink.formats.storage import stored_size
from lmshrink.models.loader import LoadedModel
from lmshrink.pipeline.compress import compress

__all__ = ["load_model", "evaluate", "compress", "bench", "export"]


def _split_names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _sparsity(loaded: LoadedModel) -> dict[str, Any]:
    """Measured sparsity of the block linears; layers held packed (a compressed-tensors folder) are decoded.

    ``pruned``: whether the zeros were asked for: True when the folder records pruned layers (a compressed-tensors
    ``sparsity_config``), False for a quantized folder without one (its zeros are weights whose code rounds to
    zero), None for other models (unknown)."""
    record = model_sparsity(loaded.model)
    path = loaded.info.path
    if record["skipped_packed_layers"] and path is not None:
        if is_compressed_tensors_folder(path):
            decoded = {name: result.weight for name, result in load_quantized_results(path).items()}
            record = model_sparsity(loaded.model, decoded)
    record["pruned"] = None
    if path is not None and Path(path).is_dir() and is_compressed_tensors_folder(path):
        config = json.loads((Path(path) / "config.json").read_text())
        record["pruned"] = bool(config["quantization_config"].get("sparsity_config"))
    if record["pruned"] is False:
        record["zeros_from"] = "rounding: weights whose quantization code decodes to exactly zero (no pruning)"
    return record


def _storage(loaded: LoadedModel) -> dict[str, Any] | None:
    """Bytes of the model's weights on disk (``formats.storage``), for models loaded from a folder."""
    path = loaded.info.path
    if path is None or not Path(path).is_dir():
        return None
    return stored_size(path)


def evaluate(model: LoadedModel | str | torch.nn.Module, *, ppl: str | list[str] | None = None,
             split: str = "test", seqlen: int = 512, limit: int | None = None,
             kl_base: LoadedModel | str | None = None, tasks: str | list[str] | None = None,
             task_limit: int | None = None, data_dir: str | Path | None = None, batch_size: int = 1,
             tokenizer=None, progress: bool = True, dtype: str = "float32", device: str = "cpu",
             trust_remote_code: bool = False, bos_per_window: bool | None = None) -> dict[str, Any]:
    """Evaluate a model; returns a JSON-ready record with every protocol detail.

    ``bos_per_window``: start every perplexity/KL window with the BOS token; None (default) does so exactly when the
    tokenizer adds BOS by itself (``data.windows.evaluation_windows``).

    ``ppl`` names one or more text sets (``wikitext2``, ``c4``, ``ptb``, ``enwiki-sample``, ``file:PATH``);
    when neither ``ppl`` nor ``tasks`` is given, perplexity on the packaged ``enwiki-sample`` held-out split
    is measured. ``kl_base`` adds the KL divergence from that model on the first perplexity set's windows.
    """
    task_names = _split_names(tasks)
    ppl_sets = _split_names(ppl)
    if not ppl_sets and not task_names:
        ppl_sets = ["enwiki-sample"]
    if kl_base is not None and not ppl_sets:
        raise LmshrinkError("--kl-base needs text windows to compare on", fix="add --ppl (e.g. --ppl wikitext2)")
    # Resolve the text first: a missing data set should fail before a model is loaded.
    sources = [load_text(name, split, data_dir) for name in ppl_sets]
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    load = dict(dtype=dtype, device=device, progress=progress, trust_remote_code=trust_remote_code)
    loaded = as_loaded(model, tokenizer, **load)
    base = as_loaded(kl_base, **load) if kl_base is not None else None
    record: dict[str, Any] = {"model": loaded.info.to_dict(), "size": model_size(loaded.model),
                              "storage": _storage(loaded), "sparsity": _sparsity(loaded), "perplexity": [],
                              "environment": environment()}
    for i, source in enumerate(sources):
        windows = evaluation_windows(loaded.tokenizer, source, seqlen, limit, loaded.info.max_context,
                                     bos_per_window=bos_per_window)
        if base is not None and i == 0:
            # One pass gives both: the KL pass computes the model's per-window NLL too.
            kl = kl_divergence(loaded.model, base.model, windows, batch_size, progress)
            result = {key: kl.pop(key) for key in ("ppl", "mean_nll", "window_nll")}
            result.update(tokens=int(windows.input_ids.numel()), seconds=kl["seconds"], with_kl_base=True)
            record["kl"] = {"base": base.info.to_dict(), "protocol": windows.protocol, **kl}
        else:
            result = perplexity(loaded.model, windows, batch_size, progress, desc=f"ppl {source.name}")
        record["perplexity"].append({"protocol": windows.protocol, **result})
    if task_names:
        record["tasks"] = evaluate_tasks(loaded.model, loaded.tokenizer, task_names, data_dir=data_dir,
                                         limit=task_limit, progress=progress)
    return record


EXPORT_FORMATS = ("gguf", "gptq", "onnx")


def _check_exportable(folder: Path, to: str) -> None:
    """Refuse a folder whose activations, input transforms or cache lmshrink quantizes: no export format holds them
    (the model would compute something else there)."""
    scheme = read_runtime(folder) if folder.is_dir() else None
    if not scheme:
        return
    inputs = scheme.get("inputs") or {}
    if inputs:
        name = min(inputs, key=natural_key)
        entry = inputs[name]
        what = ("activation quantization " + ActSpec(**entry["activations"]).describe() if "activations" in entry
                else f"an online input transform ({entry['transform'].get('kind')})")
        raise LmshrinkError(f"{folder}: layer {name} has {what}, which the {to} format cannot hold (the exported "
                            "model would compute in float there)",
                            fix="run this folder with lmshrink (load_model, lmshrink bench/evaluate), or export a "
                                "folder compressed without the activations/rotate stages")
    block, spec = next(iter((scheme.get("kv_cache") or {}).items()))
    raise LmshrinkError(f"{folder}: the attention of block {block} quantizes its key/value cache "
                        f"({KVSpec(**spec).describe()}), which the {to} format cannot hold",
                        fix="run this folder with lmshrink, or export a folder compressed without the kv-cache stage")


def export(folder: str | Path, to: str, output: str | Path, *, overwrite: bool = False,
           source_gguf: str | Path | None = None, dense_type: str = "f16", check: bool = True) -> dict[str, Any]:
    """Export a compressed folder (written by ``compress``) to another runtime's format; returns a JSON-ready report.

    ``to="gguf"``: one .gguf file for llama.cpp (Q4_0 / Q4_1 / Q8_0 blocks mapped from the codes; ``source_gguf``
    and ``dense_type`` apply). ``to="gptq"``: a GPTQ v1 folder (AutoGPTQ / gptqmodel / vLLM). ``to="onnx"``: a folder
    with ``model.onnx`` (``input_ids -> logits``, no key/value cache), each quantized Linear an ONNX Runtime
    MatMulNBits node; ``check`` runs it in onnxruntime against lmshrink's model (needs the ``onnx`` extra:
    ``pip install -e '.[onnx]'`` in the lmshrink checkout).
    """
    if to in EXPORT_FORMATS and is_lowrank_folder(folder):
        raise LmshrinkError(f"{folder} stores low-rank factors, which the {to} export cannot map onto its format",
                            fix="compress again with `merge: true` on the low-rank stages (dense weights), or run the "
                                "folder with lmshrink itself (load_model, evaluate, bench)")
    _check_exportable(Path(folder), to)
    if to == "gguf":
        return export_gguf(folder, output, source_gguf=source_gguf, dense_type=dense_type, overwrite=overwrite)
    if to == "gptq":
        return export_gptq(folder, output, overwrite=overwrite)
    if to == "onnx":
        return export_onnx(folder, output, overwrite=overwrite, check=check)
    raise LmshrinkError(f"export format {to!r} is not supported", fix=f"use one of: {', '.join(EXPORT_FORMATS)}")
