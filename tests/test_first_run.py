"""What a new user meets first (issue 21): the README's two commands, arguments refused before anything loads (and
without torch), hub ids that fail at once, sizes on disk, readable tables at 80 columns, no silent loss of
progress, the true peak memory, umask permissions, an empty text file, and the objective each stage used."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import folder_digest, save_tiny_llama, write_calibration_text

from lmshrink import compress
from lmshrink.cli import build_parser, main
from lmshrink.core.errors import DataSourceError, LmshrinkError
from lmshrink.methods.stage_base import FP_TARGET_OBJECTIVE, LOCAL_OBJECTIVE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture
def columns80(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _compress_args(source, calib_file, out, recipe="rtn-w4g32", *extra):
    return ["compress", source, "--recipe", recipe, "--calib", f"file:{calib_file}", "--nsamples", "2",
            "--seqlen", "32", "-o", out, "--quiet", *extra]


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _wide_lines(text: str, skip: str) -> list[str]:
    """Lines longer than 80 columns, except those holding ``skip`` (a temporary path cannot be shortened)."""
    return [line for line in text.splitlines() if len(line) > 80 and skip not in line]


# -- 1. the README's two commands ------------------------------------------------------------------------------------

def _bash_blocks(readme: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)


def test_readme_first_command_parses_and_ci_runs_exactly_the_second():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024
    first, second = _bash_blocks(readme)[:2]
    steps = [shlex.split(step) for step in first.split("&&")]
    verbs = [step for step in steps if step and step[0] == "lmshrink"]
    assert [v[1] for v in verbs] == ["compress", "evaluate"]
    compress_args = build_parser().parse_args(verbs[0][1:])
    assert compress_args.model == "smollm2-135m"  # the default packaged model
    assert build_parser().parse_args(verbs[1][1:]).model == compress_args.output
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == second.strip()


# -- 3. arguments: refused before anything loads, and without torch -------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--nsamples", "0"], "--nsamples 0: must be 1 or more"),
    (["--seqlen", "-5"], "--seqlen -5: must be 2 or more"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--dtype", "fp8"], "--dtype fp8"),
    (["--calib", "no-such-set"], "unknown text set 'no-such-set'"),
    (["--calib", "file:/no/such/file.txt"], "/no/such/file.txt does not exist"),
    (["--resume", "--restart"], "--resume and --restart both given"),
    (["--recipe", "no-such-preset"], "no-such-preset"),
])
def test_compress_arguments_are_refused_before_the_model_loads(capsys, monkeypatch, tmp_path, tiny_dir, calib_file,
                                                               extra, needle):
    import lmshrink.formats.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = _run(capsys, *_compress_args(tiny_dir, calib_file, tmp_path / "out"), *extra)
    assert code == 2 and err.startswith("lmshrink: error:") and "fix:" in err, err
    assert needle in err


@pytest.mark.parametrize("extra, needle", [
    (["--limit", "0"], "--limit 0: must be 1 or more"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--seqlen", "1"], "--seqlen 1"),
    (["--ppl", "wikitext2", "--split", "nope"], "no split 'nope'"),
    (["--tasks", "nope"], "unknown task(s): nope"),
    (["--kl-base", "./no/such/base"], "./no/such/base does not exist"),
])
def test_evaluate_arguments_are_refused_before_the_model_loads(capsys, monkeypatch, tiny_dir, extra, needle):
    import lmshrink.formats.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = _run(capsys, "evaluate", tiny_dir, "--quiet", *extra)
    assert code == 2 and "fix:" in err and needle in err, err


def test_listings_help_and_argument_errors_import_no_torch(tmp_path):
    """In a fresh process: --help, models, recipes, compress --help and refused arguments leave torch and
    transformers unimported (the time this saves is measured by bench/cli_startup.py)."""
    script = f"""
