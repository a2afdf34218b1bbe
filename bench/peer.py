"""What the benchmarks that run a peer tool share: its environment check, the P1 calibration windows handed to it,
and running processes side by side with their wall time and peak RSS.

A peer runs in its own virtual environment outside the repository (``python3 -m venv DIR && DIR/bin/pip install
torch==2.13.0 llmcompressor==0.14.0.1``); lmshrink draws the calibration windows and hands exactly those token ids to
the peer, so both calibrate on the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PEER_PYTHON = "/work/scratch/peers/llmc/bin/python"


def add_peer_arguments(parser, group_option: str, group_default: int) -> None:
    """The peer's options: its python, and the group size of its grid under ``group_option``."""
    parser.add_argument(group_option, type=int, default=group_default,
                        help="columns per group of the peer's grid (its observers need a divisor of every width)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                        help="the python of a virtual environment with llmcompressor installed")


def peer_ready(python: str) -> str | None:
    """None when ``python`` runs and imports llmcompressor, else why not."""
    if not Path(python).is_file():
        return f"{python} does not exist"
    probe = subprocess.run([python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"llmcompressor does not import there: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def draw_windows(args, path: Path) -> str:
    """Draw the calibration windows as `lmshrink compress` does (``args``: model, calib, nsamples, seqlen, seed,
    data_dir) and save their ids to ``path`` as ``input_ids``; returns the model's folder."""
    from safetensors.torch import save_file

    from lmshrink import load_model
    from lmshrink.data.sources import load_text
    from lmshrink.data.windows import calibration_windows

    loaded = load_model(args.model, progress=False)
    source = load_text(args.calib, "train", args.data_dir)
    windows = calibration_windows(loaded.tokenizer, source, args.nsamples, args.seqlen, args.seed,
                                  loaded.info.max_context)
    save_file({"input_ids": windows.input_ids.contiguous()}, str(path))
    return loaded.info.path


@dataclass
class Finished:
    """A process that ran to its end: its output, wall seconds and peak RSS in bytes (the kernel's ``wait4``)."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall: float
    peak_rss_bytes: int

    def check(self) -> Finished:
        if self.returncode != 0:
            sys.exit(f"failed: {' '.join(self.cmd)[:300]}\n{self.stderr[-4000:]}")
        return self

    def tagged(self, tag: str) -> dict:
        """The JSON the process printed on its last line starting with ``tag``."""
        line = next(line for line in self.stdout.splitlines()[::-1] if line.startswith(tag))
        return json.loads(line[len(tag):])


def run_together(commands: list[tuple[list[str], dict[str, str]]]) -> list[Finished]:
    """Start every ``(cmd, extra environment)`` at once and wait for all; one ``Finished`` each, in order.

    Each process is waited for on its own thread, so each wall time ends when that process ends.
    """
    results: list[Finished | None] = [None] * len(commands)

    def wait(i: int, proc: subprocess.Popen, out, err, started: float) -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        results[i] = Finished(commands[i][0], os.waitstatus_to_exitcode(status),
                              out.read().decode(errors="replace"), err.read().decode(errors="replace"), wall,
                              usage.ru_maxrss * 1024)

    files = []
    threads = []
    for i, (cmd, env) in enumerate(commands):
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        files += [out, err]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **env})
        threads.append(threading.Thread(target=wait, args=(i, proc, out, err, started)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for f in files:
        f.close()
    return results  # type: ignore[return-value]


def threads_env(threads: int) -> dict[str, str]:
    """The environment that holds a torch process to ``threads`` threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def mark_dequantize(folder: Path) -> None:
    """As lmshrink's own asymmetric checkpoints: transformers decodes a compressed-tensors folder's packed zero points
    only on its dequantizing route, so the peer's ``quantization_config`` gets ``"dequantize": true`` (the stored
    tensors are unchanged)."""
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["dequantize"] = True
    (folder / "config.json").write_text(json.dumps(config, indent=2))
