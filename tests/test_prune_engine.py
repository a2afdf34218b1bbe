"""Pruning through the engine on tiny random models: every targeted layer has the exact sparsity / N:M pattern,
the saved folder reloads in plain transformers with identical logits, prune-then-GPTQ keeps the zeros, joint mode
packs zeros, OWL allocates per block, resume and streamed mode give the same files, evaluate reports sparsity."""

import json

import pytest
import torch
from helpers import assert_resume_and_streaming_identical, save_tiny_llama, write_calibration_text
from transformers import AutoModelForCausalLM

from lmshrink import compress, evaluate, load_model
from lmshrink.cli import main
from lmshrink.formats.compressed_tensors import load_quantized_results
from lmshrink.models.adapters import iter_linears


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-prune"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt",
                                  "Pruning sets some weights to zero.")


def _compress(tiny_dir, calib_file, recipe, out=None, **kw):
    return compress(load_model(str(tiny_dir), progress=False), recipe, output=out, calibration=f"file:{calib_file}",
                    nsamples=4, seqlen=32, progress=False, **kw)


def _logits(model, seed=1):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _linears(model):
    return {name: module.weight.detach() for name, module in iter_linears(model)}


def _nm_ok(weight, n, m):
    return bool(((weight == 0).reshape(weight.shape[0], -1, m).sum(-1) >= n).all())


@pytest.mark.parametrize("recipe, pattern", [("magnitude50", None), ("wanda50", None), ("sparse50", None),
                                             ("wanda-2:4", (2, 4)), ("2:4", (2, 4)), ("4:8", (4, 8))])
def test_every_targeted_layer_pruned_exactly(tiny_dir, calib_file, tmp_path, recipe, pattern):
    out = tmp_path / "out"
    _compress(tiny_dir, calib_file, recipe, out=out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    weights = _linears(reloaded)
    assert len(weights) == 14
    for name, weight in weights.items():
        zeros = int((weight == 0).sum())
        if pattern:
            assert _nm_ok(weight, *pattern), name
        elif recipe == "wanda50":  # per output row
            assert bool(((weight == 0).sum(1) >= weight.shape[1] // 2).all()), name
        else:
            assert zeros >= weight.numel() // 2, name
        assert zeros <= weight.numel() // 2 + 2, name  # exact, up to the odd natural zero
    config = json.loads((out / "config.json").read_text())
    sparsity_config = config["quantization_config"]["sparsity_config"]
    assert sparsity_config["format"] == "dense"
    assert sparsity_config["sparsity_structure"] == (f"{pattern[0]}:{pattern[1]}" if pattern else "unstructured")
    assert "lm_head" in sparsity_config["ignore"] and sparsity_config["targets"] == ["Linear"]
    assert 0 < sparsity_config["global_sparsity"] < 0.5
    saved = json.loads((out / "lmshrink.json").read_text())
    assert saved["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert set(saved["sparsity"]["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=1e-3) for layer in saved["layers"])
    # the folder is a plain HF checkpoint: same logits as the in-memory pruned model
    again = _compress(tiny_dir, calib_file, recipe)
    assert not torch.equal(_logits(reloaded), _logits(load_model(str(tiny_dir), progress=False).model))
    memory = load_model(str(tiny_dir), progress=False)
    for name, result in again["results"].items():
        memory.model.get_submodule(name).weight.data.copy_(result.dense())
    assert torch.equal(_logits(reloaded), _logits(memory.model))
    assert load_quantized_results(out) == {}


def test_prune_then_gptq_keeps_zeros_and_joint_packs_them(tiny_dir, calib_file, tmp_path):
    two = _compress(tiny_dir, calib_file, [{"method": "sparsegpt", "sparsity": 0.5},
                                           {"method": "gptq", "bits": 4, "group_size": 32}], out=tmp_path / "two")
    joint = _compress(tiny_dir, calib_file, [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32}],
                      out=tmp_path / "joint")
    for record, folder in ((two, tmp_path / "two"), (joint, tmp_path / "joint")):
        packed = load_quantized_results(folder)
        assert len(packed) == 14
        for name, result in packed.items():
            assert float((result.weight == 0).float().mean()) >= 0.5, name
            assert torch.equal(result.weight, record["results"][name].weight)
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["format"] == "pack-quantized" and config["sparsity_config"]["format"] == "dense"
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        memory = load_model(str(tiny_dir), progress=False)
        for name, result in record["results"].items():
            memory.model.get_submodule(name).weight.data.copy_(result.weight)
        assert torch.allclose(_logits(reloaded), _logits(memory.model), atol=1e-5)
        measured = evaluate(str(folder), ppl=f"file:{calib_file}", seqlen=32, limit=1, progress=False)["sparsity"]
        assert measured["layers"] == 14 and measured["skipped_packed_layers"] == 0
        assert measured["overall"] == pytest.approx(record["sparsity"]["overall"])
    # the GPTQ stage of the two-stage recipe kept exactly the mask of the pruning stage
    layers = [layer for layer in two["layers"] if layer["method"] == "gptq"]
    assert len(layers) == 14 and all(layer["sparsity"] >= 0.5 for layer in layers)


def test_pruned_and_quantized_results_keep_the_prune_mask_apart_from_rounded_zeros(tiny_dir, calib_file, tmp_path):
    from lmshrink.engine.checkpoint import Checkpoint
    from lmshrink.methods.recover.lora import pruned_mask

    for recipe in ([{"method": "sparsegpt", "sparsity": 0.5, "bits": 3, "group_size": 32}],
                   [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 3, "group_size": 32}],
                   [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 3, "group_size": 32}]):
        record = _compress(tiny_dir, calib_file, recipe)
        rounded = 0
        for name, result in record["results"].items():
            assert result.pruned is not None and result.pruned.dtype == torch.bool, name
            assert int(result.pruned.sum()) == result.pruned.numel() // 2, name  # exactly the 50% pruned
            assert bool((result.weight[result.pruned] == 0).all())
            assert torch.equal(pruned_mask(result), result.pruned)  # recovery freezes the pruned weights only
            rounded += int(((result.weight == 0) & ~result.pruned).sum())
        assert rounded > 0  # at 3 bits some kept weights round to 0: the mask is not the zeros
    # and the mask survives a checkpoint round trip (resume)
    folder = Checkpoint(tmp_path / "ck", "key")
    folder.start()
    folder.save_block(0, {"layer": result}, [torch.zeros(1, 2, 3)], {"layers": []})
    assert torch.equal(folder.load_block(0)[0]["layer"].pruned, result.pruned)


