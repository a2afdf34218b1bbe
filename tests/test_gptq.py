"""The shared OBS column solver, GPTQ and RTN on single random linear layers."""

import pytest
import torch

from lmshrink.core.grids import GridSpec, dequantize, fit_groups, group_index
from lmshrink.engine.statistics import HessianAccumulator
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.methods.solver import SolverError, output_error


def _layer(out=64, inp=96, samples=600, seed=0):
    """Weights and correlated inputs X = Z @ A (a random mixing matrix), with H = X^T X."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=gen) / inp ** 0.5
    x = torch.randn(samples, inp, generator=gen) @ mixing
    x = x * torch.linspace(0.2, 3.0, inp)  # uneven input scales give act-order something to do
    weight = torch.randn(out, inp, generator=gen) * 0.05
    return weight, x, x.t() @ x


def _output_error(weight, q, x):
    return float(((weight - q) @ x.t()).square().sum() / (weight @ x.t()).square().sum())


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order,static,bound", [(False, False, 0.85), (True, False, 0.5), (True, True, 0.5)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order, static, bound):
    weight, x, hessian = _layer()
    spec = GridSpec(bits=bits, group_size=32)
    rtn = rtn_quantize(weight, spec, hessian)
    gptq = gptq_quantize(weight, hessian, spec, act_order=act_order, static_groups=static)
    rtn_err, gptq_err = _output_error(weight, rtn.weight, x), _output_error(weight, gptq.weight, x)
    # input scales grow along the columns: plain GPTQ visits the important columns last, act-order first
    assert gptq_err < bound * rtn_err
    # the error reported from H equals the one measured on the outputs
    assert gptq.rel_output_error == pytest.approx(gptq_err, rel=1e-3)
    assert rtn.rel_output_error == pytest.approx(rtn_err, rel=1e-3)


@pytest.mark.parametrize("static", [True, False])
def test_act_order_codes_decode_with_their_group(static):
    weight, _, hessian = _layer(inp=100)  # 100 columns, groups of 32: a short last group
    spec = GridSpec(bits=4, group_size=32, symmetric=not static)
    result = gptq_quantize(weight, hessian, spec, act_order=True, static_groups=static)
    g_idx = result.group_index()
    assert result.scale.shape == (64, 4) and int(result.codes.max()) <= 15
    assert torch.equal(dequantize(result.codes, result.scale, result.zero, g_idx), result.weight)
    counts = torch.bincount(g_idx.long(), minlength=4).tolist()
    assert counts == [32, 32, 32, 4]
    if static:
        # static groups: contiguous groups, grids fitted on the original weights before the sweep
        assert result.g_idx is None
        assert torch.equal(g_idx, group_index(100, 32))
        scale, zero = fit_groups(weight, spec)
        assert torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
    else:
        # groups follow the act-order sweep: the first group holds the 32 columns of largest H_ii
        assert result.g_idx is not None
        first = set(torch.argsort(hessian.diagonal(), descending=True)[:32].tolist())
        assert set(torch.nonzero(g_idx == 0).flatten().tolist()) == first


def _obs_reference(weight, hessian, spec, order, damp_percent=0.01):
    """Plain optimal-brain-surgeon quantization with explicit inverses of the remaining columns' Hessian."""
    w = weight.double().clone()
    h = hessian.double() + damp_percent * hessian.diagonal().mean().double() * torch.eye(len(hessian))
    scale, zero = fit_groups(weight, spec)
    g_idx = group_index(weight.shape[1], spec.group_size)
    remaining = list(order)
    q_all = torch.zeros_like(w)
    for col in order:
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        s, z = scale[:, g_idx[col]].double(), zero[:, g_idx[col]].double()
        q = (torch.clamp(torch.round(w[:, col] / s) + z, 0, spec.maxq) - z) * s
        q_all[:, col] = q
        err = (w[:, col] - q) / hinv[0, 0]
        w[:, remaining] -= torch.outer(err, hinv[0])
        remaining.pop(0)
    return q_all.float()


@pytest.mark.parametrize("act_order", [False, True])
def test_solver_matches_plain_obs(act_order):
    weight, _, hessian = _layer(out=16, inp=48, samples=300, seed=1)
    spec = GridSpec(bits=4, group_size=16)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True).tolist() if act_order else range(48)
    reference = _obs_reference(weight, hessian, spec, list(order))
    result = gptq_quantize(weight, hessian, spec, block_size=16, act_order=act_order, static_groups=True)
    # same grid points everywhere but at rare rounding ties
    same = (result.weight - reference).abs() < 1e-6
    assert float(same.float().mean()) > 0.995


