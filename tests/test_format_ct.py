"""compressed-tensors pack-quantized writer/reader: transformers loads what lmshrink writes, exactly."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmshrink.core.atomic import atomic_write_bytes, atomic_write_text
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec
from lmshrink.formats import compressed_tensors as ct_format
from lmshrink.formats.compressed_tensors import is_compressed_tensors_folder, load_quantized_results
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight


def _hessian(in_features: int, seed: int) -> torch.Tensor:
    """X^T X of correlated random inputs."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    inputs = torch.randn(256, in_features, generator=generator) @ (torch.eye(in_features) + mix)
    return inputs.T @ inputs


def _tiny(**overrides):
    """One block is enough for the format; it halves the quantization time."""
    return tiny_llama(**{"num_hidden_layers": 1, **overrides})


def _compress(model, spec_of, method="rtn", static_groups=True):
    """Quantize every block linear in place (the in-memory compressed model); returns the results."""
    results = {}
    for index, (name, module) in enumerate(iter_linears(model)):
        weight = linear_weight(module).float().clone()
        spec = spec_of(name)
        if method == "rtn":
            result = rtn_quantize(weight, spec)
        else:
            result = gptq_quantize(weight, _hessian(weight.shape[1], index), spec, act_order=True,
                                   static_groups=static_groups)
        set_linear_weight(module, result.weight)
        results[name] = result
    return results


def _logits(model, seed=0):
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def _assert_results_equal(loaded, results):
    assert set(loaded) == set(results)
    for name, result in results.items():
        back = loaded[name]
        assert back.spec == result.spec, name
        for field in ("codes", "scale", "zero", "weight"):
            assert torch.equal(getattr(back, field), getattr(result, field)), (name, field)
        assert back.g_idx is None and result.g_idx is None


def _assert_same_model(loaded, model):
    loaded_params = dict(loaded.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(loaded_params[name].detach(), param.detach()), name


CASES = {
    "rtn-w4g32-asym": (dict(bits=4, group_size=32, symmetric=False), "rtn", {}),
    "rtn-w4g32-sym": (dict(bits=4, group_size=32, symmetric=True), "rtn", {}),
    "rtn-w8-channel-asym": (dict(bits=8, group_size=-1, symmetric=False), "rtn", {}),
    "rtn-w3g32-sym": (dict(bits=3, group_size=32, symmetric=True), "rtn", {}),
    "gptq-actorder-static-w4g32-asym": (dict(bits=4, group_size=32, symmetric=False), "gptq", {}),
    "gptq-actorder-static-w3g32-sym": (dict(bits=3, group_size=32, symmetric=True), "gptq", {}),
    # 96 and 192 columns with g64: a shorter last group, stored with group size gcd = 32
    "rtn-w4g64-uneven-asym": (dict(bits=4, group_size=64, symmetric=False), "rtn",
                              dict(hidden_size=96, intermediate_size=192)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_same_model_and_lmshrink_reads_it_back(tmp_path, case):
    spec_args, method, shape = CASES[case]
    model = _tiny(**shape)
    results = _compress(model, lambda name: GridSpec(**spec_args), method)
    expected = _logits(model)

    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out",
                         extra_files={"lmshrink.json": json.dumps({"case": case})})

    assert is_compressed_tensors_folder(out)
    assert json.loads((out / "lmshrink.json").read_text()) == {"case": case}
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["quantization_status"] == "compressed"
    assert quant["ignore"] == ["lm_head"]
    (group,) = quant["config_groups"].values()
    weights = group["weights"]
    assert weights["num_bits"] == spec_args["bits"] and weights["symmetric"] == spec_args["symmetric"]
    assert weights["strategy"] == ("channel" if spec_args["group_size"] == -1 else "group")
    assert weights.get("actorder") == ("static" if method == "gptq" else None)
    if shape:
        assert weights["group_size"] == 32
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_packed").dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert ("model.layers.0.self_attn.q_proj.weight_zero_point" in keys) == (not spec_args["symmetric"])

    loaded = AutoModelForCausalLM.from_pretrained(out)
    actual = _logits(loaded)  # the first forward decompresses
    assert (actual - expected).abs().max().item() <= 1e-5
    _assert_same_model(loaded, model)
    _assert_results_equal(load_quantized_results(out), results)


def test_bfloat16_model_with_bfloat16_scales_loads_exactly(tmp_path):
    model = _tiny()
    reference = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16).eval()
    reference.load_state_dict(model.state_dict())  # bf16 weights, rotary buffers as a loaded model has them
    results = _compress(reference, lambda name: GridSpec(bits=4, group_size=32, scale_dtype="bfloat16"))
    out = save_quantized(reference, tiny_tokenizer(), results, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded), _logits(reference))
    _assert_same_model(loaded, reference)
    _assert_results_equal(load_quantized_results(out), results)


