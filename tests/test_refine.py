"""Coordinate descent on the codes after the GPTQ sweep (methods/quant/refine.py)."""

import pytest
import torch

from lmshrink.core.grids import GridSpec, dequantize
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.refine import coordinate_descent
from lmshrink.methods.solver import output_error


def _layer(out=48, inp=96, samples=800, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=gen) / inp ** 0.5
    x = torch.randn(samples, inp, generator=gen) @ mixing * torch.linspace(0.2, 3.0, inp)
    return torch.randn(out, inp, generator=gen) * 0.05, x.t() @ x


def _damped_objective(weight, quantized, hessian, damp_percent=0.01):
    h = hessian.double().clone()
    h.diagonal().add_(damp_percent * float(h.diagonal().mean()))
    diff = weight.double() - quantized.double()
    return float(((diff @ h) * diff).sum())


def _brute_force_column(weight, result, hessian, j, damp_percent=0.01):
    """For column j with every other column fixed: the grid point of each row with the lowest damped objective,
    found by trying every code."""
    g = result.group_index().long()[j]
    scale, zero = result.scale[:, g].float(), result.zero[:, g].float()
    best_codes = []
    for r in range(weight.shape[0]):
        values = []
        for code in range(result.spec.maxq + 1):
            q = result.weight.clone()
            q[r, j] = (code - zero[r]) * scale[r]
            values.append(_damped_objective(weight[r:r + 1], q[r:r + 1], hessian, damp_percent))
        best_codes.append(min(range(len(values)), key=values.__getitem__))
    return torch.tensor(best_codes)


@pytest.mark.parametrize("bits,symmetric,act_order", [(4, False, True), (3, False, False), (3, True, True)])
def test_descent_lowers_the_damped_objective_pass_by_pass_and_keeps_the_grid(bits, symmetric, act_order):
    weight, hessian = _layer()
    spec = GridSpec(bits=bits, group_size=32, symmetric=symmetric, clip_search=True)
    result = gptq_quantize(weight, hessian, spec, act_order=act_order, static_groups=act_order)
    scale, zero, g_idx = result.scale.clone(), result.zero.clone(), result.g_idx
    values = [_damped_objective(weight, result.weight, hessian)]
    errors = [output_error(weight, result.weight, hessian)]
    for _ in range(3):
        info = coordinate_descent(result, weight, hessian, passes=1)
        values.append(_damped_objective(weight, result.weight, hessian))
        errors.append(output_error(weight, result.weight, hessian))
        assert info["cd_passes"] == 1
    assert all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:]))
    assert values[-1] < values[0] * 0.99  # the sweep's greedy solution is not a coordinate-wise optimum
    assert errors[-1] < errors[0]
    assert torch.equal(result.scale, scale) and torch.equal(result.zero, zero) and result.g_idx is g_idx
    assert torch.equal(result.weight, dequantize(result.codes, result.scale, result.zero, result.group_index()))
    assert result.rel_output_error == pytest.approx(errors[-1], rel=1e-5)


def test_each_step_is_the_exact_minimiser_on_the_grid():
    """After a pass, no single code can be changed to lower the objective for the last column (its step was
    taken with every other column final)."""
    weight, hessian = _layer(out=6, inp=40, seed=2)
    spec = GridSpec(bits=3, group_size=8, clip_search=False)
    result = gptq_quantize(weight, hessian, spec, act_order=False, static_groups=False)
    coordinate_descent(result, weight, hessian, passes=1, block_size=16)
    last = weight.shape[1] - 1
    assert torch.equal(result.codes[:, last].long(), _brute_force_column(weight, result, hessian, last))


def test_kept_entries_do_not_change_and_descent_stops_when_nothing_moves():
    weight, hessian = _layer(seed=3)
    spec = GridSpec(bits=4, group_size=32, clip_search=True)
    result = gptq_quantize(weight, hessian, spec)
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    codes = result.codes.clone()
    info = coordinate_descent(result, weight, hessian, passes=50, keep=keep)
    assert torch.equal(result.codes[keep], codes[keep])
    assert info["cd_changed_codes"] > 0 and info["cd_passes"] < 50  # converged: a pass changed nothing
    again = coordinate_descent(result, weight, hessian, passes=3, keep=keep)
    assert again["cd_passes"] == 1 and again["cd_changed_codes"] == 0


def test_descent_uses_the_damping_the_sweep_finally_used():
    weight, hessian = _layer(out=16, inp=64, samples=40)  # fewer samples than inputs: singular X^T X
    hessian -= 0.3 * float(hessian.diagonal().mean()) * torch.eye(64)  # 1% and 10% damping fail: the sweep uses 100%
    result = gptq_quantize(weight, hessian, GridSpec(bits=3, group_size=32))
    assert result.info["damp_percent"] == pytest.approx(1.0)
    before = _damped_objective(weight, result.weight, hessian, damp_percent=1.0)
    summary = coordinate_descent(result, weight, hessian, passes=4)
    assert summary["cd_damp_percent"] == pytest.approx(1.0)
    assert summary["cd_changed_codes"] > 0
    # with 1% damping this Hessian is indefinite and steps need not lower anything; with the sweep's 100% they do
    assert _damped_objective(weight, result.weight, hessian, damp_percent=1.0) < before


def test_engine_stage_option_descends_after_the_sweep_and_keeps_pruned_zeros():
    """``descent_passes`` on a GPTQ stage: block 0's first group (same inputs with and without the option) gets a
    lower error than the plain sweep; every layer records its passes; a pruned layer keeps exactly its zeros."""
    import copy

    from helpers import tiny_llama

    from lmshrink.engine.loop import Engine
    from lmshrink.models.adapters import get_adapter
    from lmshrink.pipeline.recipe import parse_recipe

    calib = torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(0))

    def run(model, stages):
        return Engine(model, get_adapter(model), parse_recipe(stages), calib, progress=False, batch_size=2).run()

    base = tiny_llama(num_hidden_layers=2)
    gptq = {"method": "gptq", "bits": 3, "group_size": 32}
    plain = run(copy.deepcopy(base), [gptq])
    descended = run(copy.deepcopy(base), [{**gptq, "descent_passes": 2}])
    q0 = "model.layers.0.self_attn.q_proj"
    assert descended.results[q0].rel_output_error < plain.results[q0].rel_output_error
    assert all(r["cd_passes"] >= 1 and r["rel_output_error_before_cd"] is not None for r in descended.layers)
    pruned = run(copy.deepcopy(base), [{"method": "sparsegpt", "sparsity": 0.5},
                                       {**gptq, "descent_passes": 2}])
    mask_only = run(copy.deepcopy(base), [{"method": "sparsegpt", "sparsity": 0.5}])
    first_group = [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]  # the same inputs, so the same mask
    for name in first_group:
        zeros = mask_only.results[name].weight == 0
        assert float(zeros.float().mean()) == pytest.approx(0.5, abs=0.01)
        assert bool((pruned.results[name].weight[zeros] == 0).all()), name
    assert pruned.results[first_group[0]].info["cd_changed_codes"] > 0
