"""Pruning quality and cost on a real model (protocol P1), one table.

    python bench/prune.py --data-dir ../shared/data                                 # P1, the default recipes
    python bench/prune.py --recipes magnitude50,sparse50 --nsamples 8 --limit 4     # a quick smoke run

Protocol P1: model smollm2-135m (fp32); calibration NSAMPLES windows x 512 tokens from C4 (the shared shard
excerpt), GPTQ sampling, seed 0; evaluation: WikiText-2 test ("\\n\\n"-joined rows), the first 40 non-overlapping
512-token windows, and the held-out split of the packaged enwiki-sample (text not in ../shared/data), same windows.
Each recipe is compressed in its own process (`lmshrink compress ... -o DIR`) and the saved checkpoint is loaded
back through transformers for evaluation (`lmshrink evaluate DIR --kl-base MODEL`), so the numbers are those of
the files a user gets. KL(base || model) is on the WikiText-2 windows. "measured sparsity" is the fraction of exact
zeros in the decoder-block linear weights of the reloaded checkpoint (what `lmshrink evaluate` reports); "N:M" lists
the patterns every sparse layer satisfies. Seconds: the compress call's own time (model loading excluded).
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

DEFAULT_RECIPES = ("magnitude50,wanda50,sparse50,sparse50-refit,owl-wanda50,owl-sparse50,magnitude-2:4,wanda-2:4,2:4,"
                   "4:8,sparse50-w4g128,sparse50-then-w4g128")


def _describe(record: dict) -> tuple[str, str]:
    """(method, pattern) of a recipe record, e.g. ('sparsegpt + owl', 'unstructured 50%')."""
    methods, patterns = [], []
    for stage in record["recipe"]["stages"]:
        name = stage["method"]
        if stage.get("allocation") == "owl":
            name += " (owl)"
        if stage.get("bits"):
            name += f" + w{stage['bits']}g{stage['group_size']}"
        if stage.get("refit_iterations"):
            name += " + refit"
        methods.append(name)
        if "pattern" in stage:
            patterns.append(stage["pattern"] if stage["pattern"] != "unstructured"
                            else f"unstructured {100 * stage['sparsity']:.0f}%")
    return " then ".join(methods), ", ".join(patterns)


def _print_table(rows: list[dict]) -> None:
    print("| recipe | method | pattern | wikitext2 ppl | enwiki-sample ppl | KL to base | measured sparsity | N:M "
          "| compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        sparsity = "" if r["sparsity"] is None else f"{100 * r['sparsity']:.2f}%"
        print(f"| {r['recipe']} | {r['method']} | {r['pattern']} | {r['wikitext2']:.3f} | {r['enwiki']:.3f} "
              f"| {r['kl']:.4f} | {sparsity} | {' '.join(r['nm']) or '-'} | {secs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, DEFAULT_RECIPES)
    add_reuse_dense_argument(parser)
    args = parser.parse_args()
    if print_saved_table(args, _print_table):
        return
    evaluate = evaluate_options(args)
    rows = []
    row, environment = dense_row(parser, args, evaluate, lambda dense: {
        "method": "-", "pattern": "-", "sparsity": dense["sparsity"]["overall"],
        "nm": dense["sparsity"]["nm_patterns"], "seconds": None})
    rows.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for recipe in args.recipes.split(","):
            _, record, result = compress_and_evaluate(args, recipe, work, evaluate)
            environment = environment or result["environment"]
            method, pattern = _describe(record)
            rows.append({"recipe": recipe, "method": method, "pattern": pattern,
                         "wikitext2": result["perplexity"][0]["ppl"], "enwiki": result["perplexity"][1]["ppl"],
                         "kl": result["kl"]["kl_mean"], "sparsity": result["sparsity"]["overall"],
                         "nm": result["sparsity"]["nm_patterns"], "seconds": record["summary"]["seconds"],
                         "block_options": record.get("block_options")})
            keep_row(args, rows, recipe)
    reused = f"; dense row reused from {args.reuse_dense}" if args.reuse_dense else ""
    print(f"{protocol_line(args)}; KL on WikiText-2; torch {environment['torch'] if environment else '?'}, "
          f"{environment['threads'] if environment else '?'} threads{reused}")
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(stamp(args, rows), indent=1))


if __name__ == "__main__":
    main()
