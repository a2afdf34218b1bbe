"""Quantization grids and int32 packing."""

import pytest
import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import (
    GridSpec,
    dequantize,
    fake_quantize,
    fit_grid,
    fit_groups,
    from_signed,
    group_index,
    quantize,
    to_signed,
)
from lmshrink.core.packing import (
    pack_gptq_qweight,
    pack_gptq_qzeros,
    pack_int32,
    packed_size,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
    unpack_int32,
)


def _weights(rows=24, cols=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_in_range_and_error_within_half_step(bits, symmetric):
    spec = GridSpec(bits=bits, group_size=64, symmetric=symmetric)
    w = _weights()
    scale, zero = fit_groups(w, spec)
    g_idx = group_index(w.shape[1], 64)
    codes = quantize(w, scale, zero, spec.maxq, g_idx)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= spec.maxq
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())
    step = scale[:, g_idx]
    err = (dequantize(codes, scale, zero, g_idx) - w).abs()
    # asymmetric: the fitted range covers every weight; symmetric clips only the largest positive value by
    # at most half a step (the grid stops at (2**(bits-1) - 1) * scale)
    assert bool((err <= 0.5 * step + 1e-6 * w.abs()).all())


def test_symmetric_grid_spans_max_abs():
    spec = GridSpec(bits=4, group_size=-1, symmetric=True)
    w = torch.tensor([[-3.0, 0.5, 1.0], [0.2, 0.4, 1.5]])
    scale, zero = fit_grid(w, spec)
    assert torch.allclose(scale, torch.tensor([6.0 / 15, 3.0 / 15]))
    assert zero.tolist() == [8, 8]
    codes = quantize(w, scale, zero, spec.maxq)
    assert codes[0, 0] == 0  # -3 / 0.4 = -7.5 rounds (half to even) to -8, the bottom of the grid
    assert float(dequantize(codes, scale, zero)[1, 2]) == pytest.approx(7 * 0.2)  # top of the grid


def test_short_last_group():
    spec = GridSpec(bits=4, group_size=128)
    w = _weights(cols=300)
    scale, zero = fit_groups(w, spec)
    assert scale.shape == (24, 3) and spec.num_groups(300) == 3
    g_idx = group_index(300, 128)
    assert (g_idx == 2).sum() == 300 - 256
    # the last group's grid is the one fitted to its 44 columns alone
    tail_scale, tail_zero = fit_grid(w[:, 256:], spec)
    assert torch.equal(scale[:, 2], tail_scale) and torch.equal(zero[:, 2], tail_zero)


def test_asymmetric_range_contains_zero_and_extremes():
    spec = GridSpec(bits=3, group_size=-1)
    w = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -0.5, -0.25]])
    q = fake_quantize(w, spec)
    # ranges become [0, 3] and [-1, 0]: the extremes are on the grid
    assert float(q[0, 2]) == pytest.approx(3.0, rel=1e-6)
    assert float(q[1, 0]) == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_clip_search_never_increases_error(symmetric, norm):
    w = _weights(rows=64, cols=128, seed=3)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    weights = torch.rand(128, generator=torch.Generator().manual_seed(1))
    base = GridSpec(bits=3, group_size=32, symmetric=symmetric, clip_norm=norm)
    clipped = GridSpec(bits=3, group_size=32, symmetric=symmetric, clip_norm=norm, clip_search=True)
    for col_weights in (None, weights):
        scale_w = torch.ones(128) if col_weights is None else col_weights
        def err(spec):
            q = fake_quantize(w, spec, col_weights)
            return ((q - w).abs() ** norm * scale_w).reshape(64, 4, 32).sum(-1)  # per row and group
        e_base, e_clip = err(base), err(clipped)
        assert bool((e_clip <= e_base * (1 + 1e-5)).all())
        assert float(e_clip.sum()) < 0.95 * float(e_base.sum())


def test_scale_dtype_rounds_scales():
    spec = GridSpec(bits=4, group_size=32, scale_dtype="float16")
    scale, _ = fit_groups(_weights(), spec)
    assert torch.equal(scale, scale.half().float())


@pytest.mark.parametrize("magnitude", [1e-4, 2e-5])
def test_float16_scales_of_small_groups_use_the_subnormal_range(magnitude):
    # scales below float16's smallest normal (6.1e-5) are representable down to 2**-24: they must not be raised to it
    weights = _weights() * magnitude
    errors = {}
    for scale_dtype in ("float32", "float16"):
        spec = GridSpec(bits=4, group_size=32, scale_dtype=scale_dtype)
        errors[scale_dtype] = float((fake_quantize(weights, spec) - weights).norm() / weights.norm())
    assert errors["float16"] < 1.1 * errors["float32"]


def test_signed_conversion_round_trip():
    codes = torch.arange(16, dtype=torch.uint8).reshape(2, 8)
    signed = to_signed(codes, 4)
    assert signed.dtype == torch.int8 and int(signed.min()) == -8 and int(signed.max()) == 7
    assert torch.equal(from_signed(signed, 4), codes)


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(group_size=0), dict(clip_max_shrink=1.5),
                                 dict(scale_dtype="int8")])
def test_invalid_spec_names_the_option(bad):
    with pytest.raises(LmshrinkError) as info:
        GridSpec(**bad)
    assert next(iter(bad)) in str(info.value)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 32), (7, 33), (3, 1), (11, 129), (64, 576)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_round_trip(bits, shape, dim):
    gen = torch.Generator().manual_seed(bits * 100 + shape[1])
    codes = torch.randint(0, 2 ** bits, shape, generator=gen).to(torch.uint8)
    packed = pack_int32(codes, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == packed_size(shape[dim], bits)
    assert packed.shape[1 - dim] == shape[1 - dim]
    assert torch.equal(unpack_int32(packed, bits, shape[dim], dim), codes)


def test_pack_layout_is_dense_little_endian():
    # 3-bit codes 0..10: element 10 starts at bit 30 and straddles words 0 and 1
    codes = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]], dtype=torch.uint8)
    packed = pack_int32(codes, 3, dim=1)
    assert packed.shape == (1, 2)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 1 | (3 << 30)
    assert int(packed[0, 1]) == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(bits)
    for shape in [(6, 100), (9, 576)]:
        codes = torch.randint(0, 2 ** bits, shape, generator=gen).to(torch.uint8)
        for dim in (0, 1):
            reference = helpers.pack_to_int32(to_signed(codes, bits), bits, packed_dim=dim)
            assert torch.equal(pack_int32(codes, bits, dim), reference)
            # unpack through dim 1 on a fresh tensor (compressed-tensors 0.20.1 fails on 4-bit strided views)
            flat = reference if dim == 1 else torch.tensor(reference.t().tolist(), dtype=torch.int32)
            back = helpers.unpack_from_int32(flat, bits, torch.Size(shape[::-1] if dim == 0 else shape))
            assert torch.equal(from_signed(back if dim == 1 else back.t(), bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v1_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (40, 96), generator=gen).to(torch.uint8)
    qweight = pack_gptq_qweight(codes, bits)
    assert qweight.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_gptq_qweight(qweight, bits, 96), codes)
    zero = torch.randint(0, 2 ** bits, (64, 3), generator=gen).to(torch.uint8)
    qzeros = pack_gptq_qzeros(zero, bits)
    assert qzeros.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_gptq_qzeros(qzeros, bits, 64), zero)
    # v1 stores zero - 1: a zero point of 8 at 4 bits is the nibble 7
    if bits == 4:
        assert int(pack_gptq_qzeros(torch.full((8, 1), 8, dtype=torch.uint8), 4)[0, 0]) == 0x77777777
