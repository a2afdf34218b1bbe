"""Pruned weights stored as bitmask + values (``--sparse-format bitmask``): lmshrink reads the folder back with
identical logits and the exact mask, the file is smaller than dense storage by the bytes the record reports,
evaluate measures the sparsity, joint sparse + quantized layers stay pack-quantized, bad values fail clearly."""

import json

import pytest
import torch
from helpers import save_tiny_llama, write_calibration_text
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmshrink import compress, evaluate, load_model
from lmshrink.cli import main
from lmshrink.core.errors import LmshrinkError
from lmshrink.formats.compressed_tensors import load_quantized_results
from lmshrink.formats.sparse_bitmask import KEYS, decode, encode, encoded_bytes, load_sparse_results


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-sparse"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt",
                                  "Pruning sets some weights to zero.")


def _compress(tiny_dir, calib_file, recipe, out, **kw):
    loaded = load_model(str(tiny_dir), progress=False, dtype=kw.pop("dtype", "float32"))
    record = compress(loaded, recipe, output=out, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
                      progress=False, **kw)
    return loaded, record


def _logits(model, seed=1):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("recipe, pattern", [("sparse50", "unstructured"), ("2:4", "2:4")])
def test_bitmask_folder_reloads_identically_and_is_smaller(tiny_dir, calib_file, tmp_path, recipe, pattern):
    dense_dir, bitmask_dir = tmp_path / "dense", tmp_path / "bitmask"
    _, dense_record = _compress(tiny_dir, calib_file, recipe, dense_dir)
    memory, record = _compress(tiny_dir, calib_file, recipe, bitmask_dir, sparse_format="bitmask")
    results = record["results"]
    assert len(results) == 14

    # lmshrink's loader decodes the folder: the same logits as the pruned model in memory, bit for bit
    reloaded = load_model(str(bitmask_dir), progress=False)
    assert torch.equal(_logits(reloaded.model), _logits(memory.model))
    for name, module in reloaded.model.named_modules():
        if name in results:
            assert torch.equal(module.weight, results[name].dense()), name

    # the mask, kept values and pattern read back exactly
    sparse = load_sparse_results(bitmask_dir)
    assert set(sparse) == set(results)
    for name, result in sparse.items():
        assert torch.equal(result.mask, results[name].mask), name
        assert torch.equal(result.values, results[name].values), name
        assert result.pattern == pattern and result.target_sparsity == results[name].target_sparsity
    assert load_quantized_results(bitmask_dir) == {}

    quant = json.loads((bitmask_dir / "config.json").read_text())["quantization_config"]
    config = quant["sparsity_config"]
    assert config["format"] == "sparse-bitmask" and sorted(config["targets"]) == sorted(results)
    assert config["sparsity_structure"] == pattern and "lm_head" in config["ignore"]
    assert config["global_sparsity"] == pytest.approx(
        json.loads((dense_dir / "config.json").read_text())["quantization_config"]["sparsity_config"]
        ["global_sparsity"])

    # bytes: the record's numbers are the stored tensors' sizes, and the file shrinks by about that much
    storage = json.loads((bitmask_dir / "lmshrink.json").read_text())["summary"]["sparse_storage"]
    assert storage == record["summary"]["sparse_storage"]
    stored, dense = _tensors(bitmask_dir), _tensors(dense_dir)
    assert storage["layers"] == 14 and storage["format"] == "bitmask"
    assert storage["stored_bytes"] == sum(stored[f"{n}.{k}"].nbytes for n in results for k in KEYS)
    assert storage["dense_bytes"] == sum(dense[f"{n}.weight"].nbytes for n in results)
    assert storage["saved_bytes"] == storage["dense_bytes"] - storage["stored_bytes"] > 0.4 * storage["dense_bytes"]
    dense_file, bitmask_file = (d / "model.safetensors" for d in (dense_dir, bitmask_dir))
    saved_on_disk = dense_file.stat().st_size - bitmask_file.stat().st_size
    assert abs(saved_on_disk - storage["saved_bytes"]) < 8192  # the safetensors headers differ
    dense_storage = json.loads((dense_dir / "lmshrink.json").read_text())["summary"]["sparse_storage"]
    assert dense_storage["format"] == "dense" and dense_storage["saved_bytes"] == 0
    assert dense_storage["stored_bytes"] == storage["dense_bytes"]
    # every other tensor is the same as in the dense folder
    others = {k for k in dense if k.rsplit(".", 1)[0] not in results}
    assert others == {k for k in stored if k.rsplit(".", 1)[0] not in results}
    assert all(torch.equal(dense[k], stored[k]) for k in others)


def test_plain_transformers_does_not_decode_bitmask(tiny_dir, calib_file, tmp_path):
    """What the docstrings say: transformers (and compressed-tensors 0.20) leave bitmask layers uninitialised."""
    out = tmp_path / "bitmask"
    memory, record = _compress(tiny_dir, calib_file, "magnitude50", out, sparse_format="bitmask")
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k[: -len(".weight")] for k in info["missing_keys"]} == set(record["results"])
    assert not torch.equal(_logits(plain.eval()), _logits(memory.model))


