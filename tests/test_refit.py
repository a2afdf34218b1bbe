"""Least-squares scales after the GPTQ sweep (methods/quant/refit.py)."""

import pytest
import torch

from lmshrink.core.grids import GridSpec, dequantize
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.refit import refit_scales
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.methods.solver import output_error


def _layer(out=48, inp=96, samples=800, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=gen) / inp ** 0.5
    x = torch.randn(samples, inp, generator=gen) @ mixing * torch.linspace(0.2, 3.0, inp)
    return torch.randn(out, inp, generator=gen) * 0.05, x.t() @ x


def _direct_optimum(weight, result, hessian):
    """Per row, the exact least-squares scales by brute-force linear algebra (no batching tricks)."""
    g_idx = result.group_index().long()
    groups = result.scale.shape[1]
    best = []
    for r in range(weight.shape[0]):
        d = result.codes[r].double() - result.zero[r].double()[g_idx]
        a = torch.zeros(weight.shape[1], groups, dtype=torch.float64)
        a[torch.arange(weight.shape[1]), g_idx] = d
        h = hessian.double()
        best.append(torch.linalg.solve(a.t() @ h @ a, a.t() @ h @ weight[r].double()))
    return torch.stack(best).float()


@pytest.mark.parametrize("bits,symmetric,act_order", [(4, False, True), (3, False, False), (3, True, True)])
def test_refit_finds_the_least_squares_scales_and_never_raises_the_error(bits, symmetric, act_order):
    weight, hessian = _layer()
    spec = GridSpec(bits=bits, group_size=32, symmetric=symmetric, clip_search=True)  # float32 scales
    result = gptq_quantize(weight, hessian, spec, act_order=act_order, static_groups=act_order)
    codes, zero, before = result.codes.clone(), result.zero.clone(), output_error(weight, result.weight, hessian)
    info = refit_scales(result, weight, hessian, ridge=0.0)
    assert torch.equal(result.codes, codes) and torch.equal(result.zero, zero)
    assert torch.equal(result.weight, dequantize(result.codes, result.scale, result.zero, result.group_index()))
    after = output_error(weight, result.weight, hessian)
    assert after < before and info["rel_output_error_before_refit"] == pytest.approx(before, rel=1e-5)
    assert result.rel_output_error == pytest.approx(after, rel=1e-4)
    expected = _direct_optimum(weight, result, hessian)
    changed = ~torch.isclose(result.scale, expected, rtol=1e-3, atol=0).all(dim=1)
    assert int(changed.sum()) == weight.shape[0] - info["refit_rows"]  # rows not refitted kept their old scales


def test_refit_rounds_scales_to_the_stored_dtype_and_keeps_degenerate_groups():
    weight, hessian = _layer(seed=1)
    weight[:, :32] = 0.0  # a whole group of zeros: its codes all equal the zero point
    spec = GridSpec(bits=4, group_size=32, symmetric=True, clip_search=True, scale_dtype="float16")
    result = rtn_quantize(weight, spec, hessian)
    old = result.scale.clone()
    refit_scales(result, weight, hessian)
    assert torch.equal(result.scale, result.scale.half().float())
    assert torch.equal(result.scale[:, 0], old[:, 0])
    assert bool((result.scale > 0).all())
