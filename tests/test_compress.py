"""compress -> save -> load -> evaluate on a tiny model, through the CLI and the Python API."""

import hashlib
import importlib
import json

import pytest
import torch
from helpers import save_tiny_llama, write_calibration_text
from transformers import AutoModelForCausalLM

from lmshrink import compress, load_model
from lmshrink.cli import main
from lmshrink.core.errors import LmshrinkError
from lmshrink.formats.compressed_tensors import load_quantized_results
from lmshrink.pipeline.recipe import RecipeError


def _tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-in"), num_hidden_layers=2, hidden_size=128,
                           intermediate_size=256)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt")


def test_cli_compress_then_transformers_loads_identical_logits(tiny_dir, calib_file, tmp_path, capsys):
    before = _tree_digest(tiny_dir)
    out = tmp_path / "out"
    code = main(["compress", str(tiny_dir), "--recipe", "w4g32", "--calib", f"file:{calib_file}", "--nsamples", "4",
                 "--seqlen", "64", "-o", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "relative output error" in captured.out
    assert _tree_digest(tiny_dir) == before  # the input model is never modified
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["recipe"]["name"] == "w4g32"
    assert record["calibration"]["nsamples"] == 4 and record["calibration"]["seqlen"] == 64
    assert len(record["layers"]) == 14 and record["summary"]["peak_rss_bytes"] > 0
    assert not (tmp_path / "out.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    # in-memory compressed model, same protocol, through the Python API
    again = compress(load_model(str(tiny_dir), progress=False), "w4g32", calibration=f"file:{calib_file}",
                     nsamples=4, seqlen=64, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    in_memory = load_model(str(tiny_dir), progress=False).model
    for name, result in again["results"].items():
        in_memory.get_submodule(name).weight.data.copy_(result.weight)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits, rtol=0, atol=1e-5)
    stored = load_quantized_results(out)
    for name, result in again["results"].items():
        assert torch.equal(stored[name].codes, result.codes)

    # evaluate the output folder against the base model
    code = main(["evaluate", str(out), "--ppl", f"file:{calib_file}", "--seqlen", "64", "--limit", "2",
                 "--kl-base", str(tiny_dir), "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["kl"]["kl_mean"] > 0

    # an existing output folder is refused, with the fix
    code = main(["compress", str(tiny_dir), "--recipe", "w4g32", "--calib", f"file:{calib_file}", "--nsamples", "2",
                 "--seqlen", "64", "-o", str(out), "--quiet"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_bad_recipe_fails_before_loading(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 5\n")
    code = main(["compress", "./does-not-matter", "--recipe", str(recipe), "-o", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "stage 1 (gptq): option 'bits' = 5" in err


def test_output_inside_input_is_refused(tiny_dir, calib_file, capsys):
    code = main(["compress", str(tiny_dir), "--recipe", "rtn-w4g32", "--calib", f"file:{calib_file}",
                 "-o", str(tiny_dir / "sub"), "--quiet"])
    assert code == 2 and "overlaps the input model's folder" in capsys.readouterr().err


def _compress_cli(source, calib_file, out, *extra):
    return main(["compress", str(source), "--recipe", "rtn-w4g32", "--calib", f"file:{calib_file}", "--nsamples", "2",
                 "--seqlen", "32", "-o", str(out), "--quiet", *extra])


def test_output_that_contains_the_input_is_refused_before_any_work(tmp_path, calib_file, capsys):
    source = save_tiny_llama(tmp_path / "work" / "model", num_hidden_layers=2)
    before = _tree_digest(source)
    assert _compress_cli(source, calib_file, tmp_path / "work") == 2
    assert "overlaps the input model's folder" in capsys.readouterr().err
    assert _tree_digest(source) == before and not (tmp_path / "work.partial").exists()


def test_a_progress_folder_that_is_the_input_is_refused(tmp_path, calib_file, capsys):
    source = save_tiny_llama(tmp_path / "model.partial", num_hidden_layers=2)
    before = _tree_digest(source)
    assert _compress_cli(source, calib_file, tmp_path / "model") == 2
    assert "progress folder" in capsys.readouterr().err
    assert _tree_digest(source) == before


def test_output_that_is_a_file_is_refused(tiny_dir, calib_file, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert _compress_cli(tiny_dir, calib_file, tmp_path / "out") == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_output_dot_is_the_current_folder(tiny_dir, calib_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert _compress_cli(tiny_dir, calib_file, ".") == 0, capsys.readouterr().err
    assert (tmp_path / "here" / "lmshrink.json").is_file() and not (tmp_path / "here.partial").exists()


def test_resume_without_progress_does_not_replace_a_finished_output(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _compress_cli(tiny_dir, calib_file, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "exists and is not empty" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_refuses_progress_made_on_other_weights(tmp_path, calib_file):
    source = save_tiny_llama(tmp_path / "model", num_hidden_layers=3)

    class Killed(Exception):
        pass

    def kill(index):
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        compress(str(source), "rtn-w4g32", output=tmp_path / "out", calibration=f"file:{calib_file}", nsamples=2,
                 seqlen=32, progress=False, on_block_done=kill)
    save_tiny_llama(source, seed=1, num_hidden_layers=3)  # same folder, same layout, other weights
    with pytest.raises(LmshrinkError, match="different run"):
        compress(str(source), "rtn-w4g32", output=tmp_path / "out", calibration=f"file:{calib_file}", nsamples=2,
                 seqlen=32, progress=False, resume=True)


class _NoEngine:
    """Stands in for the engine: a test using it fails if the compression starts."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("the compression started")


def test_what_saving_would_refuse_is_refused_before_compressing(tiny_dir, calib_file, tmp_path, capsys, monkeypatch):
    """float16 scales set in a recipe for a bfloat16 model, and a group size with no storable divisor, fail at once
    with fixes in recipe and CLI terms, not after the whole compression at save time."""
    monkeypatch.setattr(importlib.import_module("lmshrink.pipeline.compress"), "Engine", _NoEngine)
    recipe = tmp_path / "fp16-scales.yaml"
    recipe.write_text("stages:\n- method: rtn\n  group_size: 32\n  scale_dtype: float16\n")
    code = main(["compress", str(tiny_dir), "--recipe", str(recipe), "--calib", f"file:{calib_file}", "--nsamples",
                 "2", "--seqlen", "32", "--dtype", "bfloat16", "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "stage 1 (rtn): option 'scale_dtype' = 'float16'" in err and "bfloat16" in err
    assert "scale_dtype: bfloat16" in err and "--dtype float32" in err and "GridSpec" not in err
    odd = save_tiny_llama(tmp_path / "odd", num_hidden_layers=1, hidden_size=36, intermediate_size=70,
                          num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(RecipeError, match="input widths 36, 70") as caught:
        compress(str(odd), {"stages": [{"method": "rtn", "group_size": 12, "scale_dtype": "float32"}]},
                 output=tmp_path / "g12", calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)
    assert "(36, 70)" in caught.value.fix
    assert not (tmp_path / "g12").exists() and not (tmp_path / "g12.partial").exists()


def test_presets_on_a_bfloat16_model_fit_bfloat16_scales_and_save(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "bf16"
    code = main(["compress", str(tiny_dir), "--recipe", "rtn-w4g32", "--calib", f"file:{calib_file}", "--nsamples",
                 "2", "--seqlen", "32", "--dtype", "bfloat16", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "scales fitted in bfloat16, the model's dtype" in err
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["recipe"]["stages"][0]["scale_dtype"] == "bfloat16"
    assert any("bfloat16" in note for note in record["warnings"])
    reloaded = load_quantized_results(out)
    assert all(r.scale.to(torch.bfloat16).float().equal(r.scale.float()) for r in reloaded.values())


def test_check_before_compressing_agrees_with_the_writer(tmp_path, calib_file):
    """Two stages on one grid share the writer's stored group size: each stage alone is storable (gcd(240, 272) =
    16, gcd(240, 360) = 120), together not (gcd 8). check_recipe refuses what save_quantized refuses, and without an
    output the compression runs."""
    from lmshrink.core.errors import LmshrinkError
    from lmshrink.formats.save import save_quantized

    source = save_tiny_llama(tmp_path / "src", num_hidden_layers=1, hidden_size=272, intermediate_size=360,
                             num_attention_heads=2, num_key_value_heads=1)
    recipe = {"stages": [{"method": "rtn", "group_size": 240, "scale_dtype": "float32",
                          "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]},
                         {"method": "rtn", "group_size": 240, "scale_dtype": "float32", "targets": ["down_proj"]}]}
    with pytest.raises(RecipeError, match=r"stages 1, 2 \(rtn\): option 'group_size' = 240"):
        compress(str(source), recipe, output=tmp_path / "out", calibration=f"file:{calib_file}", nsamples=2,
                 seqlen=32, progress=False)
    loaded = load_model(str(source), progress=False)
    record = compress(loaded, recipe, calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)
    with pytest.raises(LmshrinkError, match="does not divide") as caught:
        save_quantized(loaded.model, loaded.tokenizer, record["results"], tmp_path / "out")
    assert "(272, 360)" in caught.value.fix  # every width of the grid, not one
    # per stage, each alone is saved
    for index, stage in enumerate(recipe["stages"]):
        loaded = load_model(str(source), progress=False)
        compress(loaded, {"stages": [stage]}, output=tmp_path / f"stage{index}",
                 calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)


def test_progress_reaches_the_engine_with_an_output(tiny_dir, calib_file, tmp_path, monkeypatch):
    """The resume state must not take the place of the progress flag (progress bars vanished with -o)."""
    module = importlib.import_module("lmshrink.pipeline.compress")
    seen = []

    class Spy(module.Engine):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["progress"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, "Engine", Spy)
    for progress in (True, False):
        compress(str(tiny_dir), "rtn-w4g32", output=tmp_path / f"p{progress}", calibration=f"file:{calib_file}",
                 nsamples=2, seqlen=32, progress=progress)
    assert seen == [True, False]