def test_evaluate_reports_sparsity_from_bitmask_folder(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "s24"
    assert main(["compress", str(tiny_dir), "--recipe", "2:4", "--calib", f"file:{calib_file}", "--nsamples", "4",
                 "--seqlen", "32", "-o", str(out), "--quiet", "--sparse-format", "bitmask"]) == 0
    printed = capsys.readouterr().out
    assert "pruned layers stored bitmask" in printed and "saved" in printed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"] == \
        "sparse-bitmask"
    record = evaluate(str(out), ppl=f"file:{calib_file}", seqlen=32, limit=1, progress=False)["sparsity"]
    assert record["layers"] == 14 and record["skipped_packed_layers"] == 0
    assert record["overall"] == pytest.approx(0.5, abs=1e-3) and record["nm_patterns"] == ["2:4", "4:8"]


def test_joint_sparse_quantized_layers_stay_pack_quantized(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "joint"
    _, record = _compress(tiny_dir, calib_file, [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4,
                                                   "group_size": 32}], out, sparse_format="bitmask")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["sparsity_config"]["format"] == "dense"
    assert not any(key.endswith(".bitmask") for key in _tensors(out))
    assert "sparse_storage" not in record["summary"]
    packed = load_quantized_results(out)
    assert len(packed) == 14 and all(torch.equal(r.weight, record["results"][n].weight) for n, r in packed.items())


def test_bad_sparse_format_is_refused_clearly(tiny_dir, calib_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(tiny_dir), "--recipe", "sparse50", "-o", str(tmp_path / "x"), "--sparse-format", "csr"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--sparse-format" in err and "'csr'" in err and "dense" in err and "bitmask" in err
    with pytest.raises(LmshrinkError, match="sparse format 'csr'") as exc:
        compress(str(tiny_dir), "sparse50", output=tmp_path / "y", calibration=f"file:{calib_file}", nsamples=4,
                 seqlen=32, progress=False, sparse_format="csr")
    assert "bitmask" in exc.value.fix
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encode_decode_exact_with_kept_zeros(dtype):
    weight = torch.randn(5, 19, generator=torch.Generator().manual_seed(0)).to(dtype)
    kept = torch.rand(5, 19, generator=torch.Generator().manual_seed(1)) > 0.5
    weight = weight.masked_fill(~kept, 0)
    weight[0, kept[0].nonzero()[0, 0]] = 0  # a kept weight that is zero: stays kept
    tensors = encode(weight, kept)
    assert tensors["bitmask"].shape == (5, 3) and tensors["compressed"].dtype == dtype
    assert sum(t.nbytes for t in tensors.values()) == encoded_bytes((5, 19), int(kept.sum()), weight.element_size())
    back, back_kept = decode("layer", tensors)
    assert torch.equal(back_kept, kept) and torch.equal(back.view(torch.int16 if dtype != torch.float32 else
                                                                 torch.int32),
                                                        weight.view(torch.int16 if dtype != torch.float32 else
                                                                    torch.int32))
    with pytest.raises(ValueError, match="not zero"):
        encode(weight + 1, kept)
    broken = dict(tensors, row_offsets=tensors["row_offsets"].flip(0))
    with pytest.raises(LmshrinkError, match="row_offsets"):
        decode("layer", broken)
    with pytest.raises(LmshrinkError, match="keeps"):
        decode("layer", dict(tensors, compressed=tensors["compressed"][:-1]))


def test_streamed_compression_writes_the_same_bitmask_folder(tiny_dir, calib_file, tmp_path):
    memory_dir, streamed_dir = tmp_path / "memory", tmp_path / "streamed"
    _compress(tiny_dir, calib_file, "2:4", memory_dir, sparse_format="bitmask")
    compress(str(tiny_dir), "2:4", output=streamed_dir, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
             progress=False, offload="disk", sparse_format="bitmask")
    memory, streamed = _tensors(memory_dir), _tensors(streamed_dir)
    assert memory.keys() == streamed.keys() and any(key.endswith(".bitmask") for key in memory)
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)


def test_packed_runtime_loads_a_folder_mixing_bitmask_and_packed_layers(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "mixed"
    recipe = [{"method": "sparsegpt", "sparsity": 0.5, "targets": ["*mlp*"]},
              {"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*self_attn*"]}]
    memory, record = _compress(tiny_dir, calib_file, recipe, out, sparse_format="bitmask")
    keys = _tensors(out)
    assert any(key.endswith("mlp.up_proj.bitmask") for key in keys)
    assert any(key.endswith("self_attn.q_proj.weight_packed") for key in keys)
    packed = load_model(str(out), runtime="packed", progress=False)
    mlp = packed.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(mlp, memory.model.model.layers[0].mlp.up_proj.weight)  # decoded exactly, zeros kept
    # the packed 4-bit kernels work in bf16, so logits agree closely, not bit for bit
    torch.testing.assert_close(_logits(packed.model), _logits(memory.model), rtol=0.05, atol=0.05)
