"""SmoothQuant and W8A8 folders: smoothing leaves the float model unchanged on every family it supports and is
refused on the others; the w8a8 presets save compressed-tensors folders that transformers reloads to the same
logits, that lmshrink runs with integer products, and that resume and streaming reproduce bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_resume_and_streaming_identical, save_tiny_llama, write_calibration_text
from tiny_families import tiny_model
from transformers import AutoModelForCausalLM

from lmshrink import compress, load_model
from lmshrink.core.errors import UnsupportedArchitectureError
from lmshrink.models.loader import wrap_model
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.fastpath import FastDecoder
from lmshrink.runtime.int8 import Int8Linear


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-sq"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


def _logits(model, length=40):
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _outliers(model):
    """Make a few input channels of every block loud, as in real models (smoothing has something to move)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:3] *= 20
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("options", [{}, {"alpha": 0.85}])
def test_smoothing_leaves_the_float_model_unchanged(family, options, calib_file):
    from helpers import tiny_tokenizer

    model = _outliers(tiny_model(family))
    reference = _logits(model)
    record = compress(wrap_model(model, tiny_tokenizer()), [{"method": "smoothquant", **options}],
                      calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    torch.testing.assert_close(_logits(model), reference, rtol=1e-4, atol=1e-4)
    alphas = [entry["alpha"] for entry in record["block_stages"]]
    assert len(alphas) == 2 and set(alphas[0]) == {"attn-norm", "v-o", "mlp-norm", "up-down"}
    if options:
        assert all(a == 0.85 for entry in alphas for a in entry.values())
    else:  # the loud channels make the search smooth at least one pair
        assert any(a is not None for entry in alphas for a in entry.values())
    assert not torch.equal(model.model.layers[0].input_layernorm.weight,
                           _outliers(tiny_model(family)).model.layers[0].input_layernorm.weight)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma", "phi3"])
def test_other_families_are_refused_before_any_work(family, calib_file):
    from helpers import tiny_tokenizer

    with pytest.raises(UnsupportedArchitectureError, match=f"smoothquant.*{family}"):
        compress(wrap_model(tiny_model(family), tiny_tokenizer()), [{"method": "smoothquant"}],
                 calibration=f"file:{calib_file}", nsamples=2, seqlen=32, progress=False)


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static"])
def test_w8a8_folders_reload_in_transformers_and_run_integer_products(preset, tiny_dir, calib_file, tmp_path):
    model = load_model(str(tiny_dir), progress=False)
    with torch.no_grad():
        for layer in model.model.model.layers:
            layer.input_layernorm.weight[:3] *= 20
    compress(model, preset, output=tmp_path / "out", calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
             progress=False)
    ours = _logits(model.model)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert group["format"] == "int-quantized" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["strategy"] == ("token" if preset == "w8a8" else "tensor")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), ours,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(_logits(load_model(str(tmp_path / "out"), progress=False).model), ours)
    packed = load_model(str(tmp_path / "out"), runtime="packed", progress=False)
    layers = [m for m in packed.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14 and packed.info.extra["packed_layers"] == {"int8_a8": 14}
    if cpu_kernels.available():
        assert all(m.row_kernel == "avx2" for m in layers)
    # integer products: the same codes, float rounding of the products only (a rounding tie of a later layer's
    # dynamic scale can move one code, so not bit-identical)
    logits = _logits(packed.model)
    assert (logits - ours).abs().max() < 0.02 * ours.abs().max()
    assert (logits.argmax(-1) == ours.argmax(-1)).float().mean() > 0.97
    # the fast decoder runs q/k/v and gate/up as one int8 layer each, prompt and steps, with the same numbers
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = packed.model(input_ids=ids).logits[0]
    decoder = FastDecoder(packed.model, 48)
    assert decoder.linears["qkv:int8_a8:fused"] == 2 and decoder.linears["gate_up:int8_a8:fused"] == 2
    steps = [decoder.prefill(ids[:, :36])[0]] + [decoder.step(ids[0, t])[0] for t in range(36, 40)]
    assert (torch.stack(steps) - reference[35:40]).abs().max() < 0.02 * reference.abs().max()


def test_w8a8_static_resume_and_streaming_are_bit_identical(tiny_dir, calib_file, tmp_path):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, "w8a8-static", output=output, calibration=f"file:{calib_file}", nsamples=4,
                        seqlen=32, progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)
    record = json.loads((tmp_path / "resumed" / "lmshrink.json").read_text())
    assert [b["block"] for b in record["block_stages"]] == [0, 1]  # the resumed run keeps block 0's choices


def test_w4a8_is_pack_quantized_with_int8_activations(tiny_dir, calib_file, tmp_path):
    model = load_model(str(tiny_dir), progress=False)
    compress(model, [{"method": "rtn", "bits": 4, "group_size": -1, "symmetric": True},
                     {"method": "activations", "bits": 8}], output=tmp_path / "out",
             calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    group = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert group["group_0"]["format"] == "pack-quantized" and group["group_0"]["input_activations"]["num_bits"] == 8
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), _logits(model.model),
                               rtol=1e-5, atol=1e-5)
