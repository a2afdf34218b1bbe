"""Sweeps into the results store (resumable, never repeating finished runs) and the HTML report (built from a
fixture store; rendered in headless Chromium when it is installed)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import save_tiny_llama, write_calibration_text

from lmshrink.cli import main
from lmshrink.core.store import Store
from lmshrink.report.html import build_report, pareto_front, spearman, write_report

_FAKE_SWEEP = """
import json, sys, time
from pathlib import Path
from lmshrink.pipeline.sweep import Sweep

class Fake(Sweep):
    def _execute(self, run):
        log = Path(sys.argv[2])
        with log.open("a") as f:
            f.write(run["name"] + "\\n")
        time.sleep(float(sys.argv[3]))
        return {"fake": run["name"]}, {"stored_bytes": 1000.0 + len(run["name"]), "kl": 0.1}

outcome = Fake("some-model", ["w4g128", "w3g128", "rtn-w4g128", "dense"], sys.argv[1], workers=1, threads=1,
               progress=False).run()
print(json.dumps(outcome))
"""


def _fake_sweep(db, log, seconds):
    return subprocess.Popen([sys.executable, "-c", _FAKE_SWEEP, str(db), str(log), str(seconds)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_killed_sweep_resumes_without_repeating_finished_runs(tmp_path):
    db, log = tmp_path / "runs.sqlite", tmp_path / "executed.txt"
    proc = _fake_sweep(db, log, 0.5)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once a run is stored and the next one is under way
        if db.exists() and log.exists() and len(log.read_text().split()) >= 2:
            with Store(db) as store:
                if store.runs("done"):
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Store(db) as store:
        done_before = {r["name"]: r["finished"] for r in store.runs("done")}
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert 1 <= len(done_before) < 4
    executed_before = log.read_text().split()
    again = _fake_sweep(db, log, 0.0)
    outcome = json.loads(again.communicate(timeout=120)[0])
    assert outcome["already_done"] == len(done_before) and outcome["ran"] == 4 - len(done_before)
    executed = log.read_text().split()
    for name in done_before:  # a finished run ran exactly once
        assert executed.count(name) == 1
    assert set(executed) == {"w4g128", "w3g128", "rtn-w4g128", "dense"}
    assert len(executed) - len(executed_before) == 4 - len(done_before)
    with Store(db) as store:
        runs = {r["name"]: r for r in store.runs()}
    assert all(r["status"] == "done" for r in runs.values())
    assert all(runs[n]["finished"] == t for n, t in done_before.items())
    assert runs["w3g128"]["metrics"] == {"stored_bytes": 1006.0, "kl": 0.1}
    # a third sweep has nothing to do
    third = _fake_sweep(db, log, 0.0)
    assert json.loads(third.communicate(timeout=120)[0]) == {"already_done": 4, "ran": 0, "failed": 0}


def test_sweep_compresses_evaluates_and_stores_full_records(tmp_path):
    text = write_calibration_text(tmp_path / "calib.txt")
    model = save_tiny_llama(tmp_path / "model", hidden_size=64, intermediate_size=128)
    db = tmp_path / "runs.sqlite"
    args = ["sweep", str(model), "--recipes", "rtn-w4g32", "--db", str(db), "--calib", f"file:{text}",
            "--nsamples", "2", "--seqlen", "32", "--ppl", f"file:{text}", "--limit", "2", "--threads", "1", "--quiet"]
    assert main(args) == 0
    with Store(db) as store:
        runs = {r["name"]: r for r in store.runs()}
    assert set(runs) == {"rtn-w4g32"}
    rtn = runs["rtn-w4g32"]
    assert rtn["status"] == "done" and rtn["kind"] == "preset"
    assert rtn["record"]["compress"]["recipe"]["stages"][0]["method"] == "rtn"
    # loaded back by transformers the weights are decoded to float32: more bytes in memory than stored
    assert rtn["metrics"]["stored_bytes"] < rtn["record"]["evaluate"]["size"]["weight_bytes"]
    # 4-bit codes, a float32 scale per 32 weights, 4-bit zero points packed along the rows
    assert rtn["metrics"]["kl"] > 0 and rtn["metrics"]["packed_bits_per_weight"] == pytest.approx(4 + 1 + 4 / 32)
    assert any(k.startswith("ppl.") for k in rtn["metrics"])
    assert main(args) == 0  # again: nothing runs
    with Store(db) as store:
        assert {r["name"]: r["finished"] for r in store.runs()} == {n: r["finished"] for n, r in runs.items()}


def _fixture_store(path: Path) -> Path:
    """A results store with hand-written runs (presets, plans, dense) and a small sensitivity study."""
    with Store(path) as store:
        rows = [("dense", "dense", 540.0, 28.7, 16.6, 0.0, 30.0), ("w4g128", "preset", 165.0, 33.1, 18.6, 0.14, 40.0),
                ("w3g128", "preset", 150.0, 51.0, 26.5, 0.57, 42.0), ("plan-3.75", "plan", 152.0, 40.0, 21.0, 0.3, 41.0),
                ("plan-4.15", "plan", 158.0, 35.0, 19.0, 0.2, 40.5)]
        layers = [f"model.layers.{b}.{k}" for b in range(3) for k in ("self_attn.q_proj", "mlp.down_proj")]
        for name, kind, mb, wiki, enwiki, kl, speed in rows:
            run = store.add_run(name, "smollm2-135m", name, kind, {"stages": []}, 0, {"ppl": "wikitext2"})
            record = {"plan": {"layers": [{"layer": l, "option": "w3g192-sym" if i % 2 else "w4g192-sym"}
                                          for i, l in enumerate(layers)]}} if kind == "plan" else {}
            store.finish_run(run, record, {"stored_bytes": mb * 1e6, "ppl.wikitext2": wiki, "ppl.enwiki-sample": enwiki,
                                           "kl": kl, "decode_tokens_per_s": speed})
        store.add_study("s1", "smollm2-135m", {"study": "s1"})
        store.put_sensitivity("s1", [{"layer": l, "option": o, "proxy": (i + 1) * (3 if o == "w3g192-sym" else 1),
                                      "kl": (i + 1) * 0.001 if o == "w3g192-sym" else None}
                                     for i, l in enumerate(layers) for o in ("w3g192-sym", "w4g192-sym")])
    return path


def test_pareto_front_and_spearman():
    points = [(1, 5), (2, 4), (3, 4.5), (4, 1), (5, 2)]
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front([(30, 3), (40, 4), (35, 6)], higher_x_better=True) == [1, 0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_report_is_built_from_a_fixture_store(tmp_path):
    db = _fixture_store(tmp_path / "runs.sqlite")
    text = build_report(db)
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    # stored size x 3 quality metrics, speed x 3, one plan map per plan, proxy-vs-KL scatter + 2 heat maps
    assert text.count("<svg") == 3 + 3 + 2 + 3
    for name in ("w4g128", "w3g128", "plan-3.75", "plan-4.15", "dense"):
        assert f">{name}<" in text  # the table of runs
    assert "Spearman 1.000 over 6 layers" in text
    # nothing to fetch: no script, stylesheet or image from elsewhere (SVG namespace names are not fetched)
    assert not re.search(r"(src|href)\s*=\s*[\"']https?:", text) and "<script" not in text and "<link" not in text
    assert main(["report", str(db), "-o", str(tmp_path / "r.html")]) == 0


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    page = write_report(_fixture_store(tmp_path / "runs.sqlite"), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1400,1800",
           f"--screenshot={shot}", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file()
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000

    def share(colour):  # fraction of pixels within a small distance of an RGB colour
        target = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return float((np.abs(pixels - target).max(-1) < 0.06).mean())

    assert share("#ffffff") < 0.97  # not a blank page
    assert share("#d62728") > 1e-5 and share("#1f77b4") > 1e-5  # the plan and preset markers were drawn
    # the Pareto plots occupy the top of the page: that band is far from blank
    top = pixels[150:600]
    assert float((np.abs(top - 1.0).max(-1) > 0.1).mean()) > 0.03
