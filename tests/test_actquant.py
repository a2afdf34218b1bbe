"""Activation and key/value-cache quantization: the quantizers, the ``activations`` and ``kv-cache`` stages, saved
folders that reload to what was compressed, resume and streaming, the fast decoder's quantized cache, and the
errors for what is not supported."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_resume_and_streaming_identical, save_tiny_llama, tiny_llama, write_calibration_text
from tiny_families import tiny_model

from lmshrink import compress, evaluate, load_model
from lmshrink.api import export
from lmshrink.core.actquant import (
    ActSpec,
    KVSpec,
    dynamic_params,
    fake_quantize_activations,
    fake_quantize_keys,
    fake_quantize_values,
    kv_quantized_length,
    static_params,
)
from lmshrink.core.errors import LmshrinkError, UnsupportedArchitectureError
from lmshrink.formats.runtime_scheme import RUNTIME_FILE
from lmshrink.pipeline.recipe import RecipeError, parse_recipe
from lmshrink.runtime import kvcache
from lmshrink.runtime.activations import InputLinear
from lmshrink.runtime.fastpath import FastDecoder

GEN = torch.Generator().manual_seed(0)


# -- quantizers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_static_activation_grids_round_trip_exactly(symmetric, granularity):
    spec = ActSpec(bits=4, granularity=granularity, group_size=8, symmetric=symmetric, dynamic=False)
    x = torch.randn(5, 32, generator=GEN) * 3
    scale, zero = static_params(x.amin(0), x.amax(0), spec)
    once = fake_quantize_activations(x, spec, scale, zero)
    assert torch.equal(fake_quantize_activations(once, spec, scale, zero), once)  # on the grid: unchanged
    width = scale if granularity == "tensor" else scale.repeat_interleave(8)
    codes = (once / width + (zero if granularity == "tensor" else zero.repeat_interleave(8)))
    assert bool(((codes - codes.round()).abs() < 1e-4).all())
    low, high = (-8, 7) if symmetric else (0, 15)
    assert codes.round().min() >= low and codes.round().max() <= high
    inside = (x >= x.amin(0)) & (x <= x.amax(0))
    assert bool(((once - x).abs() <= width / 2 + 1e-6)[inside].all())  # within half a step in the range


@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_activations_are_within_half_a_step_of_the_input(granularity, bits):
    spec = ActSpec(bits=bits, granularity=granularity, group_size=8)
    x = torch.randn(6, 32, generator=GEN) * torch.logspace(-1, 1, 32)
    out = fake_quantize_activations(x, spec)
    scale, _ = dynamic_params(x, spec)
    step = scale.expand(6, 4, 8).reshape(6, 32) if granularity == "group" else scale.expand_as(x)
    codes = out / step
    assert bool(((codes - codes.round()).abs() < 1e-4).all()) and codes.abs().max() <= 2 ** (bits - 1)
    assert bool(((out - x).abs() <= step * 0.5 + 1e-6 * x.abs().max()).all())  # range ends: half a step inside


def test_symmetric_activations_follow_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x = torch.randn(4, 16, generator=GEN)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor")
    scale, zero = calculate_qparams(x.amin().reshape(1), x.amax().reshape(1), args)
    theirs = fake_quantize(x, scale, zero, args)
    ours = fake_quantize_activations(x, ActSpec(bits=8, granularity="tensor"))
    assert torch.equal(ours, theirs)


def test_kv_grids_round_trip_exactly_and_the_window_rule():
    spec = KVSpec(bits=4, group_size=4, window=6)
    codes = torch.randint(0, 16, (2, 8, 16), generator=GEN).float()
    codes[:, 0::4], codes[:, 1::4] = 0, 15  # every channel's token groups span the grid: scale and minimum return
    keys = codes * 0.25 - 1.0
    assert torch.equal(fake_quantize_keys(keys, spec), keys)
    values = codes.transpose(1, 2).contiguous() * 0.5 + 2.0  # every token's 4-channel groups span the grid
    values[..., 0::4], values[..., 1::4] = 2.0, 9.5
    assert torch.equal(fake_quantize_values(values, spec), values)
    assert [kv_quantized_length(n, spec) for n in (1, 9, 10, 13, 14, 30)] == [0, 0, 4, 4, 8, 24]


def test_specs_refuse_what_does_not_exist():
    with pytest.raises(LmshrinkError, match="per token"):
        ActSpec(granularity="token", dynamic=False)
    with pytest.raises(LmshrinkError, match="kv-cache bits"):
        KVSpec(bits=3)
    with pytest.raises(RecipeError, match="static scales per token"):
        parse_recipe([{"method": "activations", "dynamic": False}])


# -- stages through compress ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-act"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt")


def _logits(model, length=40):
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


W8 = {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True}
RECIPES = {
    "dynamic-token": [{"method": "activations", "bits": 8}],
    "w8-static-tensor": [W8, {"method": "activations", "granularity": "tensor", "dynamic": False}],
    "w4-a4-group-asym-static": [{"method": "gptq", "bits": 4, "group_size": 32},
                                {"method": "activations", "bits": 4, "granularity": "group", "group_size": 32,
                                 "dynamic": False, "symmetric": False}],
    "kv4": [{"method": "kv-cache", "bits": 4, "group_size": 8, "window": 8}],
    "a8-kv2-rotated": [{"method": "activations", "bits": 8},
                       {"method": "kv-cache", "bits": 2, "group_size": 8, "window": 4, "rotate": True}],
}


def _compress(tiny_dir, calib_file, recipe, **kw):
    model = load_model(str(tiny_dir), progress=False)
    record = compress(model, recipe, calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False, **kw)
    return model, record


@pytest.mark.parametrize("name", list(RECIPES))
def test_saved_folders_reload_to_the_same_logits(tiny_dir, calib_file, tmp_path, name):
    model, record = _compress(tiny_dir, calib_file, RECIPES[name], output=tmp_path / "out")
    dense = load_model(str(tiny_dir), progress=False).model
    ours = _logits(model.model)
    assert not torch.allclose(ours, _logits(dense), atol=1e-4)  # quantization acts
    reloaded = load_model(str(tmp_path / "out"), progress=False)
    assert torch.equal(_logits(reloaded.model), ours)
    assert record["scheme"] and reloaded.info.extra["runtime_scheme"]
    scheme = json.loads((tmp_path / "out" / RUNTIME_FILE).read_text())
    assert bool(scheme["inputs"]) == any(s["method"] == "activations" for s in RECIPES[name])
    assert bool(scheme["kv_cache"]) == any(s["method"] == "kv-cache" for s in RECIPES[name])


def test_static_scales_are_calibrated_on_the_quantized_stream_and_stored(tiny_dir, calib_file, tmp_path):
    model, _ = _compress(tiny_dir, calib_file, RECIPES["w8-static-tensor"], output=tmp_path / "out")
    q_proj = model.model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, InputLinear) and q_proj.input_scale.shape == (1,)
    assert q_proj.input_scale is not model.model.model.layers[1].self_attn.k_proj.input_scale
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("model.layers.1.self_attn.q_proj.input_scale"), q_proj.input_scale)


def test_evaluate_runs_the_recorded_scheme_never_float(tiny_dir, calib_file, tmp_path):
    _compress(tiny_dir, calib_file, RECIPES["a8-kv2-rotated"], output=tmp_path / "out")
    text = tmp_path / "eval.txt"
    write_calibration_text(text, "Evaluation text is not the calibration text.")
    quantized = evaluate(str(tmp_path / "out"), ppl=f"file:{text}", seqlen=48, limit=3, progress=False)
    dense = evaluate(str(tiny_dir), ppl=f"file:{text}", seqlen=48, limit=3, progress=False)
    assert quantized["model"]["extra"]["runtime_scheme"]["kv_cache"][0]["bits"] == 2
    assert quantized["perplexity"][0]["ppl"] != dense["perplexity"][0]["ppl"]


@pytest.mark.parametrize("name", ["w8-static-tensor", "a8-kv2-rotated"])
def test_resume_and_streaming_are_bit_identical(tiny_dir, calib_file, tmp_path, name):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, RECIPES[name], output=output, calibration=f"file:{calib_file}", nsamples=4,
                        seqlen=32, progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)
    for folder in ("resumed", "streamed"):
        assert (tmp_path / folder / RUNTIME_FILE).read_text() == (tmp_path / "full" / RUNTIME_FILE).read_text()
    assert torch.equal(_logits(load_model(str(tmp_path / "resumed"), progress=False).model),
                       _logits(load_model(str(tmp_path / "full"), progress=False).model))


def test_exports_refuse_quantized_activations(tiny_dir, calib_file, tmp_path):
    _compress(tiny_dir, calib_file, RECIPES["w8-static-tensor"], output=tmp_path / "out")
    with pytest.raises(LmshrinkError, match=r"layer model\.layers\.0\.\S+ has activation quantization int8 per tensor"):
        export(tmp_path / "out", "gguf", tmp_path / "x.gguf")


def test_unsupported_shapes_and_architectures_are_refused(tiny_dir, calib_file):
    with pytest.raises(RecipeError, match="group_size 48 does not divide the 64 input channels"):
        _compress(tiny_dir, calib_file, [{"method": "activations", "granularity": "group", "group_size": 48}])
    model = tiny_model("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="model type.*gpt2"):
        kvcache.enable(model)
    with pytest.raises(LmshrinkError, match="Conv1D"):
        from lmshrink.runtime.activations import install_quantizer

        install_quantizer(model.transformer.h[0].attn.c_attn, ActSpec())


# -- the quantized cache: evaluation and the fast decoder agree ------------------------------------------------------


def _kv_model(spec, every_layer=True):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    kvcache.enable(model)
    for index, attention in enumerate(kvcache.attention_modules(model)):
        if every_layer or index == 0:
            kvcache.install(attention, spec)
    return model


@pytest.mark.parametrize("bits,rotate,every", [(8, False, False), (4, False, True), (2, True, True)])
def test_fast_decoder_cache_computes_what_evaluation_computes(bits, rotate, every):
    spec = KVSpec(bits=bits, group_size=4, window=5, rotate=rotate)
    model = _kv_model(spec, every)
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
    decoder = FastDecoder(model, 40)
    logits = [decoder.prefill(ids[:, :13])[0]]
    logits += [decoder.step(ids[0, t])[0] for t in range(13, 30)]
    torch.testing.assert_close(torch.stack(logits), reference[12:30], rtol=1e-4, atol=1e-4)
    cache = decoder.cache_bytes()
    assert cache["quantized"] > 0 and cache["float"] + cache["quantized"] < cache["float_equivalent"] or not every


def test_short_sequences_inside_the_window_are_not_quantized():
    spec = KVSpec(bits=2, group_size=4, window=8)
    model = _kv_model(spec)
    plain = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    torch.testing.assert_close(_logits(model, 11), _logits(plain, 11), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model, 30), _logits(plain, 30), atol=1e-3)


def test_rptq_clusters_channels_by_range_and_reloads(tiny_dir, calib_file, tmp_path):
    from lmshrink.core.actquant import cluster_channels

    low = torch.cat([torch.full((6,), -1.0), torch.full((6,), -10.0), torch.full((4,), -0.1)])
    assert cluster_channels(low, -low, 3).tolist() == [1] * 6 + [2] * 6 + [0] * 4  # numbered by width
    recipe = [{"method": "rtn", "bits": 4, "group_size": -1, "symmetric": True},
              {"method": "activations", "bits": 4, "granularity": "cluster", "clusters": 4, "dynamic": False,
               "symmetric": False}]
    model, _ = _compress(tiny_dir, calib_file, recipe, output=tmp_path / "out")
    q_proj = model.model.model.layers[0].self_attn.q_proj
    assert q_proj.input_scale.shape == (4,) and q_proj.input_cluster.shape == (64,)
    assert torch.equal(_logits(load_model(str(tmp_path / "out"), progress=False).model), _logits(model.model))
