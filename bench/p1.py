"""What the P1 benchmarks share (quantize.py, prune.py, recover.py): options, and running lmshrink commands.

Each benchmark runs `lmshrink compress` and `lmshrink evaluate` in their own processes, so peak RSS is that
process's and the numbers are those of the checkpoints a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "lmshrink.cli"]


def add_p1_arguments(parser: argparse.ArgumentParser, recipes: str, recipes_help: str | None = None) -> None:
    """The protocol options (defaults = P1) and where to keep checkpoints and rows."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", default=recipes, help=recipes_help)
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--limit", type=int, default=40, help="evaluation windows per text set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("LMSHRINK_DATA", "../shared/data"))
    parser.add_argument("--workdir", help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def run_json(cmd: list[str]) -> dict:
    """Run an lmshrink command with --json; its record, or exit with its error output."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def evaluate_options(args) -> list[str]:
    """`lmshrink evaluate` options: perplexity on WikiText-2 test and the enwiki-sample eval split."""
    return ["--ppl", "wikitext2,enwiki-sample", "--seqlen", str(args.seqlen), "--limit", str(args.limit),
            "--data-dir", args.data_dir, "--json", "--quiet"]


def compress_options(args) -> list[str]:
    """`lmshrink compress` options: the calibration protocol."""
    return ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed",
            str(args.seed), "--data-dir", args.data_dir, "--overwrite", "--json", "--quiet"]
