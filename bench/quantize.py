"""Weight quantization quality and cost on a real model (protocol P1), one table.

    python bench/quantize.py --data-dir ../shared/data                      # P1, the default recipes
    python bench/quantize.py --recipes rtn-w4g128,w4g128 --nsamples 16       # quicker

Protocol P1: model smollm2-135m (fp32); calibration NSAMPLES windows x 512 tokens from C4 (the shared shard
excerpt), GPTQ sampling, seed 0; evaluation: WikiText-2 test ("\\n\\n"-joined rows), the first 40 non-overlapping
512-token windows, and the held-out split of the packaged enwiki-sample (text not in ../shared/data), same windows.
Each recipe is compressed in its own process (`lmshrink compress ... -o DIR`; peak RSS is that whole process's:
loading the model, compressing, writing the checkpoint) and the
saved checkpoint is loaded back through transformers for evaluation (`lmshrink evaluate DIR --kl-base MODEL`), so
the numbers are those of the files a user gets. KL(base || model) is on the WikiText-2 windows.
Compress seconds: wall time of the engine and its CPU time (user + system, all threads; less sensitive to other
jobs on the machine than wall time).
bits/weight: "grid" = bits + (16-bit scale + zero bits if asymmetric) / group size, over the quantized layers, plus
16 bits per weight of the input columns kept in 16 bits (OWQ); "stored" = bytes of the packed tensors
(weight_packed, weight_scale, weight_zero_point, g_idx, and OWQ's weight_outlier_index and weight_outlier_values) in
the checkpoint, over the same weights. Recipes of several stages (awq then rtn) take the grid of their quantizing
stage, and weights count once per layer.
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

from lmshrink.formats.compressed_tensors import packed_storage

_QUANTIZING = ("rtn", "gptq", "owq")


def _layers(record: dict) -> list[dict]:
    """One line per layer: the last stage's (a recipe of several stages records a layer once per stage)."""
    return list({layer["name"]: layer for layer in record["layers"]}.values())


def _stored_bits(folder: Path) -> float:
    return packed_storage(folder)["bits_per_weight"]


def _grid_bits(record: dict) -> float:
    stage = next(s for s in reversed(record["recipe"]["stages"]) if s["method"] in _QUANTIZING)
    bits, group = stage["bits"], stage["group_size"]
    per_group = 16 + (0 if stage["symmetric"] else bits)
    total = weights = 0
    for layer in _layers(record):
        n = layer["out_features"] * layer["in_features"]
        groups = 1 if group == -1 else -(-layer["in_features"] // group)
        total += n * bits + layer["out_features"] * groups * per_group
        total += 16 * layer["out_features"] * (layer.get("kept_columns") or 0)
        weights += n
    return total / weights


def _print_table(rows: list[dict]) -> None:
    print("| recipe | wikitext2 ppl | enwiki-sample ppl | KL to base | bits/weight (grid) | bits/weight (stored) "
          "| compress s (wall) | compress CPU s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        rss = "" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        cpu = "" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.0f}"
        print(f"| {r['recipe']} | {r['wikitext2']:.3f} | {r['enwiki']:.3f} | {r['kl']:.4f} | {r['grid_bpw']:.2f} "
              f"| {r['stored_bpw']:.2f} | {secs} | {cpu} | {rss} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, "rtn-w4g128,w4g128,rtn-w3g128,w3g128")
    add_reuse_dense_argument(parser)
    args = parser.parse_args()
    if print_saved_table(args, _print_table):
        return
    evaluate = evaluate_options(args)
    rows = []
    row, environment = dense_row(parser, args, evaluate, lambda _: {
        "grid_bpw": 32.0, "stored_bpw": 32.0, "seconds": None, "cpu_seconds": None, "peak_rss_gib": None})
    rows.append(row)
    if environment is not None:
        keep_row(args, rows, "dense")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for recipe in args.recipes.split(","):
            out, record, result = compress_and_evaluate(args, recipe, work, evaluate)
            environment = environment or result["environment"]
            rows.append({"recipe": recipe, "wikitext2": result["perplexity"][0]["ppl"],
                         "enwiki": result["perplexity"][1]["ppl"], "kl": result["kl"]["kl_mean"],
                         "grid_bpw": _grid_bits(record), "stored_bpw": _stored_bits(out),
                         "seconds": record["summary"]["seconds"],
                         "cpu_seconds": record["summary"].get("cpu_seconds"),
                         "peak_rss_gib": record["process_peak_rss_bytes"] / 2**30,
                         "engine_peak_rss_gib": record["summary"].get("engine_peak_rss_bytes",
                                                                      record["summary"]["peak_rss_bytes"]) / 2**30})
            keep_row(args, rows, recipe)
    reused = f"; dense row reused from {args.reuse_dense}" if args.reuse_dense else ""
    print(f"{protocol_line(args)}; KL on WikiText-2; torch {environment['torch'] if environment else '?'}, "
          f"{environment['threads'] if environment else '?'} threads{reused}")
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(stamp(args, rows), indent=1))


if __name__ == "__main__":
    main()
