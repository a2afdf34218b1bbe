"""Packed runtime: QuantLinear (int4 / int8 CPU kernels, dequantize fallback) and runtime='packed' loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama, tiny_tokenizer

from lmshrink.core.grids import GridSpec
from lmshrink.formats.loading import load_packed
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.packed import replace_linears
from lmshrink.runtime.qlinear import QuantLinear, unpack_int4pack


@pytest.fixture
def torch_int4(monkeypatch):
    """Layers built inside the test use torch's int4 kernel, not lmshrink's AVX2 one (tests/test_cpu_kernel.py)."""
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")


@pytest.fixture(params=["torch-int4", "avx2"])
def int4_kind(request, monkeypatch):
    """Run a test with each 4-bit kernel: the kind 4-bit layers get (skipped where the AVX2 kernel cannot build)."""
    if request.param == "torch-int4":
        monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
        return "int4"
    if not cpu_kernels.available():
        pytest.skip(f"AVX2 int4 kernel unavailable: {cpu_kernels.kernel_status()}")
    return "int4_avx2"


def _result(out_features, in_features, seed=0, **spec):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return rtn_quantize(weight, GridSpec(**spec))


def _bf16_close(actual, expected, x, weight):
    """|actual - expected| within what bf16 inputs, scales and outputs explain: a few ulps of the terms' scale."""
    bound = 2.0**-6 * (x.abs() @ weight.abs().t()) + 1e-6
    excess = ((actual.float() - expected.float()).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bf16 bound by {excess}"
    # and not trivially: the error is small relative to the output's size
    rel = (actual.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 1e-2, rel


KERNEL_CASES = [
    # (bits, group_size, symmetric, out, in, expected kind)
    (4, 32, True, 64, 128, "int4"),
    (4, 32, False, 64, 128, "int4"),
    (4, 64, False, 48, 192, "int4"),  # 48 rows: a last block of 16 rows in the kernel layout
    (4, 128, False, 32, 576, "int4"),  # 576 columns with g128: a shorter last group, kernel group 64
    (4, 128, True, 32, 256, "int4"),
    (4, 256, False, 32, 512, "int4"),
    (4, -1, False, 32, 96, "int4"),  # per channel: kernel group 32, scales repeated
    (3, 32, True, 32, 64, "int4"),
    (2, 64, False, 32, 128, "int4"),
    (8, -1, True, 40, 64, "int8"),
    (8, -1, False, 40, 64, "int8"),
    (8, -1, False, 40, 100, "dequantize"),  # torch's int8 kernel needs K % 8 == 0 (wrong rows or a crash otherwise)
    (4, 16, False, 32, 64, "int8" if False else "dequantize"),  # group 16: no int4 kernel group
    (8, 32, False, 32, 64, "dequantize"),  # grouped 8-bit
    (4, 32, False, 24, 64, "dequantize"),  # 24 rows: the int4 kernel needs a multiple of 16
]


@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features,kind", KERNEL_CASES)
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_quant_linear_matches_dense_dequantized(bits, group_size, symmetric, out_features, in_features, kind, rows,
                                                torch_int4):
    result = _result(out_features, in_features, seed=bits * 1000 + group_size, bits=bits, group_size=group_size,
                     symmetric=symmetric)
    bias = torch.randn(out_features) * 0.1
    module = QuantLinear.from_result(result, bias, kernel_max_rows=4)
    assert module.kind == kind
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    expected = F.linear(x, result.weight, bias)
    with torch.inference_mode():
        actual = module(x)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    if kind == "dequantize":
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        _bf16_close(actual - bias, expected - bias, x, result.weight)
    # the module's own decoded weight is the grid's weight up to bf16 scales
    decoded = module.dequantized_weight()
    step = result.scale[:, result.group_index().long()]
    assert ((decoded - result.weight).abs() <= 2.0**-7 * (step * (1 << bits)) + 1e-7).all()
    # a 3-d batch takes the same path per row count
    x3 = x.reshape(1, rows, in_features)
    with torch.inference_mode():
        assert torch.equal(module(x3).reshape(rows, -1), actual)


@pytest.mark.parametrize("spec", [dict(bits=4, group_size=32), dict(bits=4, group_size=32, scale_dtype="float32"),
                                  dict(bits=8, group_size=-1), dict(bits=8, group_size=32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_a_packed_layer_keeps_its_kernel_buffers(spec, dtype):
    result = _result(32, 128, **spec)
    module = QuantLinear.from_result(result, torch.randn(32) * 0.1, kernel_max_rows=8)
    before = {name: (buf.dtype, buf.clone()) for name, buf in module.named_buffers() if name != "bias"}
    module.to(dtype)
    for name, buf in module.named_buffers():  # not re-cast (nor rounded): the kernels need them as they were
        if name == "bias":
            continue
        assert buf.dtype == before[name][0] and torch.equal(buf, before[name][1]), name
    assert module.bias.dtype == dtype  # the bias follows, as in nn.Linear
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        actual = module(x.to(dtype))
    expected = F.linear(x, result.weight, module.bias.float())
    assert actual.dtype == dtype
    assert float((actual.float() - expected).norm() / expected.norm()) < 2e-2


@pytest.mark.parametrize("spec", [dict(bits=4, group_size=32), dict(bits=8, group_size=-1)])
def test_packed_layers_take_non_contiguous_inputs(spec, torch_int4):
    result = _result(32, 64, **spec)
    module = QuantLinear.from_result(result, kernel_max_rows=8)
    assert module.kind in ("int4", "int8")
    x = torch.randn(64, 3).t()  # a transposed view, as nn.Linear accepts
    with torch.inference_mode():
        actual = module(x)
    _bf16_close(actual, F.linear(x, result.weight), x, result.weight)


def test_kernel_and_dequantized_paths_agree(torch_int4):
    result = _result(64, 256, bits=4, group_size=32, symmetric=False)
    x = torch.randn(2, 256)
    kernel = QuantLinear.from_result(result, kernel_max_rows=8)
    dense = QuantLinear.from_result(result, kernel_max_rows=0)
    with torch.inference_mode():
        a, b = kernel(x), dense(x)
    _bf16_close(a, b, x, result.weight)
    assert not torch.equal(a, b)  # the kernel really ran (bf16 activations)


def test_unpack_int4pack_reads_the_kernel_layout():
    for out_features, in_features in [(32, 64), (48, 96), (16, 32), (1536, 576)]:
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        assert torch.equal(unpack_int4pack(packed, out_features, in_features), codes.to(torch.uint8))


def test_act_order_permuted_groups_fall_back_to_dequantize():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    inputs = torch.randn(128, 64, generator=generator) * torch.linspace(0.1, 3.0, 64)
    result = gptq_quantize(weight, inputs.T @ inputs, GridSpec(bits=4, group_size=32), act_order=True,
                           static_groups=False)
    assert result.g_idx is not None
    module = QuantLinear.from_result(result)
    assert module.kind == "dequantize"
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), F.linear(x, result.weight), rtol=1e-5, atol=1e-5)


def test_packed_bytes_are_a_quarter_of_fp16_plus_scales(int4_kind):
    result = _result(256, 512, bits=4, group_size=128, symmetric=False)
    module = QuantLinear.from_result(result)
    assert module.kind == int4_kind
    nbytes = sum(t.numel() * t.element_size() for t in module.buffers())
    if int4_kind == "int4":  # 4-bit codes + a bf16 scale and offset per 128 weights
        assert nbytes == 256 * 512 // 2 + 256 * (512 // 128) * 2 * 2
    else:  # 4-bit codes + a float32 scale and a uint8 zero point per 128 weights
        assert nbytes == 256 * 512 // 2 + 256 * (512 // 128) * (4 + 1)


def _compressed_tiny(spec, seed=0):
    model = tiny_llama(seed=seed, num_hidden_layers=2)
    results = {}
    for name, module in iter_linears(model):
        result = rtn_quantize(linear_weight(module).float().clone(), spec)
        set_linear_weight(module, result.weight)
        results[name] = result
    return model, results


@pytest.mark.parametrize("spec", [GridSpec(bits=4, group_size=32), GridSpec(bits=4, group_size=32, symmetric=True),
                                  GridSpec(bits=8, group_size=-1, symmetric=True)], ids=["w4g32", "w4g32-sym", "w8"])
def test_packed_model_logits_close_to_the_dense_dequantized_model(tmp_path, spec, int4_kind):
    model, results = _compressed_tiny(spec)
    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out")
    packed, tokenizer, kinds = load_packed(out)
    assert set(kinds) == set(results)
    assert set(kinds.values()) == {"int8" if spec.bits == 8 else int4_kind}
    assert all(isinstance(packed.get_submodule(n), QuantLinear) for n in results)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(ids).logits
        prefill = packed(ids).logits  # 12 rows in one call
        # token by token through the kernels with a KV cache
        past, steps = None, []
        for position in range(ids.shape[1]):
            output = packed(ids[:, position:position + 1], cache=past, use_cache=True)
            past = output.cache
            steps.append(output.logits)
        stepped = torch.cat(steps, dim=1)
    scale = expected.abs().max().item()
    assert (prefill - expected).abs().max().item() < 0.01 * scale
    assert (stepped - expected).abs().max().item() < 0.02 * scale
    if int4_kind == "int4_avx2" and spec.bits == 4:  # float32 activations: the same model up to summation order
        assert (prefill - expected).abs().max().item() < 1e-4 * scale
        assert (stepped - expected).abs().max().item() < 1e-4 * scale
    assert torch.equal(stepped.argmax(-1), expected.argmax(-1))


def test_replace_linears_in_memory_and_load_model_runtime_packed(tmp_path, int4_kind):
    import lmshrink

    model, results = _compressed_tiny(GridSpec(bits=4, group_size=32))
    out = save_quantized(model, tiny_tokenizer(), results, tmp_path / "out")
    loaded = lmshrink.load_model(str(out), runtime="packed", progress=False)
    assert loaded.info.extra["runtime"] == "packed"
    assert isinstance(loaded.model.get_submodule("model.layers.0.mlp.down_proj"), QuantLinear)
    in_memory = tiny_llama(seed=0, num_hidden_layers=2)
    kinds = replace_linears(in_memory, results)
    assert set(kinds.values()) == {int4_kind}
    assert loaded.info.extra["packed_layers"] == {int4_kind: len(results)}
    ids = torch.randint(0, 300, (1, 1))
    with torch.inference_mode():
        torch.testing.assert_close(in_memory(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_runtime_packed_refuses_a_dense_folder(tmp_path):
    import lmshrink
    from lmshrink.core.errors import LmshrinkError

    model = tiny_llama(num_hidden_layers=1)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    with pytest.raises(LmshrinkError, match="not a compressed checkpoint"):
        lmshrink.load_model(str(tmp_path / "dense"), runtime="packed", progress=False)


@pytest.mark.parametrize("kind_spec,disable_avx2", [
    (dict(bits=4, group_size=32, scale_dtype="float16"), False),  # int4_avx2 where it builds
    (dict(bits=4, group_size=32), True),                           # torch's int4
    (dict(bits=8, group_size=-1, symmetric=True), False),          # int8
    (dict(bits=8, group_size=32), False),                          # dequantize
])
def test_quant_linear_off_the_cpu_uses_torch_operations_only(kind_spec, disable_avx2, monkeypatch):
    """On another device (CUDA for users; the meta device here, where no data exists) every kind decodes its weight
    with torch operations instead of calling a CPU-only kernel on device memory."""
    if disable_avx2:
        monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    result = rtn_quantize(torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05,
                          GridSpec(**kind_spec))
    module = QuantLinear.from_result(result, bias=torch.randn(64)).to("meta")
    for rows in (1, 40):
        y = module(torch.empty(rows, 96, device="meta"))
        assert y.shape == (rows, 64) and y.device.type == "meta"