import sys
from lmshrink.cli import main
for argv in (["--help"], ["compress", "--help"], ["models"], ["recipes"], ["recipes", "--show", "w4g128"],
             ["compress", "smollm2-135m", "--recipe", "w4g128", "-o", {str(tmp_path / 'o')!r}, "--nsamples", "0"],
             ["evaluate", "./no/such/model"], ["bench", "smollm2-135m", "--trials", "0"]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code in (0, 2), (argv, code)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# -- 6. a hub id that cannot load fails at once ----------------------------------------------------------------------

def test_an_unreachable_hub_id_fails_at_once_with_the_fix(capsys, monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    code, _, err = _run(capsys, "evaluate", "no-such-org/no-such-model", "--quiet")
    assert code == 2 and "cannot be reached" in err
    assert "HF_HUB_OFFLINE=1" in err and "smollm2-135m" in err and "local model folder" in err
    # the Python API too: the local hub cache only, no retries
    from lmshrink.formats.loading import load_model

    with pytest.raises(LmshrinkError, match="local hub cache does not hold it"):
        load_model("no-such-org/no-such-model", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(capsys, "compress", "no-such-org/no-such-model", "--recipe", "w4g128", "-o", tmp_path / "o")
    assert code == 2 and "HF_HUB_OFFLINE=1 is set" in err


# -- 2, 4, 7, 10. what compress and evaluate print and record -------------------------------------------------------

def test_quantized_output_reports_bytes_on_disk_and_no_sparsity(capsys, columns80, tmp_path, tiny_dir, calib_file):
    out = tmp_path / "q"
    code, text, err = _run(capsys, *_compress_args(tiny_dir, calib_file, out))
    assert code == 0, err
    record = json.loads((out / "lmshrink.json").read_text())
    storage = record["summary"]["storage"]
    assert storage["stored_bytes"] == (out / "model.safetensors").stat().st_size
    # 4-bit codes, a float32 scale and a 4-bit zero point per group of 32, and a 16-byte shape per layer
    layers = storage["compressed_layers"]
    assert layers["layers"] == 21 and layers["weights"] == 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    assert 4 + 32 / 32 + 4 / 32 <= layers["bits_per_weight"] <= 4 + 32 / 32 + 4 / 32 + 21 * 16 * 8 / layers["weights"]
    # dense: the input model's tensors in float32, plus the output file's own header
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as handle:
        tensor_bytes = 4 * sum(_numel(handle.get_slice(k).get_shape()) for k in handle.keys())
    header = 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert storage["dense_bytes"] == tensor_bytes + header
    assert storage["ratio"] == pytest.approx(storage["stored_bytes"] / storage["dense_bytes"])
    flat = " ".join(text.split())
    assert "bits per weight" in flat and "the same model stored dense" in flat and "sparsity" not in flat
    assert not _wide_lines(text, str(tmp_path))

    code, text, err = _run(capsys, "evaluate", out, "--ppl", f"file:{calib_file}", "--seqlen", "32", "--limit", "2",
                           "--kl-base", tiny_dir, "--quiet")
    assert code == 0, err
    assert "on disk:" in text and "bits per weight" in text
    assert "sparsity" not in text  # zeros from rounding are not pruning
    assert not _wide_lines(text, str(tmp_path))
    code, raw, _ = _run(capsys, "evaluate", out, "--ppl", f"file:{calib_file}", "--seqlen", "32", "--limit", "2",
                        "--kl-base", tiny_dir, "--quiet", "--json")
    result = json.loads(raw)
    assert result["sparsity"]["pruned"] is False and "rounding" in result["sparsity"]["zeros_from"]
    assert result["storage"]["stored_bytes"] == storage["stored_bytes"]
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("set "))
    assert lines[header].split()[4:7] == ["ppl", "base", "ppl"]
    row = lines[header + 1].split()
    assert row[4:6] == [f"{result['perplexity'][0]['ppl']:.3f}", f"{result['kl']['base_ppl']:.3f}"]


def test_a_pruned_output_prints_its_sparsity(capsys, columns80, tmp_path, tiny_dir, calib_file):
    out = tmp_path / "p"
    assert _run(capsys, *_compress_args(tiny_dir, calib_file, out, "magnitude50"))[0] == 0
    code, text, err = _run(capsys, "evaluate", out, "--ppl", f"file:{calib_file}", "--seqlen", "32", "--limit", "1",
                           "--quiet")
    assert code == 0, err
    assert re.search(r"sparsity \(pruned, 21 block linears\): 50\.\d\d% overall", " ".join(text.split()))
    assert not _wide_lines(text, str(tmp_path))


def test_models_and_summaries_fit_80_columns(capsys, columns80, monkeypatch, tmp_path):
    from lmshrink.cli import _print_compression

    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path))
    code, text, _ = _run(capsys, "models")
    assert code == 0 and not _wide_lines(text, str(tmp_path))
    assert "SmolLM2-135M-Instruct" in text and "dequantized to fp32 from a Q4_1 GGUF" in " ".join(text.split())
    assert text.splitlines()[0].split() == ["name", "params", "cached", "what", "it", "is"]
    layers = [{"name": f"model.layers.{b}.{n}", "method": m, "objective": o, "rel_output_error": 0.01 * (b + 1)}
              for m, o in (("sparsegpt", LOCAL_OBJECTIVE), ("gptq", FP_TARGET_OBJECTIVE))
              for b in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")]
    record = {"layers": layers,
              "calibration": {"nsamples": 8, "seqlen": 512, "dataset": "enwiki-sample", "split": "calib",
                              "origin": "packaged:gensim==4.4.0/enwiki-latest-pages-articles1 (shortened)", "seed": 0},
              "summary": {"layers": 8, "seconds": 12.5, "peak_rss_bytes": 2**30, "resumed_from_block": 1,
                          "storage": {"files": ["model.safetensors"], "stored_bytes": 174 * 2**20,
                                      "dense_bytes": 513 * 2**20, "ratio": 174 / 513,
                                      "compressed_layers": {"layers": 210, "weights": 106 * 10**6,
                                                            "stored_bytes": 57 * 2**20, "bits_per_weight": 4.51}}},
              "output": "out/smollm2"}
    _print_compression(record)
    text = capsys.readouterr().out
    assert not _wide_lines(text, "\0")
    flat = " ".join(text.split())
    assert f"sparsegpt: relative output error {LOCAL_OBJECTIVE} on the calibration inputs" in flat
    assert f"gptq: relative output error {FP_TARGET_OBJECTIVE} on the calibration inputs" in flat
    assert "0.339x the 513.0 MiB" in flat and "4.51 bits per weight" in flat and "resumed at block 2" in flat


def test_the_objective_a_stage_used_is_shown_and_recorded(capsys, tmp_path, tiny_dir, calib_file):
    code, text, _ = _run(capsys, "recipes", "--show", "w4g128")
    assert code == 0 and text.splitlines()[0] == f"# stage 1 (gptq) objective per layer: {FP_TARGET_OBJECTIVE}"
    shown = tmp_path / "w4g128.yaml"
    shown.write_text(text.replace("fp_target: true", "fp_target: false"))
    code, text, _ = _run(capsys, "recipes", "--show", shown)
    assert text.splitlines()[0] == f"# stage 1 (gptq) objective per layer: {LOCAL_OBJECTIVE}"
    from lmshrink.pipeline.recipe import load_recipe

    assert load_recipe(str(shown)).stages[0].fp_target is False  # the comments read back as nothing
    fp_target = {"stages": [{"method": "gptq", "group_size": 32, "fp_target": True}]}
    record = compress(str(tiny_dir), fp_target, calibration=f"file:{calib_file}", nsamples=2, seqlen=32,
                      progress=False)
    assert {layer["objective"] for layer in record["layers"]} == {FP_TARGET_OBJECTIVE}


def test_a_layout_note_is_recorded_and_stated_at_gguf_export_not_at_compression(capsys, tmp_path, calib_file):
    source = save_tiny_llama(tmp_path / "odd", num_hidden_layers=1, intermediate_size=96)
    recipe = tmp_path / "g64.yaml"
    recipe.write_text("stages:\n  - method: rtn\n    bits: 4\n    group_size: 64\n")
    out = tmp_path / "out"
    code, _, err = _run(capsys, *_compress_args(source, calib_file, out, recipe))
    assert code == 0 and "does not divide" not in err, err
    notes = json.loads((out / "lmshrink.json").read_text())["notes"]
    assert len(notes) == 1 and "group size [64] does not divide the input width(s) [96]" in notes[0]
    pytest.importorskip("gguf")
    code, text, err = _run(capsys, "export", out, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert code == 0, err
    assert "does not divide the input width(s) [96]" in " ".join(text.split())


# -- 5. running again: resume by default, --restart, the true peak memory --------------------------------------------

class _Killed(Exception):
    pass


def _kill_after_first_block(index):
    if index == 0:
        raise _Killed


def _killed_run(tiny_dir, calib_file, out, recipe="rtn-w4g32"):
    with pytest.raises(_Killed):
        compress(str(tiny_dir), recipe, output=out, calibration=f"file:{calib_file}", nsamples=2, seqlen=32,
                 progress=False, on_block_done=_kill_after_first_block)
    assert (out.with_name(out.name + ".partial") / "state.json").is_file()


def test_running_again_resumes_and_restart_discards(capsys, tmp_path, tiny_dir, calib_file):
    full = tmp_path / "full"
    assert _run(capsys, *_compress_args(tiny_dir, calib_file, full))[0] == 0
    out = tmp_path / "out"
    _killed_run(tiny_dir, calib_file, out)
    code, _, err = _run(capsys, *_compress_args(tiny_dir, calib_file, out))  # the same command, no flag
    assert code == 0, err
    assert "resuming at block 2 of 3" in err and "--restart discards it" in err
    assert json.loads((out / "lmshrink.json").read_text())["summary"]["resumed_from_block"] == 1
    assert folder_digest(out) == folder_digest(full)

    again = tmp_path / "again"
    _killed_run(tiny_dir, calib_file, again)
    code, _, err = _run(capsys, *_compress_args(tiny_dir, calib_file, again, "rtn-w4g32", "--restart"))
    assert code == 0 and "resuming" not in err, err
    assert json.loads((again / "lmshrink.json").read_text())["summary"]["resumed_from_block"] == 0
    assert folder_digest(again) == folder_digest(full)

    # the API can refuse instead, naming both ways on
    _killed_run(tiny_dir, calib_file, tmp_path / "api")
    with pytest.raises(LmshrinkError, match=r"holds this run's progress \(1 of 3 blocks done\)") as info:
        compress(str(tiny_dir), "rtn-w4g32", output=tmp_path / "api", calibration=f"file:{calib_file}", nsamples=2,
                 seqlen=32, progress=False, resume=False)
    assert "--resume" in info.value.fix and "--restart" in info.value.fix
    record = compress(str(tiny_dir), "rtn-w4g32", output=tmp_path / "api", calibration=f"file:{calib_file}",
                      nsamples=2, seqlen=32, progress=False)  # the default: continue
    assert record["summary"]["resumed_from_block"] == 1 and folder_digest(tmp_path / "api") == folder_digest(full)


def test_progress_of_another_run_is_refused_until_restart(capsys, tmp_path, tiny_dir, calib_file):
    out = tmp_path / "out"
    _killed_run(tiny_dir, calib_file, out)
    code, _, err = _run(capsys, *_compress_args(tiny_dir, calib_file, out, "w4g32"))  # another recipe
    assert code == 2 and "different run" in err and "--restart" in err
    code, _, err = _run(capsys, *_compress_args(tiny_dir, calib_file, out, "w4g32", "--restart"))
    assert code == 0, err
    assert json.loads((out / "lmshrink.json").read_text())["recipe"]["name"] == "w4g32"


def test_the_recorded_peak_memory_is_read_after_the_weights_are_written(monkeypatch, tmp_path, tiny_dir, calib_file):
    import lmshrink.pipeline.compress as pipeline

    out = tmp_path / "out"

    def peak_after_writing():  # stands for the process peak: tells whether the weights were on disk when read
        return 2**40 if list(tmp_path.glob(".out.partial-*/model.safetensors")) else 1

    monkeypatch.setattr(pipeline, "peak_rss_bytes", peak_after_writing)
    record = compress(str(tiny_dir), "rtn-w4g32", output=out, calibration=f"file:{calib_file}", nsamples=2,
                      seqlen=32, progress=False)
    summary = json.loads((out / "lmshrink.json").read_text())["summary"]
    assert summary["peak_rss_bytes"] == record["summary"]["peak_rss_bytes"] == 2**40
    assert 0 < summary["engine_peak_rss_bytes"] < 2**40 and "writing the checkpoint" in summary["peak_rss_measured"]


# -- 8. permissions, 9. an empty text file ------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_permissions(tmp_path, tiny_dir, calib_file, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        _killed_run(tiny_dir, calib_file, out)
        partial = sorted(p for p in out.with_name("out.partial").iterdir() if p.is_file())
        compress(str(tiny_dir), "rtn-w4g32", output=tmp_path / "done", calibration=f"file:{calib_file}", nsamples=2,
                 seqlen=32, progress=False)
        written = sorted(p for p in (tmp_path / "done").iterdir() if p.is_file())
    finally:
        os.umask(previous)
    assert any(p.suffix == ".safetensors" for p in partial) and (tmp_path / "done" / "model.safetensors") in written
    for path in partial + written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_with_umask_permissions_covers_a_folder_tree(tmp_path):
    from lmshrink.core.atomic import with_umask_permissions

    (tmp_path / "a" / "b").mkdir(parents=True)
    for path in (tmp_path / "a" / "x.bin", tmp_path / "a" / "b" / "y.bin"):
        path.write_bytes(b"\0")
        path.chmod(0o600)
    (tmp_path / "a" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "a" / "run.sh").chmod(0o700)
    previous = os.umask(0o022)
    try:
        with_umask_permissions(tmp_path / "a")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a" / "x.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a" / "b" / "y.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a" / "run.sh").stat().st_mode) == 0o744  # its own execute bit kept


@pytest.mark.parametrize("content, why", [("", "it is empty"), ("\n\n   \n\n", "only blank lines")])
def test_an_empty_text_file_says_it_has_no_text(capsys, monkeypatch, tmp_path, tiny_dir, content, why):
    from lmshrink.data.sources import load_text

    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(DataSourceError) as info:
        load_text(f"file:{empty}")
    assert f"{empty} has no text ({why})" in info.value.message and "seqlen" not in str(info.value)
    import lmshrink.formats.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = _run(capsys, "compress", tiny_dir, "--recipe", "rtn-w4g32", "--calib", f"file:{empty}",
                        "-o", tmp_path / "out", "--quiet")
    assert code == 2 and "has no text" in err and "seqlen" not in err
