"""lmshrink's AVX2 int4 kernel (runtime/cpu_kernels.py) and the QuantLinear kind ``int4_avx2`` that runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmshrink.core.grids import GridSpec, dequantize
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.qlinear import AVX2_KERNEL_MAX_ROWS, DEFAULT_KERNEL_MAX_ROWS, QuantLinear

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"AVX2 int4 kernel unavailable: {cpu_kernels.kernel_status()}")

U = 2.0**-24  # float32 unit roundoff


def _fp32_bound(x, codes, scale, zero, g_idx, bias):
    """Forward-error bound of an fp32 evaluation of sum_k x_k (q_k - z_g) s_g (+ b), any summation order.

    The kernel forms sum_g s_g * sum_k q_k x_k - sum_g s_g z_g * sum_k x_k: every term passes through at most
    K + G + 8 roundings, so |error| <= gamma * sum_k |x_k| |s_g| (|q_k| + |z_g|) + gamma * |y|, with gamma = n u / (1 - n u).
    """
    s = scale.double()[:, g_idx]
    q = codes.double()
    z = zero.double()[:, g_idx]
    n = x.shape[1] + scale.shape[1] + 16
    gamma = n * U / (1 - n * U)
    magnitude = x.double().abs() @ (s.abs() * (q.abs() + z.abs())).t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return gamma * magnitude


def _check(y, x, result, bias):
    weight = dequantize(result.codes, result.scale, result.zero, result.group_index()).double()
    ref = x.double() @ weight.t()
    if bias is not None:
        ref = ref + bias.double()
    bound = _fp32_bound(x, result.codes, result.scale, result.zero, result.group_index().long(), bias)
    err = (y.double() - ref).abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    excess = (err - bound).max().item()
    assert excess <= 0, f"error exceeds the fp32 summation bound by {excess} (max error {err.max().item()})"


def _result(out_features, in_features, bits, group_size, symmetric, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return rtn_quantize(weight, GridSpec(bits=bits, group_size=group_size, symmetric=symmetric))


SHAPES = [
    # (out, in, group)
    (576, 576, 32),     # SmolLM2 q/o
    (40, 200, 32),      # K not a multiple of 64 or 256: a last block of 8 columns (zero padded)
    (13, 96, 64),       # N odd, last group of 32 columns
    (37, 576, 128),     # 576 with g128: a shorter last group
    (24, 320, 256),
    (9, 70, -1),        # per row, K not a multiple of 32
    (64, 1536, -1),
]


@needs_kernel
@pytest.mark.parametrize("out_features,in_features,group_size", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False), (2, True)])
def test_kernel_within_the_fp32_bound(out_features, in_features, group_size, bits, symmetric):
    result = _result(out_features, in_features, bits, group_size, symmetric, seed=out_features + bits)
    packed = cpu_kernels.pack(result.codes, result.scale, result.zero, result.spec.group_width(in_features))
    assert torch.equal(cpu_kernels.unpack_codes(packed.codes, in_features), result.codes)
    # both decoders give the grid's weight bit for bit
    bpg = packed.blocks_per_group
    assert torch.equal(cpu_kernels.dequantize_packed(packed.codes, packed.scales, packed.zeros, in_features, bpg),
                       result.weight)
    assert torch.equal(cpu_kernels.int4_dequantize(packed.codes, packed.scales, packed.zeros, in_features,
                                                   packed.groups, bpg), result.weight)
    generator = torch.Generator().manual_seed(in_features)
    bias = torch.randn(out_features, generator=generator) * 0.1
    for rows in (1, 2, 3, 4, 5, 8, 11):
        x = torch.randn(rows, in_features, generator=generator) * 3
        for b in (None, bias):
            y = cpu_kernels.int4_linear(x, packed.codes, packed.scales, packed.zeros, b, packed.groups,
                                        packed.blocks_per_group)
            _check(y, x, result, b)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_threads_give_the_same_result(threads):
    result = _result(1536, 576, 4, 32, False)
    packed = cpu_kernels.pack(result.codes, result.scale, result.zero, 32)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_kernels.int4_linear(x, packed.codes, packed.scales, packed.zeros, None, packed.groups, 1)
        torch.set_num_threads(threads)
        y = cpu_kernels.int4_linear(x, packed.codes, packed.scales, packed.zeros, None, packed.groups, 1)
    finally:
        torch.set_num_threads(before)
    _check(y, x, result, None)
    assert torch.equal(y, single)  # each output is computed by one thread in the same order


@needs_kernel
def test_kernel_refuses_mismatched_inputs():
    result = _result(16, 64, 4, 32, False)
    packed = cpu_kernels.pack(result.codes, result.scale, result.zero, 32)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.int4_linear(torch.randn(1, 96), packed.codes, packed.scales, packed.zeros, None, 2, 1)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.int4_linear(torch.randn(1, 64).double(), packed.codes, packed.scales, packed.zeros, None, 2, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.pack(result.codes, result.scale, result.zero, 16)


@needs_kernel
@pytest.mark.parametrize("bits,group_size,symmetric,out_features,in_features", [
    (4, 32, False, 64, 128), (4, 32, True, 24, 64), (4, 128, False, 32, 576), (3, 64, False, 17, 192),
    (2, 32, True, 32, 64), (4, -1, False, 8, 100)])
def test_quant_linear_int4_avx2(bits, group_size, symmetric, out_features, in_features):
    result = _result(out_features, in_features, bits, group_size, symmetric, seed=7)
    bias = torch.randn(out_features) * 0.1
    module = QuantLinear.from_result(result, bias, kernel_max_rows=8)
    assert module.kind == "int4_avx2"
    assert "kind=int4_avx2" in repr(module)
    assert QuantLinear.from_result(result).kernel_max_rows == AVX2_KERNEL_MAX_ROWS  # its measured crossover
    # the decoded weight is the grid's weight, bit for bit
    assert torch.equal(module.dequantized_weight(), result.weight)
    with torch.inference_mode():
        for rows in (1, 4, 8, 9, 40):  # 9 and 40 rows: decoded weight + F.linear
            x = torch.randn(2, rows, in_features)
            y = module(x)
            assert y.shape == (2, rows, out_features) and y.dtype == torch.float32
            _check(y.reshape(-1, out_features)[:rows], x[0], result, bias)
            if rows > 8:
                expected = F.linear(x.reshape(-1, in_features), result.weight, bias).reshape(y.shape)
                torch.testing.assert_close(y, expected, rtol=0, atol=0)
        # other activation dtypes go through float32 and back
        xb = torch.randn(1, in_features).to(torch.bfloat16)
        assert module(xb).dtype == torch.bfloat16


@needs_kernel
def test_layers_the_kernel_does_not_take_keep_their_kinds():
    group16 = _result(32, 64, 4, 16, False)
    assert QuantLinear.from_result(group16).kind == "dequantize"
    w8 = _result(40, 64, 8, -1, True)
    assert QuantLinear.from_result(w8).kind == "int8"
    assert QuantLinear.from_result(_result(32, 64, 4, 32, False), kernels=False).kind == "dequantize"


def test_disabled_by_the_environment_variable(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert not cpu_kernels.available()
    assert cpu_kernels.kernel_status() == f"disabled by {cpu_kernels.ENV_VAR}=0"
    result = _result(32, 64, 4, 32, False)
    module = QuantLinear.from_result(result)
    assert module.kind == "int4" and module.kernel_max_rows == DEFAULT_KERNEL_MAX_ROWS  # torch's kernel, as before
    x = torch.randn(1, 64)
    with torch.inference_mode():
        y = module(x)
    assert (y - F.linear(x, result.weight)).abs().max().item() < 0.05 * F.linear(x, result.weight).abs().max().item()


def test_status_explains_itself():
    status = cpu_kernels.kernel_status()
    assert status == "ready" or status.startswith(("not built:", "disabled by"))
    assert cpu_kernels.available() == (status == "ready")


@needs_kernel
def test_kernel_takes_any_leading_dimensions():
    result = _result(24, 96, 4, 32, False)
    packed = cpu_kernels.pack(result.codes, result.scale, result.zero, 32)
    x = torch.randn(2, 3, 96)
    args = (packed.codes, packed.scales, packed.zeros, None, packed.groups, 1)
    y = cpu_kernels.int4_linear(x, *args)
    assert y.shape == (2, 3, 24)
    assert torch.equal(y.reshape(6, 24), cpu_kernels.int4_linear(x.reshape(6, 96), *args))
    assert cpu_kernels.int4_linear(torch.randn(0, 96), *args).shape == (0, 24)
    assert cpu_kernels.ready()


# -- int8 activations (q8_0) and the q8_0 lm_head kernel ----------------------------------------------------------


def test_activation_rounding_is_per_block_of_32():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 70, generator=generator)
    x[1, 32:64] = 0  # an all-zero block stays zero
    rounded = cpu_kernels.quantize_activations_q8(x)
    assert rounded.shape == x.shape
    for start in range(0, 70, 32):
        block, got = x[:, start:start + 32], rounded[:, start:start + 32]
        d = block.abs().amax(dim=1, keepdim=True) / 127
        assert torch.all((got - block).abs() <= d / 2 * (1 + 1e-6) + 1e-12)  # round to nearest
        codes = torch.where(d > 0, got / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(got))
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # on the grid of d
        assert codes.abs().max() <= 127 + 1e-4
    assert torch.all(rounded[1, 32:64] == 0)


@needs_kernel
@pytest.mark.parametrize("out_features,in_features,group_size", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_int8_activation_kernel_is_the_product_with_rounded_activations(out_features, in_features, group_size, rows):
    result = _result(out_features, in_features, 4, group_size, False, seed=rows)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    packed = cpu_kernels.pack(result.codes, result.scale, result.zero, result.spec.group_width(in_features))
    y = cpu_kernels.int4_linear_q8(x, packed.codes, packed.scales, packed.zeros, bias, packed.groups,
                                   packed.blocks_per_group)
    # exactly x^ @ W.T (+ b) up to float32 summation, x^ the rounded activations
    _check(y, cpu_kernels.quantize_activations_q8(x), result, bias)
    # and not the float32 product: the rounding is real (its error is far above the summation bound)
    exact = cpu_kernels.int4_linear(x, packed.codes, packed.scales, packed.zeros, bias, packed.groups,
                                    packed.blocks_per_group)
    assert (y - exact).abs().max() > 1e-4


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(100, 576), (7, 70), (33, 32), (5, 1)])
def test_q8_linear_is_the_product_of_the_rounded_weight_and_activations(out_features, in_features):
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(2, in_features, generator=generator)
    codes, scales = cpu_kernels.quantize_q8_rows(weight)
    blocks = -(-in_features // 32)
    assert codes.shape == (out_features, blocks * 32) and scales.shape == (out_features, blocks)
    rounded_w = (codes.double().view(out_features, blocks, 32) * scales.double()[..., None]).view(out_features, -1)
    rounded_w = rounded_w[:, :in_features]
    assert (rounded_w - weight.double()).abs().max() <= scales.max() / 2 + 1e-7
    rounded_x = cpu_kernels.quantize_activations_q8(x).double()
    ref = rounded_x @ rounded_w.t()
    y = cpu_kernels.q8_linear(x, codes, scales)
    n = in_features + 2 * blocks + 8
    bound = n * U / (1 - n * U) * (rounded_x.abs() @ rounded_w.abs().t())
    assert y.shape == (2, out_features) and torch.all((y.double() - ref).abs() <= bound + 1e-30)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.q8_linear(torch.randn(1, in_features + 40), codes, scales)


@needs_kernel
@pytest.mark.parametrize("out_features,in_features,group_size", [(40, 200, 32), (37, 576, 128), (9, 70, -1)])
def test_float16_scales_compute_exactly_what_float32_ones_do(out_features, in_features, group_size):
    spec = GridSpec(bits=4, group_size=group_size, scale_dtype="float16")
    generator = torch.Generator().manual_seed(2)
    result = rtn_quantize(torch.randn(out_features, in_features, generator=generator) * 0.05, spec)
    width = spec.group_width(in_features)
    packed = cpu_kernels.pack(result.codes, result.scale, result.zero, width)
    assert packed.scales.dtype == torch.float16  # exactly float16 values: kept in 2 bytes
    wide = packed.scales.float()
    x = torch.randn(3, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    for op in (cpu_kernels.int4_linear, cpu_kernels.int4_linear_q8):
        half = op(x, packed.codes, packed.scales, packed.zeros, bias, packed.groups, packed.blocks_per_group)
        full = op(x, packed.codes, wide, packed.zeros, bias, packed.groups, packed.blocks_per_group)
        assert torch.equal(half, full)
    weight = cpu_kernels.int4_dequantize(packed.codes, packed.scales, packed.zeros, in_features, packed.groups,
                                         packed.blocks_per_group)
    assert weight.dtype == torch.float32 and torch.equal(weight, result.weight)
    # the torch-only decoder (used off the CPU) gives the same weight
    assert torch.equal(cpu_kernels.dequantize_packed(packed.codes, packed.scales, packed.zeros, in_features,
                                                     packed.blocks_per_group), result.weight)
    # scales that float16 cannot hold exactly stay float32
    other = cpu_kernels.pack(result.codes, result.scale.float() * (1 + 2.0**-20), result.zero, width)
    assert other.scales.dtype == torch.float32
