"""Structured pruning quality and size on a real model (protocol P1), one table.

    python bench/structured.py --data-dir ../shared/data --recipes struct20,depth20 --json rows.json
    python bench/structured.py --recipes bench/recipes/structured/w20-magnitude.yaml --nsamples 8 --limit 4
    python bench/structured.py --recipes struct20 --tasks piqa,arc_easy,winogrande --task-limit 200

Protocol P1 (bench/p1.py): model smollm2-135m (fp32); calibration 64 windows x 512 tokens of the shared C4
excerpt, seed 0; evaluation: the first 40 non-overlapping 512-token windows of WikiText-2 test and of the held-out
enwiki-sample split; KL(base || model) on the WikiText-2 windows. Each recipe is compressed in its own process and
the saved folder is loaded back for evaluation, so the numbers are those of the files a user gets. "block params
removed" is the share of the decoder blocks' parameters the saved model no longer has (added biases counted);
"params" the whole model's. With --tasks, each model (the dense one too) is also scored zero-shot on those tasks
(lm-evaluation-harness prompts; --task-limit documents of each, which the table states). Seconds: the compress
call's own wall time (model loading excluded), recover stages included; CPU seconds beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from p1 import (
    add_p1_arguments,
    add_reuse_dense_argument,
    compress_and_evaluate,
    dense_row,
    evaluate_options,
    keep_row,
    print_saved_table,
    protocol_line,
    stamp,
)

DEFAULT_RECIPES = "struct20,depth20"


def _describe(record: dict) -> str:
    """A short description of a recipe's stages, e.g. 'width 20% fluctuation lstsq uniform + recover'."""
    parts = []
    for stage in record["recipe"]["stages"]:
        if stage["method"] == "prune-width":
            budget = f"{100 * stage['ratio']:g}%" if stage.get("ratio") else f"{stage.get('params')} params"
            parts.append(f"width {budget} {stage.get('importance', 'fluctuation')} "
                         f"{stage.get('repair', 'lstsq')} {stage.get('widths', 'uniform')}")
        elif stage["method"] == "prune-depth":
            budget = (f"{100 * stage['ratio']:g}%" if stage.get("ratio") else
                      f"{stage.get('blocks') or len(stage.get('remove') or [])} blocks")
            parts.append(f"depth {budget} {stage.get('score', 'influence')}")
        elif stage["method"] == "recover":
            parts.append(f"recover {stage.get('max_seconds') or ''}s".strip())
        else:
            parts.append(stage["method"])
    return " + ".join(parts)


def _tasks(result: dict) -> dict[str, float]:
    out = {}
    for task in (result.get("tasks") or {}).values():
        metrics = task["metrics"]
        out[task["task"]] = metrics.get("acc_norm", metrics.get("acc"))
    return out


def _print_table(rows: list[dict]) -> None:
    tasks = sorted({t for r in rows for t in (r.get("tasks") or {})})
    head = ["recipe", "stages", "params", "block params removed", "wikitext2 ppl", "enwiki-sample ppl", "KL to base",
            *[f"{t} acc" for t in tasks], "compress s", "cpu s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        removed = "" if r.get("block_removed") is None else f"{100 * r['block_removed']:.2f}%"
        params = "" if r.get("params") is None else f"{r['params'] / 1e6:.3f}M"
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        cpu = "" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.0f}"
        accs = [f"{100 * r['tasks'][t]:.2f}" if t in (r.get("tasks") or {}) else "" for t in tasks]
        print(f"| {r['recipe']} | {r.get('stages', '-')} | {params} | {removed} | {r['wikitext2']:.3f} | {r['enwiki']:.3f} "
              f"| {r['kl']:.4f} | " + " | ".join([*accs, secs, cpu]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, DEFAULT_RECIPES)
    add_reuse_dense_argument(parser)
    parser.add_argument("--tasks", help="zero-shot tasks to score every model on, comma separated")
    parser.add_argument("--task-limit", type=int, help="documents of each task (default: all)")
    args = parser.parse_args()
    if print_saved_table(args, _print_table):
        return
    evaluate = evaluate_options(args)
    task_options = (["--tasks", args.tasks] + (["--task-limit", str(args.task_limit)] if args.task_limit else [])
                    if args.tasks else [])
    rows = []
    row, environment = dense_row(parser, args, evaluate + task_options, lambda dense: {
        "stages": "-", "params": dense["size"]["parameters"], "block_removed": 0.0, "tasks": _tasks(dense),
        "task_limit": args.task_limit if args.tasks else None, "seconds": None, "cpu_seconds": None})
    if environment is None and args.tasks and not row.get("tasks"):
        parser.error("--reuse-dense: that dense row has no task scores; run without --reuse-dense")
    rows.append(row)
    if environment is not None:
        keep_row(args, rows, "dense fp32")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for recipe in args.recipes.split(","):
            _, record, result = compress_and_evaluate(args, recipe, work, evaluate + task_options)
            environment = environment or result["environment"]
            structure = record.get("structure") or {}
            rows.append({"recipe": recipe, "stages": _describe(record), "params": result["size"]["parameters"],
                         "block_removed": structure.get("block_parameters_removed"), "wikitext2": result["perplexity"][0]["ppl"],
                         "enwiki": result["perplexity"][1]["ppl"], "kl": result["kl"]["kl_mean"],
                         "tasks": _tasks(result), "task_limit": args.task_limit if args.tasks else None,
                         "seconds": record["summary"]["seconds"] + (record["summary"].get("recover_seconds") or 0),
                         "cpu_seconds": record["summary"]["cpu_seconds"],
                         "structure": structure or None, "recover": [{k: r.get(k) for k in ("steps_run", "stopped_by", "seconds",
                                                                                     "held_out_before",
                                                                                     "held_out_after_merge")}
                                                             for r in record.get("recover", [])],
                         "block_options": record.get("block_options")})
            keep_row(args, rows, recipe)
    reused = f"; dense row reused from {args.reuse_dense}" if args.reuse_dense else ""
    tasks = (f"; tasks {args.tasks}, " + (f"first {args.task_limit} documents each" if args.task_limit else "full")
             if args.tasks else "")
    print(f"{protocol_line(args)}; KL on WikiText-2{tasks}; torch "
          f"{environment['torch'] if environment else '?'}, {environment['threads'] if environment else '?'} "
          f"threads{reused}")
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(stamp(args, rows), indent=1))


if __name__ == "__main__":
    main()
