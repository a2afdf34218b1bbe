"""Int8Linear (W8A8 with integer products): the activation codes equal the reference quantizer's, every kernel
matches the float product of the decoded operands within the float rounding of the final products, and layers that
do not fit are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmshrink.core.actquant import ActSpec, fake_quantize_activations
from lmshrink.core.errors import LmshrinkError
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.int8 import Int8Linear, has_vnni, onednn_available

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"AVX2 kernel: {cpu_kernels.kernel_status()}")
GEN = torch.Generator().manual_seed(0)


def _layer(n=48, k=96, seven=True, spec=ActSpec(), bias=True, kernels=True, x=None):
    limit = 64 if seven else 127
    codes = torch.randint(-limit, limit + 1, (n, k), generator=GEN, dtype=torch.int8)
    scale = torch.rand(n, generator=GEN) * 0.01 + 0.001
    b = torch.randn(n, generator=GEN) if bias else None
    input_scale = None if spec.dynamic else (2 * x.abs().max() / 255).reshape(1)
    return Int8Linear.from_codes(codes, scale, b, spec, input_scale, kernels=kernels), codes, scale, b


def _reference(x, layer, codes, scale, bias):
    xq = fake_quantize_activations(x, layer.input_spec, getattr(layer, "input_scale", None))
    return F.linear(xq.double(), (codes.double() * scale.double()[:, None]),
                    None if bias is None else bias.double())


def _bound(x, layer, codes, scale):
    """Float32 rounding of the final products: a few ulps of the largest partial sum of |x^| |W|."""
    xq = fake_quantize_activations(x, layer.input_spec, getattr(layer, "input_scale", None))
    return 8 * torch.finfo(torch.float32).eps * (xq.abs().double() @ (codes.abs().double() * scale.double()[:, None]).t())


@needs_kernel
def test_activation_codes_are_the_reference_quantizers():
    x = torch.randn(7, 100, generator=GEN) * torch.logspace(-2, 2, 100)
    for static, spec in ((0.0, ActSpec()), (0.05, ActSpec(granularity="tensor", dynamic=False)),
                         (0.0, ActSpec(clip_ratio=0.9))):
        codes, scales = cpu_kernels._module.quantize_rows_u8(x, static, spec.clip_ratio)
        assert codes.shape == (7, 128) and bool((codes[:, 100:] == 128).all())
        decoded = (codes[:, :100].float() - 128) * scales[:, None]
        reference = fake_quantize_activations(x, spec, torch.tensor([static]) if static else None)
        assert torch.equal(decoded, reference)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("seven", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_matches_the_float_product_within_rounding(rows, seven, static):
    x = torch.randn(rows, 96, generator=GEN) * 2
    spec = ActSpec(granularity="tensor", dynamic=False) if static else ActSpec()
    layer, codes, scale, bias = _layer(seven=seven, spec=spec, x=x)
    y = layer(x)
    reference = _reference(x, layer, codes, scale, bias)
    assert bool(((y.double() - reference).abs() <= _bound(x, layer, codes, scale) + 1e-6).all())
    # the path taken: oneDNN for long inputs where its products are exact, the AVX2 row kernel otherwise
    assert layer.row_kernel == "avx2"
    if onednn_available():  # oneDNN's products are exact for 7-bit weights, or with VNNI
        assert layer.kernel == ("onednn" if seven or has_vnni() else "float")


@needs_kernel
def test_shared_inputs_are_quantized_once_and_changes_are_seen():
    x = torch.randn(20, 96, generator=GEN)
    a, codes_a, scale_a, bias_a = _layer()
    b, codes_b, scale_b, bias_b = _layer()
    ya, yb = a(x), b(x)  # the second call reuses the first's codes
    torch.testing.assert_close(yb.double(), _reference(x, b, codes_b, scale_b, bias_b), rtol=1e-5, atol=1e-4)
    x.mul_(3)  # an in-place change bumps the version: codes are recomputed
    torch.testing.assert_close(a(x).double(), _reference(x, a, codes_a, scale_a, bias_a), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(a(x), ya)


def test_without_kernels_it_computes_the_reference():
    x = torch.randn(4, 96, generator=GEN)
    layer, codes, scale, bias = _layer(kernels=False)
    assert layer.kernel == layer.row_kernel == "float"
    torch.testing.assert_close(layer(x).double(), _reference(x, layer, codes, scale, bias), rtol=1e-5, atol=1e-5)


def test_layers_that_do_not_fit_are_refused():
    codes = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(LmshrinkError, match="not symmetric int8"):
        Int8Linear.from_codes(codes, torch.ones(8), None, ActSpec(bits=4))
    with pytest.raises(LmshrinkError, match="per token \\(dynamic\\) or per tensor \\(static\\)"):
        Int8Linear.from_codes(codes, torch.ones(8), None, ActSpec(granularity="group", group_size=8))
    with pytest.raises(LmshrinkError, match="needs its input_scale"):
        Int8Linear.from_codes(codes, torch.ones(8), None, ActSpec(granularity="tensor", dynamic=False))


@needs_kernel
def test_inference_mode_inputs_are_shared_by_identity():
    a, codes_a, scale_a, bias_a = _layer()
    b, codes_b, scale_b, bias_b = _layer()
    with torch.inference_mode():
        x = torch.randn(20, 96, generator=GEN)
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb.double(), _reference(x, b, codes_b, scale_b, bias_b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ya.double(), _reference(x, a, codes_a, scale_a, bias_a), rtol=1e-5, atol=1e-4)
