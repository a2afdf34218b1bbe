"""evaluate_tasks: zero-shot accuracy of a causal LM on the registered tasks, scored like lm-eval."""

from __future__ import annotations

import time
from pathlib import Path

from lmshrink.eval.tasks.datafiles import load_docs, resolve_data_dir
from lmshrink.eval.tasks.metrics import PERPLEXITY_BOOTSTRAP, aggregate, choose
from lmshrink.eval.tasks.registry import TASKS, resolve_task_names
from lmshrink.eval.tasks.scoring import loglikelihoods, max_length_of, prefix_token_id
from lmshrink.eval.tasks.spec import TaskSpec


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def score_task(model, tokenizer, spec: TaskSpec, docs: list[dict], batch_size: int = 8,
               progress: bool = True, share_context: bool | None = None) -> tuple[dict, list[dict]]:
    """Metrics for ``docs`` of one task, and one record per document (gold, predictions, log-likelihoods)."""
    items = [spec.to_item(doc) for doc in docs]
    requests = [req for item in items for req in item.requests]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, desc=spec.name,
                            share_context=share_context)
    records, at = [], 0
    for item in items:
        mine = scores[at:at + len(item.requests)]
        at += len(item.requests)
        if spec.kind == "multiple_choice":
            records.append(choose(item, mine))
        else:
            records.append({"loglikelihood": mine[0][0], "greedy": mine[0][1]})
    return aggregate(spec.kind, spec.metrics, records), records


def evaluate_tasks(model, tokenizer, tasks: list[str] | str, data_dir: Path | str | None = None,
                   limit: int | None = None, batch_size: int = 8, progress: bool = True,
                   keep_items: bool = False, share_context: bool | None = None) -> dict[str, dict]:
    """Zero-shot results per task name: {"task", "metrics": {"acc", "acc_stderr", ...}, "n", "seconds",
    "protocol": {...}} (plus "items", the per-document records, when ``keep_items``).

    ``tasks`` is a list or comma-separated string ("all" = the six tasks with shared data). Data come from
    ``data_dir``, else ``$LMSHRINK_DATA``, else the Hugging Face hub when reachable. ``limit`` keeps the first
    N documents, as lm-eval's --limit does. Every task's files are found before any scoring starts.
    ``share_context`` (default: on for a model on CPU): choices of one context run on its key/value cache instead
    of recomputing the context per choice (see ``loglikelihoods``).
    """
    names = resolve_task_names(tasks)
    root = resolve_data_dir(data_dir)
    loaded = {name: load_docs(TASKS[name], root) for name in names}
    max_length = max_length_of(model, tokenizer)
    results: dict[str, dict] = {}
    for name in names:
        spec = TASKS[name]
        docs, source = loaded[name]
        docs = docs[:limit] if limit else docs
        start = time.perf_counter()
        metrics, records = score_task(model, tokenizer, spec, docs, batch_size=batch_size, progress=progress,
                                      share_context=share_context)
        results[name] = {
            "task": name,
            "metrics": metrics,
            "n": len(docs),
            "seconds": round(time.perf_counter() - start, 2),
            "protocol": {
                "source": source,
                "split": spec.split,
                "limit": limit,
                "num_fewshot": 0,
                "prompt": spec.prompt,
                "scoring": ("sum of continuation log-probs; acc = argmax, acc_norm = argmax of sum / len(choice) "
                            "in characters" if spec.kind == "multiple_choice" else
                            "acc = every continuation token is the argmax; perplexity = exp(-mean log-likelihood), "
                            f"stderr by {PERPLEXITY_BOOTSTRAP} bootstrap resamples"),
                "tokenization": "lm-eval HFLM: whole = encode(context + continuation), continuation = whole after "
                                "encode(context); trailing context spaces moved to the continuation",
                "bos_added": _adds_bos(tokenizer),
                "prefix_token_id": prefix_token_id(tokenizer),
                "max_length": max_length,
                "batch_size": batch_size,
                "share_context": (next(model.parameters()).device.type == "cpu" if share_context is None
                                  else share_context),
                "reference": f"lm-evaluation-harness task '{name}'",
            },
        }
        if keep_items:
            results[name]["items"] = records
    return results
