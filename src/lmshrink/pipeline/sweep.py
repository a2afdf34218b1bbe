"""Sweeps: many recipes (and seeds) over one model, each run a full record in a results store (``core.store``).

Each run is ``lmshrink compress`` then ``lmshrink evaluate`` (and, on request, ``lmshrink bench``), each in its
own process, so a run's numbers are those of the checkpoint a user gets and a crash in one run does not end the
sweep. Worker threads hand runs to these processes; every process gets ``threads`` torch threads (the sweep's
``workers * threads`` should not exceed the machine's cores). A run's identity is a digest of the model, the
recipe, the seed and the protocol: a run already done in the store is never run again, a run that was under way
when the sweep was killed starts again (its compression continues from its last finished block, ``--resume``),
and its result is stored in one transaction when it ends. Children die with the sweep (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.store import Store
from lmshrink.core.version import __version__
from lmshrink.pipeline.plan import plan_record_for
from lmshrink.pipeline.presets import PRESETS
from lmshrink.pipeline.recipe import load_recipe

CLI = [sys.executable, "-m", "lmshrink.cli"]
DENSE = "dense"  # the recipe name of the uncompressed model's run (evaluated, not compressed)
_PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the sweep process dies, so no orphan keeps working."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def default_workers(threads: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for this machine: one thread each on every core the process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = os.environ.get("OMP_NUM_THREADS")
    if limit and limit.isdigit():
        cores = min(cores, int(limit))
    threads = threads or 1
    return max(1, cores // threads), threads


def stored_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the tensors a checkpoint folder stores (from the safetensors headers): all of them, and the
    packed ones (codes, scales, zero points)."""
    total = packed = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            total += nbytes
            if key.rsplit(".", 1)[-1] in _PACKED:
                packed += nbytes
    return {"stored_bytes": total, "packed_bytes": packed}


def _run_json(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    with log.open("ab") as err:
        err.write(f"\n$ {' '.join(cmd)}\n".encode())
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, env=env, preexec_fn=_die_with_parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])}... exited with {proc.returncode}; see {log}")
    return json.loads(proc.stdout)


