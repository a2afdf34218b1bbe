"""Zero-shot task accuracy of a model (default: smollm2-135m, dense), scored like lm-evaluation-harness.

    python bench/tasks.py                                  # all six shared tasks, full splits
    python bench/tasks.py --limit 200 --out bench/results/eval/tasks.md
    # split the tasks over two single-threaded processes, then merge their records into one table:
    OMP_NUM_THREADS=1 python bench/tasks.py --tasks sst2,piqa,boolq --json a.json &
    OMP_NUM_THREADS=1 python bench/tasks.py --tasks winogrande,arc_easy,lambada_openai --json b.json; wait
    python bench/tasks.py --table-from a.json b.json --out bench/results/eval/tasks.md

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

from lmshrink.core.atomic import atomic_write_text
from lmshrink.eval.tasks.registry import TASKS, resolve_task_names
from lmshrink.eval.tasks.runner import evaluate_tasks
from lmshrink.formats.loading import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _machine() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"


def format_table(model_name: str, results: dict, limit: int | None, runs: list[str]) -> str:
    """A markdown table of every metric, with the protocol underneath; ``runs`` describes the process(es) that
    measured them (model load time, threads)."""
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
              f"shared context key/value cache: {first.get('share_context', False)}, float32 on CPU.",
              *runs]
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
    parser.add_argument("--no-share-context", dest="share_context", action="store_false", default=None,
                        help="score every choice as a full sequence (default on CPU: choices of one context run on "
                             "its key/value cache)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMSHRINK_DATA", DEFAULT_DATA)))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="write the full result record here")
    parser.add_argument("--table-from", type=Path, nargs="+", metavar="JSON",
                        help="merge the records of earlier --json runs (e.g. tasks split over processes) into one "
                             "table, print it (and write --out), and exit")
    parser.add_argument("--note", action="append", default=[],
                        help="a line added under the protocol (e.g. how the runs shared the machine)")
    args = parser.parse_args(argv)

    if args.table_from:
        text = merged_table(args.table_from, args.note)
        if args.out:
            atomic_write_text(args.out, text)
        print(text)
        return 0

    names = resolve_task_names(args.tasks)
    start = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - start
    run = (f"Model load {load_seconds:.0f} s; tasks {', '.join(names)} in one process; {_machine()}; "
           f"command: python bench/tasks.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    results = {}
    for name in names:  # one task at a time so partial tables survive an interrupted run
        results.update(evaluate_tasks(loaded.model, loaded.tokenizer, [name], data_dir=args.data_dir,
                                      limit=args.limit, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                                      share_context=args.share_context))
        r = results[name]
        print(f"{name}: {json.dumps(r['metrics'])} n={r['n']} {r['seconds']:.0f}s", file=sys.stderr, flush=True)
        text = format_table(args.model, results, args.limit, [run, *args.note])
        if args.out:
            atomic_write_text(args.out, text)
        if args.json:
            atomic_write_text(args.json, json.dumps({"model": args.model, "info": loaded.info.to_dict(),
                                                     "limit": args.limit, "run": run, "results": results}, indent=1))
    print(text)
    return 0


def merged_table(paths: list[Path], notes: list[str]) -> str:
    """One table from several --json records of the same model and --limit (tasks in the standard order)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    models = {r["model"] for r in records}
    limits = {r.get("limit") for r in records}
    if len(models) > 1 or len(limits) > 1:
        raise SystemExit(f"--table-from: the records differ in model {sorted(models)} or --limit "
                         f"{sorted(map(str, limits))}; merge only runs of one model and one --limit")
    results: dict = {}
    for path, record in zip(paths, records):
        for name, result in record["results"].items():
            if name in results:
                raise SystemExit(f"--table-from: task {name} is in more than one record ({path})")
            results[name] = result
    results = {name: results[name] for name in sorted(results, key=lambda n: (list(TASKS).index(n), n))}
    runs = [f"{path.name}: {record.get('run', 'run details not recorded')}" for path, record in zip(paths, records)]
    return format_table(records[0]["model"], results, records[0].get("limit"), runs + notes)


if __name__ == "__main__":
    raise SystemExit(main())
