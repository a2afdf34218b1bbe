"""FastDecoder (runtime/fastpath.py): the lean greedy decoder gives transformers' logits, step by step."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer
from tiny_families import tiny_model

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec
from lmshrink.formats.loading import load_packed
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.fastpath import FastDecoder, supported

ATOL = 1e-4


def _reference(model, ids, steps):
    """transformers' own forward: the prompt in one call, then greedy steps with its cache; logits per call."""
    logits, tokens = [], []
    with torch.inference_mode():
        output = model(ids, use_cache=True)
        cache, last = output.cache, output.logits[:, -1]
        logits.append(last)
        for _ in range(steps):
            token = last.argmax(-1, keepdim=True)
            tokens.append(int(token))
            output = model(token, cache=cache, use_cache=True)
            cache, last = output.cache, output.logits[:, -1]
            logits.append(last)
    tokens.append(int(last.argmax(-1)))
    return logits, tokens


def _fast(decoder, ids, steps):
    logits = [decoder.prefill(ids)]
    tokens = []
    for _ in range(steps):
        token = logits[-1].argmax(-1)
        tokens.append(int(token))
        logits.append(decoder.step(token))
    tokens.append(int(logits[-1].argmax(-1)))
    return logits, tokens


def _check(model, prompt=12, steps=10, max_len=64, seed=1, **kwargs):
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed))
    expected, expected_tokens = _reference(model, ids, steps)
    decoder = FastDecoder(model, max_len, **kwargs)
    got, tokens = _fast(decoder, ids, steps)
    assert len(got) == steps + 1
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape == (1, model.config.vocab_size)
        error = (a - b).abs().max().item()
        assert error < ATOL, f"call {index} (0 = the prompt): logits differ by {error}"
    assert tokens == expected_tokens
    # the logits are not trivially alike: consecutive steps differ by far more than the tolerance
    assert (got[1] - got[2]).abs().max().item() > 100 * ATOL
    return decoder, tokens


@pytest.mark.parametrize("overrides", [
    {},                                              # GQA: 4 heads, 2 kv heads, head_dim 16
    {"num_key_value_heads": 4},                      # one kv head per head
    {"num_key_value_heads": 1},                      # all heads share one kv head
    {"tie_word_embeddings": True},
    {"num_attention_heads": 8, "num_key_value_heads": 2},  # head_dim 8: a scale 8^-0.5 that is not a power of two
    {"attention_bias": True, "mlp_bias": True},      # biases in every Linear
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
], ids=["gqa", "mha", "mqa", "tied", "head-dim-8", "bias", "llama3-rope", "linear-rope"])
def test_fp32_logits_and_greedy_tokens_match_transformers(overrides):
    model = tiny_llama(**overrides)
    if "rope_scaling" in overrides:  # the config really carries the scaling (transformers may rename the key)
        assert model.model.rotary_emb.rope_type == overrides["rope_scaling"]["rope_type"]
    if overrides.get("attention_bias"):
        torch.nn.init.normal_(model.model.layers[0].self_attn.k_proj.bias, std=0.5)  # zero at init otherwise
    _check(model)


def test_unfused_and_dense_fused_paths_match_too():
    model = tiny_llama()
    _check(model, fuse=False)
    decoder, _ = _check(model, fuse_dense=True)
    assert decoder.linears["qkv:dense:fused"] == 2 and decoder.linears["gate_up:dense:fused"] == 2


def test_a_decoder_can_be_reused_and_reset():
    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(3))
    decoder = FastDecoder(model, 32)
    first = decoder.generate(ids, 8)
    decoder.reset()
    assert decoder.generate(ids, 8) == first
    assert decoder.generate(ids[0].tolist(), 8) == first  # a plain list of ids


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_match_transformers(family):
    model = tiny_model(family)
    if family == "qwen2":  # q/k/v biases (zero at init)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    # the tiny Mistral has a sliding window of 16: within it, full attention is the same computation
    _check(model, prompt=8, steps=6, max_len=16)


def test_sliding_window_beyond_max_len_is_refused():
    model = tiny_model("mistral")
    ok, reason = supported(model, 17)
    assert not ok and "sliding-window" in reason
    with pytest.raises(LmshrinkError, match="window 16") as err:
        FastDecoder(model, 64)
    assert "--decode hf" in err.value.fix


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gpt2", "opt", "phi3"])
def test_unsupported_architectures_are_refused_clearly(family):
    model = tiny_model(family)
    ok, reason = supported(model)
    assert not ok and model.config.model_type in reason
    with pytest.raises(LmshrinkError, match=f"model_type '{model.config.model_type}'") as err:
        FastDecoder(model, 32)
    assert "--decode hf" in err.value.fix


def test_dynamic_rope_is_refused():
    model = tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(LmshrinkError, match="rope type 'dynamic'"):
        FastDecoder(model, 32)