def test_scales_not_exact_in_the_model_dtype_are_refused(tmp_path):
    model = _tiny().to(torch.bfloat16)
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=32))  # float32 scales
    with pytest.raises(LmshrinkError, match="scale_dtype='bfloat16'"):
        save_quantized(model, None, results, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_act_order_without_static_groups_is_refused(tmp_path):
    model = _tiny()
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=32), "gptq", static_groups=False)
    assert any(r.g_idx is not None for r in results.values())
    with pytest.raises(LmshrinkError, match="static_groups=True"):
        save_quantized(model, None, results, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _mixed(bits_mlp_symmetric: bool):
    def spec_of(name):
        if ".mlp." in name:
            return GridSpec(bits=4, group_size=32, symmetric=bits_mlp_symmetric)
        return GridSpec(bits=8, group_size=-1, symmetric=True)
    return spec_of


def test_mixed_symmetric_grids_use_one_config_group_each(tmp_path):
    model = _tiny()
    results = _compress(model, _mixed(True))
    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = sorted(sorted(g["targets"]) for g in groups.values())
    assert targets == sorted(sorted(n for n in results if (".mlp." in n) == is_mlp) for is_mlp in (False, True))
    expected = _logits(model)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(loaded) - expected).abs().max().item() <= 1e-5
    _assert_results_equal(load_quantized_results(out), results)


def test_mixed_asymmetric_grids_need_opt_out_of_transformers(tmp_path):
    model = _tiny()
    results = _compress(model, _mixed(False))
    with pytest.raises(LmshrinkError, match="transformers_compatible=False"):
        save_quantized(model, None, results, tmp_path / "out")
    out = save_quantized(model, None, results, tmp_path / "out", transformers_compatible=False)
    _assert_results_equal(load_quantized_results(out), results)


def test_tied_embeddings_and_shards(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=32))
    expected = _logits(model)
    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"] and "model.embed_tokens.weight" in index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert (_logits(loaded) - expected).abs().max().item() <= 1e-5
    _assert_results_equal(load_quantized_results(out), results)


def test_interrupted_write_leaves_nothing_and_keeps_the_old_folder(tmp_path, monkeypatch):
    model = _tiny()
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=32))
    tokenizer = tiny_tokenizer()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)  # fails after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(model, tokenizer, results, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("previous run")
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(model, tokenizer, results, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    model = _tiny()
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=32, symmetric=True))
    out = tmp_path / "out"
    out.mkdir()
    save_quantized(model, None, results, out)  # an empty folder is fine
    with pytest.raises(LmshrinkError, match="overwrite=True"):
        save_quantized(model, None, results, out)
    (out / "stale.txt").write_text("old")
    save_quantized(model, None, results, out, overwrite=True)
    assert not (out / "stale.txt").exists() and is_compressed_tensors_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_never_writes_into_the_input_model_folder(tmp_path):
    source = tmp_path / "input"
    _tiny().save_pretrained(source)
    before = sorted(p.name for p in source.iterdir())
    model = AutoModelForCausalLM.from_pretrained(source)
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=32))
    for target in (source, source / "quantized"):
        with pytest.raises(LmshrinkError, match="input model's folder"):
            save_quantized(model, None, results, target, overwrite=True)
    assert sorted(p.name for p in source.iterdir()) == before
    assert not is_compressed_tensors_folder(source)
    assert is_compressed_tensors_folder(save_quantized(model, None, results, tmp_path / "sibling"))


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_other_families_with_biases(tmp_path, family):
    from tiny_families import tiny_model

    model = tiny_model(family)
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=16, symmetric=False))
    assert any(getattr(model.get_submodule(name), "bias", None) is not None for name in results)
    expected = _logits(model)
    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(loaded) - expected).abs().max().item() <= 1e-5
    _assert_same_model(loaded, model)
    _assert_results_equal(load_quantized_results(out), results)


def test_gpt2_conv1d_layers_are_saved_dequantized(tmp_path):
    from tiny_families import tiny_model

    model = tiny_model("gpt2")
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=16))
    expected = _logits(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out")
    assert any("Conv1D" in str(w.message) for w in caught)
    assert not is_compressed_tensors_folder(out)  # nothing packed: a plain dense checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(loaded), expected)


def test_unreadable_folders(tmp_path):
    assert not is_compressed_tensors_folder(tmp_path / "missing")
    _tiny().save_pretrained(tmp_path / "dense")
    assert not is_compressed_tensors_folder(tmp_path / "dense")
    with pytest.raises(LmshrinkError, match="not a compressed-tensors checkpoint"):
        load_quantized_results(tmp_path / "dense")


def test_group_size_with_a_tiny_common_divisor_is_refused(tmp_path):
    model = _tiny(hidden_size=72, intermediate_size=144, num_attention_heads=4, num_key_value_heads=2)
    results = _compress(model, lambda name: GridSpec(bits=4, group_size=64))  # gcd(64, 72, 144) = 8
    with pytest.raises(LmshrinkError, match="does not divide its 72 input columns"):
        save_quantized(model, None, results, tmp_path / "out")
    assert ct_format.FORMAT == "pack-quantized"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_file_writes_get_the_umask_permissions(tmp_path, umask):
    """Like a plain write (0o666 less the umask), not mkstemp's 0600 (e.g. a resume state other users can read)."""
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "state.json", "{}")
        atomic_write_bytes(tmp_path / "blob.bin", b"\0")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("state.json", "blob.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert (tmp_path / "state.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "plain.json", "state.json"]
