"""Where one `lmshrink compress` run spends its time and memory: engine parts, and peak RSS by phase.

    OMP_NUM_THREADS=1 python bench/compress_profile.py --data-dir ../shared/data --recipe w4g128
    OMP_NUM_THREADS=1 python bench/compress_profile.py --data-dir ../shared/data --recipe w4g128 --cprofile top.txt

Runs `lmshrink.compress` in this process (P1 calibration: C4 excerpt, 64 x 512 tokens, seed 0; output to a temporary
folder) while a thread samples the process's resident memory every 20 ms, each sample labelled with the phase the
run is in: "load" (before the engine), the engine's timed parts ("forwards": windows through blocks, with the
statistics their hooks accumulate; "block_stages"; "checkpoint"), "engine other" (the rest of the engine: the layer
solves, and the work between parts), and "write" (after the engine: the checkpoint written, the record made).
Prints the engine's seconds by part (the record's ``seconds_by_part_per_rank``) and the peak RSS of each phase.
--cprofile also writes cProfile's 40 functions with the most own time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import lmshrink.engine.loop as loop
from lmshrink import compress

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w4g128")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data-dir", default=os.environ.get("LMSHRINK_DATA", "../shared/data"))
    parser.add_argument("--cprofile", metavar="TXT", help="also profile with cProfile and write the top functions here")
    parser.add_argument("--json", help="write the phases' peaks and the parts here")
    args = parser.parse_args()

    phase = ["load"]
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            label, rss = phase[-1], _rss()
            peaks[label] = max(peaks.get(label, 0), rss)
            time.sleep(0.02)

    original_timed, original_run = loop.Engine._timed, loop.Engine.run

    @contextlib.contextmanager
    def timed(self, part):
        phase.append(part)
        try:
            with original_timed(self, part):
                yield
        finally:
            phase.pop()

    def run(self):
        phase.append("engine other")
        try:
            return original_run(self)
        finally:
            phase[:] = ["write"]

    loop.Engine._timed, loop.Engine.run = timed, run
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        record = compress(args.model, args.recipe, output=Path(tmp) / "out", calibration="c4",
                          nsamples=args.nsamples, seqlen=args.seqlen, seed=0, data_dir=args.data_dir, progress=False)
    wall = time.perf_counter() - started
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        Path(args.cprofile).write_text(text.getvalue())
    done.set()
    sampler.join()
    summary = record["summary"]
    parts = summary["seconds_by_part_per_rank"][0]
    import torch

    print(f"{args.model}, recipe {args.recipe}, calibration {args.nsamples} x {args.seqlen} tokens of C4 (seed 0), "
          f"{torch.get_num_threads()} thread(s); whole run {wall:.0f} s, engine {summary['seconds']:.0f} s")
    print("| engine part | seconds | share of the engine |")
    print("|---|---|---|")
    rest = summary["seconds"] - sum(parts.values())
    for name, seconds in [*parts.items(), ("other (between parts)", rest)]:
        if seconds:
            print(f"| {name} | {seconds:.0f} | {seconds / summary['seconds']:.0%} |")
    print("| phase | peak RSS GiB |")
    print("|---|---|")
    for name, peak in peaks.items():
        print(f"| {name} | {peak / 2**30:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"parts": parts, "engine_seconds": summary["seconds"], "wall": wall,
                                               "peak_rss_by_phase": peaks}, indent=1))


if __name__ == "__main__":
    main()
