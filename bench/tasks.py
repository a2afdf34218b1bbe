"""Zero-shot task accuracy of a model (default: smollm2-135m, dense), scored like lm-evaluation-harness.

    python bench/tasks.py                                  # all six shared tasks, full splits
    python bench/tasks.py --limit 200 --out bench/results/tasks.md

Prints task | metric | value | stderr | n | seconds, with the protocol, and writes the same text to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lmshrink.eval.tasks import evaluate_tasks, resolve_task_names
from lmshrink.models import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def format_table(model_name: str, results: dict, limit: int | None, load_seconds: float) -> str:
    """A markdown table of every metric, with the protocol underneath."""
    lines = [f"Zero-shot accuracy, {model_name} (dense), "
             + ("full splits" if not limit else f"first {limit} documents of each split (--limit {limit})"),
             "", "| task | metric | value | stderr | n | seconds |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        metrics = result["metrics"]
        for metric in [m for m in metrics if not m.endswith("_stderr")]:
            value, stderr = metrics[metric], metrics.get(f"{metric}_stderr")
            shown = f"{value:.2f}" if metric == "perplexity" else f"{100 * value:.2f}"
            err = "" if stderr is None else (f"{stderr:.2f}" if metric == "perplexity" else f"{100 * stderr:.2f}")
            lines.append(f"| {name} | {metric}{'' if metric == 'perplexity' else ' (%)'} | {shown} | {err} | "
                         f"{result['n']} | {result['seconds']:.0f} |")
    first = next(iter(results.values()))["protocol"]
    lines += ["", "Protocol: 0-shot, lm-evaluation-harness prompts and scoring (acc = argmax of summed continuation "
              "log-probs, acc_norm = argmax of sum / len(choice) in characters; LAMBADA acc = greedy whole last word, "
              "perplexity = exp(-mean log-likelihood)); tokenization split as lm-eval's HFLM, "
              f"BOS added: {first['bos_added']}, max length {first['max_length']}, batch size {first['batch_size']}, "
              "float32 on CPU.",
              f"Model load {load_seconds:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}."]
    for name, result in results.items():
        p = result["protocol"]
        lines.append(f"- {name}: {p['source']} ({p['split']}); {p['prompt']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMSHRINK_DATA", DEFAULT_DATA)))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="write the full result record here")
    args = parser.parse_args(argv)

    names = resolve_task_names(args.tasks)
    start = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - start
    results = {}
    for name in names:  # one task at a time so partial tables survive an interrupted run
        results.update(evaluate_tasks(loaded.model, loaded.tokenizer, [name], data_dir=args.data_dir,
                                      limit=args.limit, batch_size=args.batch_size, progress=sys.stderr.isatty()))
        r = results[name]
        print(f"{name}: {json.dumps(r['metrics'])} n={r['n']} {r['seconds']:.0f}s", file=sys.stderr, flush=True)
        text = format_table(args.model, results, args.limit, load_seconds)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": args.model, "info": loaded.info.to_dict(), "results": results},
                                            indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
