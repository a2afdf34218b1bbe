"""Low-rank factorization, Basis Sharing and low-rank correction on a real model (protocol P1), one table.

    python bench/lowrank.py --data-dir ../shared/data --recipes svd-llm20,asvd20 \\
        --reuse-dense bench/results/quantize/quantize_p1.json --json rows.json
    python bench/lowrank.py --tables a.json b.json        # one table from the rows of several runs

Protocol P1 (docs/benchmarks.md): model smollm2-135m (fp32); calibration NSAMPLES windows x 512 tokens from C4,
seed 0; evaluation: the first 40 non-overlapping 512-token windows of WikiText-2 test and of the held-out
enwiki-sample split; KL(base || model) on the WikiText-2 windows. Each recipe is compressed in its own process
(`lmshrink compress ... -o DIR`) and the saved folder is evaluated by `lmshrink evaluate DIR --kl-base MODEL`, which
rebuilds the factorized layers from their stored factors (lmshrink.load_model), so the numbers are those of the
files a user gets.

Columns: "block params removed" = 1 - (parameters the decoder-block linears hold as saved: factors, shared bases
once, corrections added) / (their dense count), from the run record; "stored bits/weight" = bits of every tensor the
checkpoint stores for the compressed layers (factors, packed codes, scales, zero points, corrections) over those
layers' dense weights (fp32 dense = 32); compress seconds: the engine's wall and CPU time; peak RSS: the compress
process's.
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
from safetensors import safe_open

DEFAULT_RECIPES = "bench/recipes/svd20.yaml,asvd20,svd-llm20"


def _stored_bits(folder: Path, record: dict) -> float:
    """Bits of the tensors stored for the compressed layers, per dense weight of those layers."""
    layers = {layer["name"]: layer["out_features"] * layer["in_features"] for layer in record["layers"]}
    prefixes = tuple(f"{name}." for name in layers)
    bits = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes) and not key.endswith(".bias"):
                    tensor = handle.get_slice(key)
                    count = 1
                    for size in tensor.get_shape():
                        count *= size
                    bits += count * _element_bits(tensor.get_dtype())
    return bits / sum(layers.values())


def _element_bits(dtype: str) -> int:
    return {"F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I8": 8, "U8": 8}[dtype]


def _rank_summary(ranks: dict[str, int]) -> dict[str, list[int]]:
    """``layer type -> [min, max]`` rank over the blocks (the run record keeps every layer's rank)."""
    summary: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        low_high = summary.setdefault(name.rsplit(".", 1)[-1], [rank, rank])
        low_high[0], low_high[1] = min(low_high[0], rank), max(low_high[1], rank)
    return summary


def _print_table(rows: list[dict]) -> None:
    print("| recipe | wikitext2 ppl | enwiki-sample ppl | KL to base | block params removed | stored bits/weight "
          "| compress s (wall) | compress CPU s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def fmt(key, spec):
            return "" if r.get(key) is None else format(r[key], spec)
        print(f"| {r['recipe']} | {r['wikitext2']:.3f} | {r['enwiki']:.3f} | {r['kl']:.4f} | "
              f"{fmt('params_removed', '.3f')} | {fmt('stored_bpw', '.2f')} | {fmt('seconds', '.0f')} | "
              f"{fmt('cpu_seconds', '.0f')} | {fmt('peak_rss_gib', '.2f')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, DEFAULT_RECIPES, "presets or recipe YAML files, comma-separated")
    add_reuse_dense_argument(parser)
    parser.add_argument("--tables", nargs="+", metavar="JSON", help="print one table of the rows of these --json "
                        "files (the dense row once) and exit")
    args = parser.parse_args()
    if args.tables:
        rows, seen = [], set()
        for path in args.tables:
            for row in json.loads(Path(path).read_text()):
                if row["recipe"] == "dense fp32" and row["recipe"] in seen:
                    continue
                seen.add(row["recipe"])
                rows.append(row)
        print(f"rows of {', '.join(args.tables)}")
        _print_table(rows)
        return
    if print_saved_table(args, _print_table):
        return
    evaluate = evaluate_options(args)
    rows = []
    row, environment = dense_row(parser, args, evaluate, lambda _: {
        "params_removed": 0.0, "stored_bpw": 32.0, "seconds": None, "cpu_seconds": None, "peak_rss_gib": None})
    rows.append(row)
    if environment is not None:
        keep_row(args, rows, "dense")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for recipe in args.recipes.split(","):
            out, record, result = compress_and_evaluate(args, recipe, work, evaluate)
            environment = environment or result["environment"]
            storage = record["summary"].get("lowrank_storage") or {}
            removed = (storage.get("block_linear_params") or {}).get("removed_fraction")
            rows.append({"recipe": recipe, "wikitext2": result["perplexity"][0]["ppl"],
                         "enwiki": result["perplexity"][1]["ppl"], "kl": result["kl"]["kl_mean"],
                         "params_removed": removed, "stored_bpw": _stored_bits(out, record),
                         "seconds": record["summary"]["seconds"],
                         "cpu_seconds": record["summary"].get("cpu_seconds"),
                         "peak_rss_gib": record["process_peak_rss_bytes"] / 2**30,
                         "ranks": _rank_summary(storage.get("ranks") or {})})
            keep_row(args, rows, recipe)
    reused = f"; dense row reused from {args.reuse_dense}" if args.reuse_dense else ""
    print(f"{protocol_line(args)}; KL on WikiText-2; torch {environment['torch'] if environment else '?'}, "
          f"{environment['threads'] if environment else '?'} threads{reused}")
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(stamp(args, rows), indent=1))


if __name__ == "__main__":
    main()
