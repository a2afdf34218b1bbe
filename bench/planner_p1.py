"""The budget planner on P1: tables from a sweep's results store and a sensitivity study.

    # preset rows measured by bench/quantize.py (same P1 protocol) into the store, with their checkpoints' sizes
    python bench/planner_p1.py import --db p1.sqlite --row w3g128=presets.json:w3g128:presets/w3g128
    # the runs: predicted against measured stored bytes, quality, and which presets each plan beats
    python bench/planner_p1.py table --db p1.sqlite
    # proxy against measured KL (Spearman) per option over the layers whose KL the study measured
    python bench/planner_p1.py spearman --sensitivity sens.sqlite

The plans themselves come from the CLI (docs/planner.md): `lmshrink sensitivity`, `lmshrink plan`, `lmshrink sweep`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lmshrink.core.store import Store
from lmshrink.pipeline.sweep import stored_bytes
from lmshrink.report.html import spearman


def _import(args) -> None:
    with Store(args.db) as store:
        for spec in args.row:
            name, rest = spec.split("=", 1)
            results, row_name, folder = rest.split(":")
            rows = json.loads(Path(results).read_text())
            row = next(r for r in rows if r["recipe"] == row_name)
            record = json.loads((Path(folder) / "lmshrink.json").read_text())
            run = store.add_run(f"import:{name}:{results}", args.model, name, "preset", record["recipe"], 0,
                                {"source": results, "row": row_name, "protocol": row.get("protocol")})
            sizes = stored_bytes(Path(folder))
            weights = sum(layer["out_features"] * layer["in_features"] for layer in record["layers"])
            store.claim_run(run, "import")
            store.finish_run(run, {"imported_from": results, "row": row, "compress": record},
                             {"ppl.wikitext2": row["wikitext2"], "ppl.enwiki-sample": row["enwiki"], "kl": row["kl"],
                              "compress_seconds": row.get("seconds"), "compress_cpu_seconds": row.get("cpu_seconds"),
                              **sizes, "packed_bits_per_weight": 8 * sizes["packed_bytes"] / weights})
            print(f"imported {name}: {sizes['stored_bytes']} bytes", file=sys.stderr)


def _table(args) -> None:
    with Store(args.db) as store:
        runs = [r for r in store.runs("done")]
    runs.sort(key=lambda r: r["metrics"].get("stored_bytes") or 0)
    print("| run | kind | stored bytes | predicted bytes | packed bits/weight | WikiText-2 | enwiki-sample | KL | "
          "compress s | beats every preset at or below its budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    presets = [r for r in runs if r["kind"] == "preset"]
    for r in runs:
        m = r["metrics"]
        beats = ""
        if r["kind"] == "plan":
            plan = r["record"]["plan"]
            budget = plan["budget"]
            limit = (plan["fixed_bytes"] + budget["bits"] * plan["planned_parameters"] / 8 if budget.get("bits")
                     else budget.get("size_bytes") or 1e6 * budget.get("size_mb") or m["stored_bytes"])
            smaller = [p for p in presets if p["metrics"]["stored_bytes"] <= limit]
            wins = [p["name"] for p in smaller if m["ppl.wikitext2"] < p["metrics"]["ppl.wikitext2"]
                    and m["ppl.enwiki-sample"] < p["metrics"]["ppl.enwiki-sample"]]
            beats = ("yes" if len(wins) == len(smaller) else "no") + f" ({', '.join(wins) or 'none'} of " \
                    f"{', '.join(p['name'] for p in smaller) or 'none'})"
        predicted = m.get("predicted_stored_bytes")
        print(f"| {r['name']} | {r['kind']} | {m['stored_bytes']:.0f} | {'' if predicted is None else f'{predicted:.0f}'}"
              f" | {m.get('packed_bits_per_weight', float('nan')):.3f} | {m['ppl.wikitext2']:.3f} | "
              f"{m['ppl.enwiki-sample']:.3f} | {m['kl']:.4f} | {m.get('compress_seconds') or float('nan'):.0f} | {beats} |")


def _block(layer: str) -> str:
    return next((part for part in layer.split(".") if part.isdigit()), "")


def _type_calibrated(rows: list[dict]) -> list[float]:
    """Each row's proxy times a factor of its layer type: the geometric mean of KL / proxy over the measured layers
    of that type in other blocks (leave one block out, so a layer's own KL never sets its factor)."""
    out = []
    for r in rows:
        kind = r["layer"].rsplit(".", 1)[-1]
        train = [t for t in rows if t["layer"].endswith(kind) and _block(t["layer"]) != _block(r["layer"])]
        factor = math.exp(sum(math.log(t["kl"] / t["proxy"]) for t in train) / len(train)) if train else 1.0
        out.append(r["proxy"] * factor)
    return out


def _spearman(args) -> None:
    with Store(args.sensitivity) as store:
        studies = store.studies()
        study = studies[-1]["study"]
        rows = [r for r in store.sensitivity(study) if r["kl"] is not None and r["proxy"]]
    print(f"study {study}: proxy (output error the option adds) against the measured KL with only that layer "
          "changed")
    print("(type-calibrated: the proxy times a per-layer-type factor fitted on the other blocks' measured layers)")
    print("| option | layers | Spearman | Spearman, type-calibrated | layer types |")
    print("|---|---|---|---|---|")
    for option in sorted({r["option"] for r in rows}):
        sel = [r for r in rows if r["option"] == option]
        rho = spearman([r["proxy"] for r in sel], [r["kl"] for r in sel])
        calibrated = spearman(_type_calibrated(sel), [r["kl"] for r in sel])
        print(f"| {option} | {len(sel)} | {rho:.3f} | {calibrated:.3f} | all |")
        for kind in sorted({r["layer"].rsplit(".", 1)[-1] for r in sel}):
            part = [r for r in sel if r["layer"].endswith(kind)]
            rho = spearman([r["proxy"] for r in part], [r["kl"] for r in part])
            print(f"| {option} | {len(part)} | {'n/a' if rho is None else f'{rho:.3f}'} | | {kind} |")
    if args.rows:
        for r in sorted(rows, key=lambda r: (r["option"], -r["kl"])):
            print(f"{r['option']} {r['layer']} proxy {r['proxy']:.5g} kl {r['kl']:.5g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import")
    imp.add_argument("--db", required=True)
    imp.add_argument("--model", default="smollm2-135m")
    imp.add_argument("--row", action="append", required=True, help="NAME=RESULTS_JSON:ROW:CHECKPOINT_FOLDER")
    table = sub.add_parser("table")
    table.add_argument("--db", required=True)
    sp = sub.add_parser("spearman")
    sp.add_argument("--sensitivity", required=True)
    sp.add_argument("--rows", action="store_true", help="also list every measured layer")
    args = parser.parse_args()
    {"import": _import, "table": _table, "spearman": _spearman}[args.command](args)


if __name__ == "__main__":
    main()