def test_owl_allocates_per_block_and_averages_to_target(tiny_dir, calib_file, tmp_path):
    record = _compress(tiny_dir, calib_file, [{"method": "wanda", "sparsity": 0.5, "allocation": "owl",
                                               "owl_lambda": 0.1}], out=tmp_path / "owl")
    blocks = {block: options["sparsity"] for block, options in record["block_options"]["stage 1"].items()}
    assert len(blocks) == 2 and sum(blocks.values()) / 2 == pytest.approx(0.5)
    assert max(blocks.values()) - min(blocks.values()) == pytest.approx(0.2)
    for layer in record["layers"]:
        assert layer["target_sparsity"] == pytest.approx(blocks[str(layer["block"])])
        assert layer["sparsity"] == pytest.approx(layer["target_sparsity"], abs=0.02)


@pytest.mark.parametrize("recipe", ["owl-sparse50", [{"method": "sparsegpt", "sparsity": 0.5, "refit_iterations": 20},
                                                     {"method": "gptq", "bits": 4, "group_size": 32}]],
                         ids=["owl-sparse50", "refit-then-gptq"])
def test_prune_resume_and_streamed_are_identical(tiny_dir, calib_file, tmp_path, recipe):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, recipe, output=output, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
                        progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)


def test_cli_evaluate_reports_sparsity(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "s24"
    assert main(["compress", str(tiny_dir), "--recipe", "2:4", "--calib", f"file:{calib_file}", "--nsamples", "4",
                 "--seqlen", "32", "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "measured sparsity" in printed and "50.00% overall" in printed
    assert main(["evaluate", str(out), "--ppl", f"file:{calib_file}", "--seqlen", "32", "--limit", "2", "--quiet",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert record["sparsity"]["nm_patterns"] == ["2:4", "4:8"]  # 2:4 implies 4:8
    assert record["sparsity"]["by_type"]["q_proj"] == pytest.approx(0.5, abs=1e-3)
    assert main(["evaluate", str(out), "--ppl", f"file:{calib_file}", "--seqlen", "32", "--limit", "2",
                 "--quiet"]) == 0
    assert "sparsity" in capsys.readouterr().out