class Sweep:
    """The runs of one sweep over ``model``: ``recipes`` (preset names or YAML files; ``dense`` for the
    uncompressed model) times ``seeds``."""

    def __init__(self, model: str, recipes: list[str], db: str | Path, *, seeds: list[int] = (0,),
                 workdir: str | Path | None = None, workers: int | None = None, threads: int | None = None,
                 calibration: str | None = None, nsamples: int = 128, seqlen: int = 512, ppl: str = "enwiki-sample",
                 limit: int | None = None, kl: bool = True, bench: bool = False, bench_options: list[str] = (),
                 data_dir: str | None = None, keep: bool = True, progress: bool = True):
        self.model = model
        self.db_path = Path(db)
        self.workdir = Path(workdir) if workdir else self.db_path.with_suffix(".runs")
        default = default_workers(threads)
        self.workers = workers or default[0]
        self.threads = threads or default[1]
        self.progress = progress
        self.keep = keep
        self.data_dir = data_dir
        self.protocol = {"calibration": calibration or "enwiki-sample", "nsamples": nsamples, "seqlen": seqlen,
                         "ppl": ppl, "limit": limit, "kl": kl, "bench": bench, "bench_options": list(bench_options)}
        self.runs: list[dict[str, Any]] = []
        for spec in recipes:
            if spec == DENSE:
                self.runs.append(self._describe(DENSE, DENSE, None, None, None))
                continue
            recipe = load_recipe(spec)  # a bad recipe fails before any run
            plan = plan_record_for(spec) if spec not in PRESETS else None
            kind = "plan" if plan else ("preset" if spec in PRESETS else "recipe")
            for seed in seeds:
                self.runs.append(self._describe(recipe.name, kind, recipe.to_dict(), seed, plan))

    def _describe(self, name, kind, recipe, seed, plan) -> dict[str, Any]:
        identity = json.dumps([self.model, recipe, seed, self.protocol, __version__], sort_keys=True, default=str)
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        label = name if seed in (None, 0) else f"{name}@seed{seed}"
        return {"key": key, "name": label, "kind": kind, "recipe": recipe, "seed": seed, "plan": plan}

    def run(self) -> dict[str, Any]:
        """Run every run not done yet; returns counts (done before, run now, failed)."""
        with Store(self.db_path) as store:
            ids = {r["key"]: store.add_run(r["key"], self.model, r["name"], r["kind"], r["recipe"], r["seed"],
                                           self.protocol) for r in self.runs}
            done = {row["key"] for row in store.runs("done")}
        todo = [r for r in self.runs if r["key"] not in done]
        queue = list(todo)
        lock = threading.Lock()
        outcome = {"already_done": len(self.runs) - len(todo), "ran": 0, "failed": 0}

        def worker(number: int) -> None:
            with Store(self.db_path) as store:
                while True:
                    with lock:
                        if not queue:
                            return
                        run = queue.pop(0)
                    run_id = ids[run["key"]]
                    if not store.claim_run(run_id, f"{os.getpid()}/{number}"):
                        continue
                    self._log(f"sweep: run {run['name']} (worker {number})")
                    try:
                        record, metrics = self._execute(run)
                    except Exception as exc:  # one failed run does not end the sweep
                        store.fail_run(run_id, f"{type(exc).__name__}: {exc}")
                        self._log(f"sweep: run {run['name']} failed: {exc}")
                        with lock:
                            outcome["failed"] += 1
                        continue
                    store.finish_run(run_id, record, metrics)
                    with lock:
                        outcome["ran"] += 1
                    self._log(f"sweep: run {run['name']} done")

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(min(self.workers, len(todo)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outcome

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def _execute(self, run: dict[str, Any]) -> tuple[dict, dict[str, float | None]]:
        folder = self.workdir / f"{run['name'].replace('/', '_').replace(':', '-')}-{run['key']}"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "log.txt"
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        common = ["--threads", str(self.threads), "--quiet"] + (["--data-dir", self.data_dir] if self.data_dir else [])
        p = self.protocol
        record: dict[str, Any] = {"run": {k: v for k, v in run.items() if k != "plan"}, "protocol": p}
        metrics: dict[str, float | None] = {}
        if run["kind"] == DENSE:
            target = self.model
        else:
            target = str(folder / "out")
            finished = (folder / "out" / "lmshrink.json").is_file()
            if not finished:
                recipe_file = folder / "recipe.yaml"
                recipe_file.write_text(json.dumps(run["recipe"]))
                cmd = CLI + ["compress", self.model, "--recipe", str(recipe_file), "-o", target, "--calib",
                             p["calibration"], "--nsamples", str(p["nsamples"]), "--seqlen", str(p["seqlen"]),
                             "--seed", str(run["seed"] or 0), "--json"] + common
                if (folder / "out.partial").exists():
                    cmd.append("--resume")  # a run killed mid-compression continues from its last block
                compressed = _run_json(cmd, env, log)
                compressed.pop("layers_detail", None)
            else:
                compressed = json.loads((folder / "out" / "lmshrink.json").read_text())
            record["compress"] = compressed
            summary = compressed.get("summary", {})
            metrics.update(compress_seconds=summary.get("seconds"), compress_cpu_seconds=summary.get("cpu_seconds"),
                           compress_peak_rss_bytes=summary.get("peak_rss_bytes"))
            sizes = stored_bytes(Path(target))
            metrics.update(sizes)
            weights = sum(layer["out_features"] * layer["in_features"] for layer in compressed.get("layers", []))
            if weights:
                metrics["packed_bits_per_weight"] = 8 * sizes["packed_bytes"] / weights
            if run["plan"]:
                record["plan"] = run["plan"]
                metrics["predicted_stored_bytes"] = run["plan"]["predicted_stored_bytes"]
        evaluate = CLI + ["evaluate", target, "--ppl", p["ppl"], "--seqlen", str(p["seqlen"]), "--json"] + common
        if p["limit"]:
            evaluate += ["--limit", str(p["limit"])]
        if p["kl"]:
            evaluate += ["--kl-base", self.model]
        evaluated = _run_json(evaluate, env, log)
        record["evaluate"] = evaluated
        for entry in evaluated.get("perplexity", []):
            metrics[f"ppl.{entry['protocol']['dataset']}"] = entry["ppl"]
        if "kl" in evaluated:
            metrics["kl"] = evaluated["kl"]["kl_mean"]
            metrics["top1_agreement"] = evaluated["kl"]["top1_agreement"]
        if run["kind"] == DENSE:
            metrics["stored_bytes"] = _dense_bytes(evaluated)
        if p["bench"]:
            benched = _run_json(CLI + ["bench", target, "--threads", str(self.threads), "--decode", "fast",
                                       "--json", "--quiet"] + list(p["bench_options"]), env, log)
            record["bench"] = benched
            row = benched["models"][0]
            metrics.update(decode_tokens_per_s=row["decode_tokens_per_s"], prefill_tokens_per_s=row[
                "prefill_tokens_per_s"])
        if not self.keep and run["kind"] != DENSE:
            import shutil

            shutil.rmtree(folder / "out", ignore_errors=True)
        record["finished"] = time.time()
        return record, metrics


def _dense_bytes(evaluated: dict) -> int | None:
    size = evaluated.get("size") or {}
    return size.get("weight_bytes")


def sweep(model: str, recipes: list[str], db: str | Path, **options) -> dict[str, Any]:
    """Run ``recipes`` over ``model`` into the results store ``db`` (see ``Sweep``)."""
    if not recipes:
        raise LmshrinkError("no recipes to sweep", fix="pass --recipes A,B,C (presets, YAML files, or dense)")
    return Sweep(model, recipes, db, **options).run()
