"""Cross-check lmshrink's zero-shot scoring against the real lm-evaluation-harness on the same local files.

    python bench/lm_eval_crosscheck.py --limit 100            # piqa + arc_easy, end-to-end on smollm2-135m

Two checks:
1. Requests (no model forward, full splits): for piqa, arc_easy, boolq, sst2 and lambada_openai, lm-eval's own
   task YAMLs are pointed at our local files (``dataset_path: json`` + ``data_files``); every (context,
   continuation) request it builds must equal ours, and its HFLM context/continuation token split must equal ours.
2. End-to-end (model forwards, first --limit documents of --tasks): lm-eval's ``simple_evaluate`` with an HFLM
   wrapping the same model object vs ``evaluate_tasks``; prints both accuracies, per-item agreement of the
   predicted choice (acc and acc_norm) and the largest log-likelihood difference.

Skips with a message when lm_eval is not installed (``pip install lm_eval``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmshrink.eval.tasks.datafiles import load_docs
from lmshrink.eval.tasks.registry import TASKS, resolve_task_names
from lmshrink.eval.tasks.runner import evaluate_tasks
from lmshrink.eval.tasks.scoring import encode_pair

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# lm-eval YAML (relative to lm_eval/tasks) and the split it evaluates, for each task we can feed it as JSON.
LM_EVAL_YAML = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "sst2": ("glue/sst2/default.yaml", "validation"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
}


def write_task_configs(folder: Path, data_dir: Path, names: list[str]) -> dict[str, str]:
    """lm-eval task YAMLs that include lm-eval's own config and read our documents from JSON lines."""
    import lm_eval.tasks as lm_tasks

    root = Path(lm_tasks.__file__).parent
    aliases = {}
    for name in names:
        yaml_path, split = LM_EVAL_YAML[name]
        docs, _ = load_docs(TASKS[name], data_dir)
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
        alias = f"xcheck_{name}"
        (folder / f"{alias}.yaml").write_text(
            f"include: {root / yaml_path}\n"
            f"task: {alias}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data_file}\n"
            "training_split: null\n"
            f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\n"
        )
        aliases[name] = alias
    return aliases


def check_requests(lm, task_manager, aliases: dict[str, str], data_dir: Path, tokenizer) -> bool:
    """Check 1: identical requests and token splits on full splits."""
    from lm_eval.tasks import get_task_dict

    ok = True
    task_dict = get_task_dict(list(aliases.values()), task_manager)
    for name, alias in aliases.items():
        task = task_dict[alias]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        theirs: dict[int, list[tuple[str, str]]] = {}
        for inst in task.instances:
            theirs.setdefault(inst.doc_id, []).append((inst.idx, tuple(inst.args)))
        docs, _ = load_docs(TASKS[name], data_dir)
        ours = [TASKS[name].to_item(d).requests for d in docs]
        n_docs = len(ours)
        same_requests = same_tokens = 0
        n_requests = 0
        for doc_id, requests in enumerate(ours):
            lm_requests = [args for _, args in sorted(theirs.get(doc_id, []))]
            same_requests += lm_requests == [tuple(r) for r in requests]
            for ctx, cont in requests:
                n_requests += 1
                same_tokens += lm._encode_pair(ctx, cont) == tuple(encode_pair(tokenizer, ctx, cont))
        ok &= same_requests == n_docs and same_tokens == n_requests and len(theirs) == n_docs
        print(f"[requests] {name}: {same_requests}/{n_docs} documents with identical requests, "
              f"{same_tokens}/{n_requests} identical token splits (lm-eval docs: {len(theirs)})")
    return ok


def check_end_to_end(lm, model, tokenizer, task_manager, aliases: dict[str, str], data_dir: Path, limit: int,
                     batch_size: int) -> bool:
    """Check 2: accuracies and per-item choices from both implementations."""
    from lm_eval import simple_evaluate

    ok = True
    for name, alias in aliases.items():
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[alias], task_manager=task_manager, limit=limit, num_fewshot=0,
                              log_samples=True, bootstrap_iters=0, batch_size=batch_size)
        lm_seconds = time.perf_counter() - start
        samples = sorted(out["samples"][alias], key=lambda s: s["doc_id"])
        start = time.perf_counter()
        ours = evaluate_tasks(model, tokenizer, [name], data_dir=data_dir, limit=limit, batch_size=batch_size,
                              progress=False, keep_items=True)[name]
        our_seconds = time.perf_counter() - start
        metrics = [m for m in ("acc", "acc_norm") if m in TASKS[name].metrics]
        agree = {m: 0 for m in metrics}
        max_diff = 0.0
        for sample, record in zip(samples, ours["items"], strict=True):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, record["loglikelihoods"])))
            for m in metrics:
                agree[m] += sample[m] == record[m]
        n = len(samples)
        for m in metrics:
            theirs, mine = out["results"][alias][f"{m},none"], ours["metrics"][m]
            ok &= abs(theirs - mine) <= 0.005 or agree[m] == n
            print(f"[end-to-end] {name} {m}: lm-eval {100 * theirs:.2f}  lmshrink {100 * mine:.2f}  "
                  f"(n={n}; per-item agreement {agree[m]}/{n})")
        print(f"[end-to-end] {name}: max |loglikelihood difference| {max_diff:.2e}; seconds lm-eval "
              f"{lm_seconds:.0f}, lmshrink {our_seconds:.0f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="piqa,arc_easy", help="end-to-end tasks (from: %s)" % ",".join(LM_EVAL_YAML))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMSHRINK_DATA", DEFAULT_DATA)))
    parser.add_argument("--skip-requests", action="store_true", help="skip check 1")
    parser.add_argument("--requests-only", action="store_true", help="skip check 2")
    args = parser.parse_args(argv)

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        print("SKIPPED: lm_eval is not installed (pip install lm_eval torch==<your torch>)")
        return 0
    from lmshrink.formats.loading import load_model

    end_to_end = resolve_task_names(args.tasks)
    loaded = load_model(args.model)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.batch_size, device="cpu")
    print(f"lm_eval {lm_eval.__version__}; model {args.model}; data {args.data_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        aliases = write_task_configs(Path(tmp), args.data_dir, list(LM_EVAL_YAML))
        manager = TaskManager(include_path=tmp)
        ok = True
        if not args.skip_requests:
            ok &= check_requests(lm, manager, aliases, args.data_dir, loaded.tokenizer)
        if not args.requests_only:
            ok &= check_end_to_end(lm, loaded.model, loaded.tokenizer, manager,
                                   {n: aliases[n] for n in end_to_end}, args.data_dir, args.limit, args.batch_size)
    print("RESULT:", "agree" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
