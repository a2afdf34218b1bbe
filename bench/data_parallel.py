"""Data-parallel calibration on one 2-core machine: 1 rank x 2 threads against 2 ranks x 1 thread (gloo), protocol P1.

    /work/scratch/cpu-slot /work/scratch/cpu-slot python bench/data_parallel.py --data-dir ../shared/data \\
        --json bench/results/scale/data_parallel_p1_w4g128.json

Compresses SmolLM2-135M with one recipe (w4g128 by default) three times, one run after the other: `lmshrink
compress ... --threads 2` in one process, `torchrun --standalone --nproc-per-node 2 -m lmshrink compress ...
--threads 1` (two gloo ranks of one thread each), and `lmshrink compress ... --threads 1` (the single-process run
with the ranks' thread count, which the 2-rank run must equal); P1 calibration (64 windows x 512 tokens of C4,
seed 0). For each: the wall time of the engine and of the whole process, the engine's wall seconds by part on each
rank (forwards: the calibration windows through the blocks; solves; exchange: waiting for and moving data between
ranks), the peak RSS of each rank, and P1's evaluation of the saved folder (`lmshrink evaluate --kl-base`, 40
windows of WikiText-2 test and enwiki-sample eval, 2 threads). Then compares the folders tensor by tensor and code
by code. Run it when nothing else runs (hold both cpu-slot slots): the first two runs use both cores. The busiest
other processes at the start and the end are kept in the JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from p1 import CLI, add_p1_arguments, compress_options, evaluate_options, protocol_line, run_json  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "lmshrink.cli"]


def compare(a: Path, b: Path) -> dict:
    """Tensors of two folders: how many are identical, and for packed codes how many codes differ."""
    from safetensors import safe_open

    from lmshrink.core.packing import unpack_int32

    same = differ = codes = changed = 0
    for path in sorted(a.glob("*.safetensors")):
        with safe_open(str(path), "pt") as x, safe_open(str(b / path.name), "pt") as y:
            for key in x.keys():
                left, right = x.get_tensor(key), y.get_tensor(key)
                if torch.equal(left, right):
                    same += 1
                else:
                    differ += 1
                if key.endswith("weight_packed"):
                    u, v = unpack_int32(left, 4, left.shape[1] * 8), unpack_int32(right, 4, right.shape[1] * 8)
                    codes += u.numel()
                    changed += int((u != v).sum())
    return {"identical_tensors": same, "different_tensors": differ, "codes": codes, "codes_differing": changed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, recipes="w4g128")
    args = parser.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmshrink-dp-"))
    rows = []
    recipe = args.recipes.split(",")[0]
    others = [_busiest()]
    for label, launcher, threads in (("1 rank x 2 threads", CLI, 2), ("2 ranks x 1 thread", TORCHRUN, 1),
                                     ("1 rank x 1 thread", CLI, 1)):
        out = work / label.replace(" ", "")
        cmd = [*launcher, "compress", args.model, "--recipe", recipe, "-o", str(out), "--threads", str(threads),
               *compress_options(args)]
        started = time.perf_counter()
        record = run_json(cmd)
        wall = time.perf_counter() - started
        evaluation = run_json([*CLI, "evaluate", str(out), "--kl-base", args.model, "--threads", "2",
                               *evaluate_options(args)])
        summary = record["summary"]
        ppl = {"wikitext2": evaluation["perplexity"][0]["ppl"], "enwiki-sample": evaluation["perplexity"][1]["ppl"]}
        rows.append({"run": label, "engine_seconds": round(summary["seconds"], 1), "process_seconds": round(wall, 1),
                     "process_peak_rss_gib": round(record["process_peak_rss_bytes"] / 2**30, 3),
                     "seconds_by_part_per_rank": summary["seconds_by_part_per_rank"],
                     "peak_rss_gib_per_rank": [round(p / 2**30, 3) for p in summary["peak_rss_bytes_per_rank"]],
                     "perplexity": ppl, "kl": evaluation["kl"]["kl_mean"], "command": " ".join(cmd[2:]),
                     "folder": str(out)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"protocol": protocol_line(args), "rows": rows}, indent=1))
    others.append(_busiest())
    folders = {r["run"]: Path(r["folder"]) for r in rows}
    comparison = {f"{a} vs {b}": compare(folders[a], folders[b]) for a, b in (
        ("2 ranks x 1 thread", "1 rank x 1 thread"), ("1 rank x 2 threads", "1 rank x 1 thread"),
        ("1 rank x 2 threads", "2 ranks x 1 thread"))}
    print(protocol_line(args) + f"; recipe {recipe}")
    print("| run | engine s | forwards s (per rank) | solves s (per rank) | exchange s (per rank) | peak RSS GiB (per rank) "
          "| wikitext2 ppl | enwiki-sample ppl | KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        parts = r["seconds_by_part_per_rank"]
        per = lambda key: " / ".join(f"{p[key]:.0f}" for p in parts)  # noqa: E731
        ppl = r["perplexity"]
        print(f"| {r['run']} | {r['engine_seconds']:.0f} | {per('forwards')} | {per('solves')} | {per('exchange')} | "
              f"{' / '.join(f'{p:.2f}' for p in r['peak_rss_gib_per_rank'])} | {ppl['wikitext2']:.3f} | "
              f"{ppl['enwiki-sample']:.3f} | {r['kl']:.4f} |")
    for pair, result in comparison.items():
        print(f"{pair}: {result}")
    if args.json:
        Path(args.json).write_text(json.dumps({"protocol": protocol_line(args), "recipe": recipe, "rows": rows,
                                               "comparison": comparison, "busiest_other_processes": others},
                                              indent=1))


def _busiest() -> list[str]:
    """The ten busiest processes by CPU share, as ``ps`` lists them (what else was running)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True)
    return [line[:200] for line in out.stdout.splitlines()[:11]]


if __name__ == "__main__":
    main()
