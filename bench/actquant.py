"""Activation and key/value-cache quantization quality on a real model (protocol P1), one table.

    python bench/actquant.py --data-dir ../shared/data --recipes kv8,kv4,kv2
    python bench/actquant.py --recipes w8a8,w8a8-static --reuse-dense bench/results/actquant/actquant_p1_kv.json

Protocol P1 (docs/benchmarks.md): smollm2-135m in float32, calibration 64 windows x 512 tokens of C4 (seed 0),
evaluation on the first 40 windows x 512 tokens of WikiText-2 test and of the held-out enwiki-sample split, KL to
the dense model on the WikiText-2 windows. Each recipe is compressed by `lmshrink compress` in its own process,
saved, and the saved folder is evaluated by `lmshrink evaluate --kl-base MODEL`, which rebuilds the activation
quantizers, online transforms and quantized cache the folder records (lmshrink-runtime.json), so the numbers are
those of the files a user gets. The quantized cache is simulated position by position in each window (the query at
position t sees the keys and values a cache of t + 1 positions would hold; docs/activation-quantization.md).
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


def _scheme(record: dict) -> dict:
    """Weights / activations / cache of a compress record's scheme, as short strings."""
    parts = {"weights": "float", "activations": "float", "kv_cache": "float"}
    extra = []
    for entry in record.get("scheme", []):
        if "weights" in entry:
            w = entry["weights"]
            group = "per channel" if w["group_size"] == -1 else f"g{w['group_size']}"
            parts["weights"] = f"{entry['method']} int{w['bits']} {group}{' sym' if w['symmetric'] else ''}"
        if "activations" in entry:
            a = entry["activations"]
            kind = {"tensor": "tensor", "token": "token", "group": f"g{a['group_size']}"}[a["granularity"]]
            parts["activations"] = (f"int{a['bits']} {kind} {'dynamic' if a['dynamic'] else 'static'}"
                                    + ("" if a["symmetric"] else " asym")
                                    + (f" clip {a['clip_ratio']:g}" if a["clip_ratio"] != 1 else ""))
        if "kv_cache" in entry:
            k = entry["kv_cache"]
            parts["kv_cache"] = (f"int{k['bits']} g{k['group_size']} w{k['window']}"
                                 + (" rotated" if k.get("rotate") else ""))
        for key in ("smoothing", "rotation", "reordering"):
            if key in entry:
                extra.append(entry[key]["describe"] if isinstance(entry[key], dict) and "describe" in entry[key]
                             else key)
    parts["transforms"] = ", ".join(extra) or "-"
    return parts


def _print_table(rows: list[dict]) -> None:
    dense = next((r for r in rows if r["recipe"] == "dense fp32"), None)

    def delta(row, key):
        if dense is None or row is dense:
            return ""
        return f" ({100 * (row[key] / dense[key] - 1):+.2f}%)"

    print("| recipe | transforms | weights | activations | KV cache | wikitext2 ppl | enwiki-sample ppl | KL to base "
          "| compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r.get("scheme") or {}
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        print(f"| {r['recipe']} | {s.get('transforms', '-')} | {s.get('weights', 'float')} | "
              f"{s.get('activations', 'float')} | {s.get('kv_cache', 'float')} | {r['wikitext2']:.3f}"
              f"{delta(r, 'wikitext2')} | {r['enwiki']:.3f}{delta(r, 'enwiki')} | {r['kl']:.4f} | {secs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, "kv8,kv4,kv2")
    add_reuse_dense_argument(parser)
    args = parser.parse_args()
    if print_saved_table(args, _print_table):
        return
    evaluate = evaluate_options(args)
    rows = []
    row, environment = dense_row(parser, args, evaluate, lambda _: {"seconds": None})
    rows.append(row)
    if environment is not None:
        keep_row(args, rows, "dense")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for recipe in args.recipes.split(","):
            _, record, result = compress_and_evaluate(args, recipe, work, evaluate)
            environment = environment or result["environment"]
            rows.append({"recipe": recipe, "scheme": _scheme(record),
                         "runtime_scheme": result["model"]["extra"].get("runtime_scheme"),
                         "wikitext2": result["perplexity"][0]["ppl"], "enwiki": result["perplexity"][1]["ppl"],
                         "kl": result["kl"]["kl_mean"], "seconds": record["summary"]["seconds"],
                         "cpu_seconds": record["summary"].get("cpu_seconds"),
                         "peak_rss_gib": record["process_peak_rss_bytes"] / 2**30})
            keep_row(args, rows, recipe)
    reused = f"; dense row reused from {args.reuse_dense}" if args.reuse_dense else ""
    print(f"{protocol_line(args)}; KL on WikiText-2; torch {environment['torch'] if environment else '?'}, "
          f"{environment['threads'] if environment else '?'} threads{reused}")
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(stamp(args, rows), indent=1))


if __name__ == "__main__":
    main()
