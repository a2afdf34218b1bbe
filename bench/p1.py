"""What the P1 benchmarks share (quantize.py, prune.py, recover.py): options, and running lmshrink commands.

Each benchmark runs `lmshrink compress` and `lmshrink evaluate` in their own processes, so peak RSS is that
process's (see ``run_json`` for the one caveat) and the numbers are those of the checkpoints a user gets.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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
    parser.add_argument("--table-from", metavar="JSON",
                        help="print the table of the rows an earlier --json run saved (also a run cut short) and exit")


def run_json(cmd: list[str]) -> dict:
    """Run an lmshrink command with --json; its record, or exit with its error output.

    The record gets ``process_peak_rss_bytes``: the peak resident memory of that whole process (model loading,
    the work, and writing the output), from the kernel's accounting of the child (``wait4``). Linux carries the
    parent's peak over into a child's ``ru_maxrss`` at fork, so the figure is at least this script's own peak at the
    time: it stays far below the children's here (these scripts hold no model), but a parent that did would raise it.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    record = json.loads(stdout)
    record["process_peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return record


def evaluate_options(args) -> list[str]:
    """`lmshrink evaluate` options: perplexity on WikiText-2 test and the enwiki-sample eval split."""
    return ["--ppl", "wikitext2,enwiki-sample", "--seqlen", str(args.seqlen), "--limit", str(args.limit),
            "--data-dir", args.data_dir, "--json", "--quiet"]


def compress_options(args) -> list[str]:
    """`lmshrink compress` options: the calibration protocol."""
    return ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed",
            str(args.seed), "--data-dir", args.data_dir, "--overwrite", "--json", "--quiet"]


def protocol_of(args) -> dict:
    """The options a row's numbers depend on, stored in every row written (``stamp``) and checked on reuse."""
    return {"model": args.model, "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "limit": args.limit, "seed": args.seed, "commit": _commit()}


@functools.lru_cache(maxsize=1)
def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def stamp(args, rows: list[dict]) -> list[dict]:
    """``rows`` with each row not yet stamped given this run's ``protocol`` (reused rows keep theirs)."""
    protocol = protocol_of(args)
    for row in rows:
        row.setdefault("protocol", protocol)
    return rows


def keep_row(args, rows: list[dict], name: str) -> None:
    """Report the row just appended to ``rows`` on stderr and keep every row in --json, so a run cut short keeps them."""
    stamp(args, rows)
    print(f"done {name}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


# what each kind of reused row depends on: the dense model's evaluation, or a compressed model's whole protocol
DENSE_KEYS = ("model", "seqlen", "limit")
RECIPE_KEYS = ("model", "calib", "nsamples", "seqlen", "limit", "seed")


def check_reused(parser: argparse.ArgumentParser, args, row: dict, source: str, keys=RECIPE_KEYS) -> str:
    """Refuse a reused row whose recorded protocol differs from this run's on ``keys``; returns the row's ``reused``
    mark (which says when the row records no protocol: files written before rows were stamped)."""
    recorded = row.get("protocol")
    if recorded is None:
        print(f"warning: {source}: row {row['recipe']!r} records no protocol (written before rows were stamped); "
              "it is reused on trust", file=sys.stderr)
        return f"{source} (protocol not recorded)"
    current = protocol_of(args)
    differ = {k: (recorded.get(k), current[k]) for k in keys if recorded.get(k) != current[k]}
    if differ:
        parser.error(f"{source}: row {row['recipe']!r} was measured with other options "
                     f"({', '.join(f'{k} {a!r} there, {b!r} here' for k, (a, b) in differ.items())}); "
                     "run without reusing it")
    return source


def protocol_line(args) -> str:
    """The protocol of a run: "P1: ..." with the P1 defaults, "not P1 (changed settings): ..." otherwise."""
    p1 = (args.model, args.calib, args.nsamples, args.seqlen, args.limit, args.seed) == ("smollm2-135m", "c4", 64, 512,
                                                                                          40, 0)
    return (f"{'P1' if p1 else 'not P1 (changed settings)'}: {args.model}; calibration {args.nsamples} x "
            f"{args.seqlen} tokens of {args.calib} (seed {args.seed}); evaluation first {args.limit} windows x "
            f"{args.seqlen} of WikiText-2 test and enwiki-sample eval")


def print_saved_table(args, print_table) -> bool:
    """With --table-from, print that file's rows with ``print_table`` and return True."""
    if not args.table_from:
        return False
    print(f"rows saved in {args.table_from} (the protocol is the one that run was given)")
    print_table(json.loads(Path(args.table_from).read_text()))
    return True


def add_reuse_dense_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reuse-dense", metavar="JSON", help="take the dense row from an earlier --json run with the "
                        "same P1 options instead of evaluating the base model again (the row is marked 'reused')")


def reused_dense_row(parser: argparse.ArgumentParser, args) -> dict | None:
    """The 'dense fp32' row of ``--reuse-dense JSON`` (marked with ``reused``), or None without that option."""
    if not args.reuse_dense:
        return None
    earlier = {r["recipe"]: r for r in json.loads(Path(args.reuse_dense).read_text())}
    if "dense fp32" not in earlier:
        parser.error(f"--reuse-dense {args.reuse_dense}: no 'dense fp32' row in it")
    row = earlier["dense fp32"]
    return {**row, "reused": check_reused(parser, args, row, args.reuse_dense, DENSE_KEYS)}


def dense_row(parser: argparse.ArgumentParser, args, evaluate: list[str], fields=lambda record: {}
              ) -> tuple[dict, dict | None]:
    """The 'dense fp32' row and the environment of its evaluation: the ``--reuse-dense`` row (environment None),
    else the dense model evaluated now with ``evaluate``: its two perplexities, KL 0, and ``fields(record)``."""
    reused = reused_dense_row(parser, args)
    if reused is not None:
        return reused, None
    dense = run_json(CLI + ["evaluate", args.model] + evaluate)
    return ({"recipe": "dense fp32", "wikitext2": dense["perplexity"][0]["ppl"], "enwiki": dense["perplexity"][1]["ppl"],
             "kl": 0.0, **fields(dense)}, dense["environment"])


def compress_and_evaluate(args, recipe: str, work: Path, evaluate: list[str]) -> tuple[Path, dict, dict]:
    """Compress ``recipe`` (a preset name or a YAML file) into a folder of ``work`` named after it, then evaluate the
    saved folder against the base model with ``evaluate``: (the folder, the compress record, the evaluation)."""
    out = work / Path(recipe).stem.replace(":", "-").replace("+", "-")
    record = run_json(CLI + ["compress", args.model, "--recipe", recipe, "-o", str(out)] + compress_options(args))
    result = run_json(CLI + ["evaluate", str(out), "--kl-base", args.model] + evaluate)
    return out, record, result