def test_overflow_batches_and_misuse_are_refused():
    model = tiny_llama()
    decoder = FastDecoder(model, 10)
    with pytest.raises(LmshrinkError, match="before prefill"):
        decoder.step(3)
    with pytest.raises(LmshrinkError, match="11 positions; this FastDecoder holds 10") as err:
        decoder.prefill(torch.zeros(1, 11, dtype=torch.long))
    assert "max_len" in err.value.fix
    with pytest.raises(LmshrinkError, match="batch of 2"):
        decoder.prefill(torch.zeros(2, 4, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 8, dtype=torch.long))
    decoder.step(1)
    decoder.step(2)  # position 10 of 10
    with pytest.raises(LmshrinkError, match="11 positions"):
        decoder.step(3)
    decoder.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LmshrinkError, match="one token id"):
        decoder.step(torch.tensor([1, 2]))


# -- packed models (QuantLinear) -----------------------------------------------------------------------------------


@pytest.fixture(params=["avx2", "torch-int4"])
def packed_tiny(request, tmp_path, monkeypatch):
    """A tiny Llama quantized RTN w4g32, loaded packed with lmshrink's AVX2 kernel or torch's int4 kernel."""
    if request.param == "torch-int4":
        monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    elif not cpu_kernels.available():
        pytest.skip(f"AVX2 int4 kernel unavailable: {cpu_kernels.kernel_status()}")
    model = tiny_llama(num_hidden_layers=2)
    results = {}
    for name, module in iter_linears(model):
        result = rtn_quantize(linear_weight(module).float().clone(), GridSpec(bits=4, group_size=32))
        set_linear_weight(module, result.weight)
        results[name] = result
    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "w4g32")
    packed, _, kinds = load_packed(out)
    return packed, request.param, set(kinds.values())


def test_packed_model_matches_its_transformers_forward(packed_tiny):
    packed, kind, kinds = packed_tiny
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        before = packed(ids).logits
    decoder, _ = _check(packed)
    if kind == "avx2":
        assert kinds == {"int4_avx2"}
        # q/k/v and gate/up run as one kernel call each, o and down as their own
        assert decoder.linears == {"qkv:int4_avx2:fused": 2, "o:int4_avx2": 2, "gate_up:int4_avx2:fused": 2,
                                   "down:int4_avx2": 2, "lm_head:dense": 1}
        q_proj = packed.model.layers[0].self_attn.q_proj
        assert q_proj.packed.data_ptr() == decoder.step_layers[0][2].packed.data_ptr()  # a view, not a copy
    else:
        assert kinds == {"int4"} and decoder.linears["qkv:modules"] == 2
    with torch.inference_mode():  # the model itself still computes the same logits
        torch.testing.assert_close(packed(ids).logits, before, rtol=0, atol=0)


def _teacher_forced(decoder, ids):
    """Logits of every position of ``ids`` [1, T]: a one-token prefill, then one step per token."""
    rows = [decoder.prefill(ids[:, :1])]
    for token in ids[0, 1:].tolist():
        rows.append(decoder.step(token))
    return torch.cat(rows)


def test_int8_activations_and_head_approximate_the_exact_path(packed_tiny):
    packed, kind, _ = packed_tiny
    if kind != "avx2":
        pytest.skip("int8 activations run through the AVX2 kernel's int4 layers")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(9))
    exact = _teacher_forced(FastDecoder(packed, 32), ids)
    for options, keys in (({"activations": "int8"}, {"qkv:int4_avx2_q8:fused": 2, "down:int4_avx2_q8": 2,
                                                     "lm_head:dense": 1}),
                          ({"head": "int8"}, {"qkv:int4_avx2:fused": 2, "lm_head:q8": 1}),
                          ({"activations": "int8", "head": "int8"}, {"gate_up:int4_avx2_q8:fused": 2,
                                                                     "lm_head:q8": 1})):
        decoder = FastDecoder(packed, 32, **options)
        assert keys.items() <= decoder.linears.items(), decoder.linears
        got = _teacher_forced(decoder, ids)
        relative = ((got - exact).norm() / exact.norm()).item()
        # a real approximation (far above float32 rounding), and a close one: int8 keeps ~2 decimal digits
        assert 1e-5 < relative < 0.03, f"{options}: relative logit error {relative}"
    with pytest.raises(LmshrinkError, match="activations='int4' is not known"):
        FastDecoder(packed, 32, activations="int4")
    with pytest.raises(LmshrinkError, match="head='fp8' is not known"):
        FastDecoder(packed, 32, head="fp8")


def test_int8_options_refuse_a_model_that_is_not_float32():
    model = tiny_llama(num_hidden_layers=1).to(torch.bfloat16)
    with pytest.raises(LmshrinkError, match="float32 model") as err:
        FastDecoder(model, 16, head="int8")
    assert "head='model'" in err.value.fix
    FastDecoder(model, 16)  # the exact path still takes it