@pytest.mark.parametrize("static", [True, False])
def test_lazy_block_size_does_not_change_result(static):
    # groups of 24 straddle blocks of 32: the non-static fit must see the pending updates too
    weight, _, hessian = _layer(out=32, inp=96, seed=2)
    spec = GridSpec(bits=3, group_size=24)
    a = gptq_quantize(weight, hessian, spec, block_size=32, act_order=True, static_groups=static)
    b = gptq_quantize(weight, hessian, spec, block_size=96, act_order=True, static_groups=static)
    assert float((a.codes == b.codes).float().mean()) > 0.995
    assert a.rel_output_error == pytest.approx(b.rel_output_error, rel=1e-3)


def test_indefinite_hessian_raises_damping_and_records_it():
    weight, x, _ = _layer(inp=64, samples=40)  # fewer samples than inputs: singular X^T X
    hessian = x.t() @ x
    mean_diag = float(hessian.diagonal().mean())
    hessian -= 0.3 * mean_diag * torch.eye(64)  # smallest eigenvalue -0.3 * mean: 1% and 10% damping fail
    result = gptq_quantize(weight, hessian, GridSpec(bits=4, group_size=32))
    assert result.info["damp_retries"] == 2
    assert result.info["damp_percent"] == pytest.approx(1.0)
    assert bool(torch.isfinite(result.weight).all())


def test_hopeless_hessian_fails_with_a_fix():
    weight = torch.randn(8, 16)
    with pytest.raises(SolverError) as info:
        gptq_quantize(weight, -torch.eye(16), GridSpec(bits=4, group_size=-1))
    assert "damp_percent" in str(info.value)


def test_dead_inputs_are_zeroed():
    weight, x, _ = _layer(inp=64)
    x[:, [3, 40]] = 0.0
    hessian = x.t() @ x
    result = gptq_quantize(weight, hessian, GridSpec(bits=4, group_size=32))
    assert result.info["dead_columns"] == 2
    assert bool((result.weight[:, [3, 40]] == 0).all())
    # dead inputs do not count in the output error
    assert result.rel_output_error == pytest.approx(_output_error(weight, result.weight, x), rel=1e-3)


def test_hessian_accumulator_running_average():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 8, generator=gen)
    acc = HessianAccumulator(8)
    acc.add_batch(x[:2])
    acc.add_batch(x[2:5])
    acc.add_batch(x[5].reshape(10, 8))  # a 2-D input is one sample
    flat = x.reshape(-1, 8)
    assert acc.nsamples == 6 and acc.tokens == 60
    assert torch.allclose(acc.hessian, 2.0 / 6 * flat.t() @ flat, rtol=1e-5, atol=1e-5)
    masked = HessianAccumulator(8)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:, :4] = True
    masked.add_batch(x, mask)
    kept = x[:, :4].reshape(-1, 8)
    assert masked.tokens == 24
    assert torch.allclose(masked.hessian, 2.0 / 6 * kept.t() @ kept, rtol=1e-5, atol=1e-5)


def test_clip_search_lowers_gptq_error_at_3_bits():
    weight, x, hessian = _layer(seed=4)
    weight[:, 5] *= 6.0  # a heavy column makes min-max grids coarse
    plain = gptq_quantize(weight, hessian, GridSpec(bits=3, group_size=32))
    clipped = gptq_quantize(weight, hessian, GridSpec(bits=3, group_size=32, clip_search=True))
    assert clipped.rel_output_error < plain.rel_output_error


def test_output_error_formula():
    weight, x, hessian = _layer()
    q = weight + 0.01 * torch.randn_like(weight)
    assert output_error(weight, q, hessian) == pytest.approx(_output_error(weight, q, x), rel=1e-4)


@pytest.mark.parametrize("act_order,static", [(False, True), (True, True), (True, False)])
def test_fixed_grid_rule_reproduces_gptq_codes(act_order, static):
    """A GridRule given a layer's grid (scale, zero, g_idx) fits nothing: the sweep on the same weights and Hessian
    chooses exactly the codes GPTQ chose on that grid (with act-order and sweep-order groups, a permuted g_idx)."""
    from lmshrink.methods.quant.gptq import GridRule
    from lmshrink.methods.solver import solve_columns

    weight, _, hessian = _layer(inp=100, seed=2)
    spec = GridSpec(bits=3, group_size=32, clip_search=True)
    result = gptq_quantize(weight, hessian, spec, act_order=act_order, static_groups=static)
    assert (result.g_idx is not None) == (act_order and not static)
    rule = GridRule(spec, grid=(result.scale, result.zero, result.group_index()))
    solved = solve_columns(weight, hessian, rule, act_order=act_order)
    codes = rule.codes if solved.perm is None else rule.codes[:, torch.argsort(solved.perm)]
    assert torch.equal(codes, result.codes)
    assert torch.equal(solved.weight, result.weight)
    with pytest.raises(ValueError, match="does not fit"):
        solve_columns(weight[:, :96], hessian[:96, :96],
                      GridRule(spec, grid=(result.scale, result.zero, result.group_index())))
