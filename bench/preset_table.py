"""The README's preset table, from the P1 results files that bench/results/presets.json names for each preset.

    python bench/preset_table.py             # the markdown table the README shows
    python bench/preset_table.py --sources   # which file and row each line comes from (docs/benchmarks.md)

To refresh the table after re-running the benchmarks: point each preset's "file" (and "row" where the row is not
named after the preset) in bench/results/presets.json at the new results, run this, paste the output.
A row whose file records a protocol other than P1 stops the script; rows written before the benchmarks recorded
their protocol are printed, with a warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
P1 = {"model": "smollm2-135m", "calib": "c4", "nsamples": 64, "seqlen": 512, "limit": 40, "seed": 0}


def load_row(entry: dict) -> dict | None:
    """The row of ``entry["file"]`` named ``entry["row"]`` (default: the preset name); None for an unmeasured preset."""
    if entry.get("file") is None:
        return None
    path = RESULTS / entry["file"]
    name = entry.get("row", entry["preset"])
    rows = {r["recipe"]: r for r in json.loads(path.read_text())}
    if name not in rows:
        sys.exit(f"{path}: no row {name!r} (rows: {', '.join(rows)})")
    row = rows[name]
    protocol = row.get("protocol")
    if protocol is None:
        print(f"warning: {entry['file']}: row {name!r} records no protocol (written before rows were stamped); "
              "its file's header states it", file=sys.stderr)
    else:
        differ = {k: protocol.get(k) for k in P1 if protocol.get(k) != P1[k]}
        if differ:
            sys.exit(f"{entry['file']}: row {name!r} is not P1 ({differ})")
    return row


def _cells(entry: dict, row: dict | None) -> list[str]:
    command = entry["command"]
    command = command if "`" in command else f"`{command}`"  # a command written as prose keeps its own quoting
    if entry.get("threads", 1) != 1:
        command += f" with OMP_NUM_THREADS={entry['threads']}"
    preset = entry["preset"] + (" \\*" if entry.get("earlier_setup") else "")
    if row is None:
        return [preset, entry["what"], "not measured on P1", "", "", "", "", command]
    seconds, rss = "", ""
    if row.get("recover_seconds") is not None:
        seconds = f"{row['recover_seconds']:.0f} (recovery)"
    elif row.get("seconds") is not None:
        seconds = f"{row['seconds']:.0f}"
    if row.get("peak_rss_gib") is not None:
        rss = f"{row['peak_rss_gib']:.2f}"
    elif (row.get("memory") or {}).get("peak_rss_bytes") is not None:
        rss = f"{row['memory']['peak_rss_bytes'] / 2**30:.2f}"
    return [preset, entry["what"], f"{row['wikitext2']:.3f}", f"{row['enwiki']:.3f}", f"{row['kl']:.4f}",
            seconds, rss, command]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=RESULTS / "presets.json")
    parser.add_argument("--sources", action="store_true", help="print where each row comes from instead")
    args = parser.parse_args()
    entries = json.loads(args.index.read_text())["rows"]
    if args.sources:
        print("| preset | results file (bench/results/) | row | protocol recorded in the row |")
        print("|---|---|---|---|")
        for entry in entries:
            row = load_row(entry)
            if row is None:
                print(f"| {entry['preset']} | not measured on P1 (reproduce: `{entry['command']}`) | | |")
                continue
            print(f"| {entry['preset']} | `{entry['file']}` | {entry.get('row', entry['preset'])} "
                  f"| {'yes' if row.get('protocol') else 'no (see the file header)'} |")
        return
    print("| preset | what it does | WikiText-2 ppl | enwiki-sample ppl | KL | compress s | peak RSS GiB | reproduce |")
    print("|---|---|---|---|---|---|---|---|")
    unmeasured = []
    for entry in entries:
        row = load_row(entry)
        if row is None:  # listed after the table: a row of empty cells says nothing
            unmeasured.append(entry["preset"])
            continue
        print("| " + " | ".join(_cells(entry, row)) + " |")
    if unmeasured:
        print(f"\nNot yet measured on P1: {', '.join(unmeasured)} (`bench/preset_table.py --sources`).")


if __name__ == "__main__":
    main()
