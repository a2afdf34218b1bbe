"""Asymmetric calibration (``fp_target``): solve each layer against the uncompressed model's output on the
uncompressed model's inputs, ``min ||W X - Q X~||``, via the target ``W* = W (C + l I)(H~ + l I)^-1``."""

import copy

import pytest
import torch
from helpers import assert_same_run, tiny_llama

from lmshrink.core.grids import GridSpec
from lmshrink.engine.checkpoint import Checkpoint
from lmshrink.engine.loop import Engine
from lmshrink.engine.statistics import CrossAccumulator, DriftStats, HessianAccumulator
from lmshrink.methods.prune.sparsegpt import sparsegpt_prune
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.solver import asymmetric_output_error, fp_target_weight
from lmshrink.models.adapters import get_adapter
from lmshrink.pipeline.recipe import RecipeError, parse_recipe


def _drifted_layer(out=48, inp=96, samples=800, noise=0.3, seed=0):
    """Weights, inputs X (correlated, uneven scales) and drifted inputs X~ = X + noise, as [tokens, in] rows."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=gen) / inp ** 0.5
    x = (torch.randn(samples, inp, generator=gen) @ mixing) * torch.linspace(0.3, 2.0, inp)
    x_tilde = x + noise * x.std() * torch.randn(samples, inp, generator=gen)
    weight = torch.randn(out, inp, generator=gen) * 0.05
    return weight, x, x_tilde


def _stats(x, x_tilde, batches=4):
    """H = X^T X, C = X^T X~ (both in the DriftStats the engine hands a solve), H~ = X~^T X~ through the engine's
    accumulators (same running-average scale)."""
    h, h_t, c = HessianAccumulator(x.shape[1]), HessianAccumulator(x.shape[1]), CrossAccumulator(x.shape[1])
    for xs, ts in zip(x.chunk(batches), x_tilde.chunk(batches)):
        h.add_batch(xs)
        h_t.add_batch(ts)
        c.add_batch(xs, ts)
    return h.hessian, DriftStats(c, h), h_t.hessian


def _target(weight, drift, h_t, **kw):
    return fp_target_weight(weight, drift.correction(weight, h_t), h_t, **kw)


def _error(weight, q, drift, h_t):
    return asymmetric_output_error(weight, q, h_t, drift.weighted_cross(weight), drift.output_norm(weight))


def _asym_error(weight, q, x, x_tilde):
    return float((x @ weight.t() - x_tilde @ q.t()).square().sum() / (x @ weight.t()).square().sum())


def test_cross_accumulator_orientation_and_scale():
    weight, x, x_tilde = _drifted_layer(inp=32, samples=120)
    _, drift, _ = _stats(x, x_tilde, batches=3)
    cross = drift.cross
    assert cross.nsamples == 3 and cross.tokens == 120 and not cross.identical
    # C[i, j] = sum_t x_t[i] x~_t[j], scaled as HessianAccumulator (2 / nsamples)
    torch.testing.assert_close(cross.cross, 2.0 / 3 * x.t() @ x_tilde, rtol=1e-5, atol=1e-5)
    same = CrossAccumulator(32)
    same.add_batch(x, x.clone())
    assert same.identical


def test_target_is_the_damped_least_squares_solution():
    """W* from the accumulated statistics equals an independent least-squares solve of
    min ||X W^T - X~ Q^T||^2 + l ||W - Q||^2 (stacked rows), and the decomposition
    f(Q) = f(W*) + tr((Q - W*)(H~ + l I)(Q - W*)^T) holds for any Q (the reduction to a GPTQ sweep on W*)."""
    weight, x, x_tilde = _drifted_layer(out=16, inp=40, samples=300, seed=1)
    h, drift, h_t = _stats(x, x_tilde)
    damp_percent = 0.05
    target, info = _target(weight, drift, h_t, damp_percent=damp_percent)
    assert info["fp_target_damp_retries"] == 0
    # the accumulators hold (2 / n) X^T X with n = 4 batches: put the statistics on the scale of raw rows
    scale = 2.0 / 4
    lam = damp_percent * float(h_t.diagonal().mean()) / scale
    xd, xtd, wd = x.double(), x_tilde.double(), weight.double()
    a = torch.cat([xtd, lam ** 0.5 * torch.eye(40, dtype=torch.float64)])
    b = torch.cat([xd @ wd.t(), lam ** 0.5 * wd.t()])
    direct = torch.linalg.lstsq(a, b).solution.t()
    torch.testing.assert_close(target.double(), direct, rtol=1e-4, atol=1e-6)

    def f(q):
        return float((xd @ wd.t() - xtd @ q.t()).square().sum() + lam * (wd - q).square().sum())

    q = wd + 0.02 * torch.randn(wd.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = target.double()
    quad = float((((q - t) @ (xtd.t() @ xtd + lam * torch.eye(40, dtype=torch.float64))) * (q - t)).sum())
    assert f(q) == pytest.approx(f(t) + quad, rel=1e-6)
    # the error formula from H, C, H~ matches the one measured on the rows
    drift_only, with_q = _error(weight, q.float(), drift, h_t)
    assert with_q == pytest.approx(_asym_error(weight, q.float(), x, x_tilde), rel=1e-3)
    assert drift_only == pytest.approx(_asym_error(weight, weight, x, x_tilde), rel=1e-3)


@pytest.mark.parametrize("bits,act_order", [(4, True), (3, True), (3, False)])
def test_fp_target_lowers_the_asymmetric_error(bits, act_order):
    weight, x, x_tilde = _drifted_layer(seed=bits)
    h, drift, h_t = _stats(x, x_tilde)
    spec = GridSpec(bits=bits, group_size=32)
    plain = gptq_quantize(weight, h_t, spec, act_order=act_order)
    target, _ = _target(weight, drift, h_t)
    asym = gptq_quantize(target, h_t, spec, act_order=act_order)
    plain_err = _asym_error(weight, plain.weight, x, x_tilde)
    asym_err = _asym_error(weight, asym.weight, x, x_tilde)
    drift_only = _asym_error(weight, weight, x, x_tilde)
    # the drift alone (30% noise) dominates plain GPTQ's error; the target removes most of what is removable
    assert asym_err < 0.8 * plain_err
    assert asym_err < drift_only  # even below the unquantized layer on drifted inputs
    assert _error(weight, asym.weight, drift, h_t)[1] == pytest.approx(asym_err, rel=1e-3)


def test_fp_target_lowers_the_asymmetric_error_for_sparsegpt():
    weight, x, x_tilde = _drifted_layer(seed=7)
    _, drift, h_t = _stats(x, x_tilde)
    plain = sparsegpt_prune(weight, h_t, 0.5, "unstructured")
    target, _ = _target(weight, drift, h_t)
    asym = sparsegpt_prune(target, h_t, 0.5, "unstructured")
    assert asym.sparsity == pytest.approx(0.5, abs=0.01)
    assert _asym_error(weight, asym.weight, x, x_tilde) < 0.8 * _asym_error(weight, plain.weight, x, x_tilde)


def test_identical_inputs_reproduce_plain_gptq_exactly():
    """X~ == X: C == H~ as matrices, the correction W (C - H~)(...)^-1 is exactly zero, W* == W bitwise and the
    GPTQ result is bit-identical to plain GPTQ."""
    weight, x, _ = _drifted_layer(seed=3)
    h = HessianAccumulator(x.shape[1])
    h.add_batch(x)
    same = CrossAccumulator(x.shape[1])
    same.add_batch(x, x.clone())
    target, _ = _target(weight, DriftStats(same, h), h.hessian)
    assert torch.equal(target, weight)
    spec = GridSpec(bits=3, group_size=32)
    plain = gptq_quantize(weight, h.hessian, spec)
    asym = gptq_quantize(target, h.hessian, spec)
    assert torch.equal(plain.codes, asym.codes) and torch.equal(plain.weight, asym.weight)


def test_per_layer_terms_equal_the_matrix_forms():
    """ProjectedCross, accumulated from the uncompressed layer's outputs y = W x + b, gives the same W C, ||W X||^2 and
    correction W (C - H~) as the group's cross term and reference Hessian, and the same identical flag."""
    from lmshrink.engine.statistics import ProjectedCross

    weight, x, x_tilde = _drifted_layer(out=24, inp=64, samples=400, seed=2)
    h, drift, h_t = _stats(x, x_tilde)
    bias = torch.randn(24)
    projected = ProjectedCross(24, 64)
    for xs, ts in zip(x.chunk(4), x_tilde.chunk(4)):
        projected.add_batch(xs @ weight.t() + bias - bias, xs, ts)
    per_layer = DriftStats(projected={"layer": projected})
    assert projected.nsamples == 4 and projected.tokens == 400 and not per_layer.identical
    torch.testing.assert_close(per_layer.weighted_cross(weight), drift.weighted_cross(weight), rtol=1e-4, atol=1e-5)
    assert per_layer.output_norm(weight) == pytest.approx(drift.output_norm(weight), rel=1e-5)
    torch.testing.assert_close(per_layer.correction(weight, h_t), drift.correction(weight, h_t), rtol=1e-3, atol=1e-4)
    assert _error(weight, weight * 0.9, per_layer, h_t) == pytest.approx(_error(weight, weight * 0.9, drift, h_t),
                                                                        rel=1e-4)
    same = ProjectedCross(24, 64)
    same.add_batch(x @ weight.t(), x, x.clone())
    assert DriftStats(projected={"layer": same}).identical
    with pytest.raises(ValueError, match="one layer's view"):
        DriftStats(projected={"a": same, "b": projected}).weighted_cross(weight)


def test_engine_takes_the_down_projection_per_layer_with_nearly_the_same_result(monkeypatch):
    """In the pass that runs the block copy to its end (the down projection's), an fp_target layer stage gets that
    layer's terms from the copy's outputs (cheaper than the two matrices); the solve lands where the matrix form's
    does, up to float rounding."""
    import lmshrink.engine.loop as loop

    chosen = []

    def spy(original, groups):
        found = loop_projectable(original, groups)
        chosen.append(sorted(found))
        return found

    loop_projectable = loop.projectable
    base = tiny_llama(num_hidden_layers=2)
    monkeypatch.setattr(loop, "projectable", spy)
    per_layer = _run(copy.deepcopy(base), _gptq(bits=4, fp_target=True))
    assert chosen == [["mlp.down_proj"]] * 2
    monkeypatch.setattr(loop, "projectable", lambda original, groups: {})
    matrices = _run(copy.deepcopy(base), _gptq(bits=4, fp_target=True))
    for name, result in matrices.results.items():
        other = per_layer.results[name]
        if "down_proj" not in name and "layers.1" not in name:  # before any projected layer: the same solve
            assert torch.equal(result.codes, other.codes), name
        assert (result.codes != other.codes).float().mean() < 0.01, name
        assert other.rel_output_error == pytest.approx(result.rel_output_error, rel=0.02, abs=1e-6), name


@pytest.mark.parametrize("recipe, later", [
    ([{"method": "gptq", "bits": 4, "group_size": 32, "fp_target": True}], True),
    ([{"method": "gptq", "bits": 4, "group_size": 32, "fp_target": True, "true_sequential": False}], False),
    ([{"method": "sparsegpt", "sparsity": 0.5, "fp_target": True, "targets": ["*mlp*"]},
      {"method": "gptq", "bits": 4, "group_size": 32, "fp_target": True}], True),
], ids=["true-sequential", "one-pass", "prune-then-gptq"])
def test_engine_takes_output_norms_from_the_copy_with_the_same_weights_and_errors(monkeypatch, recipe, later):
    """A layer stage reads ``||W X||^2`` only for its record, so the engine sums it from the copy's outputs (in the
    first pass that runs the copy through the layer, which may come after the layer's solve) instead of the
    reference Hessian: the same weights bit for bit, the same recorded errors up to float rounding, none left
    pending."""
    from lmshrink.core.stage import PENDING_OUTPUT_NORM

    completed = []
    complete = Engine._complete_errors

    def spy(pending, norms, prefix):
        completed.extend(line["name"] for _, line, _ in pending)
        complete(pending, norms, prefix)

    base = tiny_llama(num_hidden_layers=2)
    monkeypatch.setattr(Engine, "_complete_errors", staticmethod(spy))
    late = _run(copy.deepcopy(base), recipe)
    # true-sequential: the q,k,v solve comes before any pass runs the copy through them; one pass: it runs first
    assert bool(completed) == later
    monkeypatch.setattr(Engine, "_late_norms", lambda self, original, groups, projected, norms: {})
    reference = _run(copy.deepcopy(base), recipe)
    assert late.results.keys() == reference.results.keys()
    # the error is a small difference of two sums of about ||W X||^2 each, so the fp32 rounding of ||W X||^2
    # (summed outputs against tr(W H W^T)) shows up about 1 / error times larger in it
    for name, result in reference.results.items():
        assert torch.equal(result.weight, late.results[name].weight), name
        assert late.results[name].rel_output_error == pytest.approx(result.rel_output_error, rel=1e-3, abs=1e-6), name
    assert len(late.layers) == len(reference.layers)
    for line, expected in zip(late.layers, reference.layers):
        assert PENDING_OUTPUT_NORM not in line and "fp_target_output_error" not in line, line["name"]
        for key in ("rel_output_error", "rel_output_error_drift_only"):
            assert line.get(key) == pytest.approx(expected.get(key), rel=1e-3, abs=1e-6), (line["name"], key)
    assert any(line.get("rel_output_error_drift_only", 0) > 0 for line in late.layers)


# -- recipe ---------------------------------------------------------------------------------------------------------

def test_recipe_option_round_trips_and_is_refused_elsewhere():
    import yaml

    recipe = parse_recipe([{"method": "gptq", "bits": 4, "group_size": 128, "fp_target": True},
                           {"method": "sparsegpt", "sparsity": 0.5, "fp_target": True, "targets": ["*mlp*"]}])
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe and again.stages[0].fp_target and again.stages[1].fp_target
    assert parse_recipe([{"method": "gptq"}]).stages[0].fp_target is False
    for method in ("rtn", "wanda", "magnitude"):
        with pytest.raises(RecipeError, match=rf"stage 1 \({method}\): option 'fp_target'") as info:
            parse_recipe([{"method": method, "fp_target": True}])
        offered = str(info.value.fix).split(": ", 1)[1].split(", ")
        assert {"gptq", "sparsegpt"} <= set(offered) and method not in offered


# -- engine ---------------------------------------------------------------------------------------------------------

def _calib(n=6, seqlen=48, seed=0):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _run(model, recipe, calib=None, **kwargs):
    return Engine(model, get_adapter(model), parse_recipe(recipe), _calib() if calib is None else calib,
                  progress=False, batch_size=2, **kwargs).run()


def _gptq(bits=3, group_size=32, **kw):
    return [{"method": "gptq", "bits": bits, "group_size": group_size, **kw}]


def _kl_to_base(base, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=ids).logits.double(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_engine_fp_target_records_and_first_group_matches_plain():
    base = tiny_llama(num_hidden_layers=2)
    plain_model, asym_model = copy.deepcopy(base), copy.deepcopy(base)
    plain = _run(plain_model, _gptq())
    asym = _run(asym_model, _gptq(fp_target=True))
    q0 = "model.layers.0.self_attn.q_proj"
    # block 0's first group sees the same inputs in both streams: W* = W, the same codes as plain GPTQ
    assert torch.equal(plain.results[q0].codes, asym.results[q0].codes)
    assert asym.results[q0].info["fp_target_identical_inputs"]
    later = [r for r in asym.layers if r["name"] != q0 and not r["name"].startswith("model.layers.0.self_attn.")]
    assert all(r["rel_output_error_drift_only"] > 0 and r["rel_output_error_local"] is not None for r in later)
    # after block 0 the drift makes the targets differ from plain GPTQ
    assert not torch.equal(plain.results["model.layers.1.mlp.down_proj"].codes,
                           asym.results["model.layers.1.mlp.down_proj"].codes)
    for name, r in asym.results.items():
        assert torch.equal(asym_model.get_submodule(name).weight, r.weight)


def test_engine_fp_target_lowers_kl_to_the_base_model():
    """On the calibration windows, the model compressed with fp_target is much closer to the base model (KL of the
    next-token distributions) than plain GPTQ, for three random tiny Llamas at 3 bits.

    On these tiny models the gain on the calibration windows is large (about 15x lower KL, measured) partly because
    512 calibration tokens for 128-256 inputs let W* fit the uncompressed outputs of those very tokens; on other
    windows it was smaller (0.7-0.97x at 3 bits) and at 2 bits not always a gain, so held-out KL is not asserted.
    """
    calib = _calib(n=8, seqlen=64)
    for seed in range(3):
        base = tiny_llama(seed=seed, num_hidden_layers=4, hidden_size=128, intermediate_size=256)
        plain_model, asym_model = copy.deepcopy(base), copy.deepcopy(base)
        _run(plain_model, _gptq(), calib=calib)
        _run(asym_model, _gptq(fp_target=True), calib=calib)
        plain_kl, asym_kl = _kl_to_base(base, plain_model, calib), _kl_to_base(base, asym_model, calib)
        assert asym_kl < 0.5 * plain_kl, (seed, plain_kl, asym_kl)


def test_streamed_fp_target_equals_in_memory(tmp_path):
    """offload="disk": the copy of the one loaded block gives the same results as the in-memory run."""
    from helpers import save_tiny_llama, write_calibration_text

    from lmshrink import compress, load_model

    folder = save_tiny_llama(tmp_path / "in", seed=3, num_hidden_layers=2)
    calib = f"file:{write_calibration_text(tmp_path / 'calib.txt')}"
    recipe = _gptq(bits=4, clip_search=False, fp_target=True)
    kwargs = dict(calibration=calib, nsamples=4, seqlen=48, progress=False)
    memory = compress(load_model(str(folder), progress=False), recipe, output=tmp_path / "mem", **kwargs)
    streamed = compress(load_model(str(folder), progress=False, lazy_blocks=True), recipe, output=tmp_path / "disk",
                        offload="disk", **kwargs)
    assert memory["results"].keys() == streamed["results"].keys() and len(memory["results"]) == 2 * 7
    for name, r in memory["results"].items():
        other = streamed["results"][name]
        assert torch.equal(r.codes, other.codes) and torch.equal(r.scale, other.scale)
        assert r.rel_output_error == other.rel_output_error and r.info["fp_target"]


def test_engine_fp_target_pass_reuse_is_bit_identical():
    base = tiny_llama(num_hidden_layers=2)
    a = _run(copy.deepcopy(base), _gptq(fp_target=True), reuse_passes=True)
    b = _run(copy.deepcopy(base), _gptq(fp_target=True), reuse_passes=False)
    for name, r in a.results.items():
        assert torch.equal(r.codes, b.results[name].codes) and torch.equal(r.scale, b.results[name].scale)


class _Killed(Exception):
    pass


def _run_killed_after_second_block(base, recipe, folder):
    """Compress a copy of ``base`` with a checkpoint in ``folder``, killed once block 1 is saved."""
    def kill_after_second_block(index):
        if index == 1:
            raise _Killed

    with pytest.raises(_Killed):
        _run(copy.deepcopy(base), recipe, checkpoint=Checkpoint(folder, "key"), on_block_done=kill_after_second_block)


def test_engine_fp_target_resume_after_kill_is_bit_identical(tmp_path):
    base = tiny_llama(num_hidden_layers=3)
    recipe = _gptq(fp_target=True)
    full_model = copy.deepcopy(base)
    full = _run(full_model, recipe)
    _run_killed_after_second_block(base, recipe, tmp_path / "ck")
    assert Checkpoint(tmp_path / "ck", "key").load_reference_hidden().shape == (6, 48, 64)
    resumed_model = copy.deepcopy(base)
    resumed = _run(resumed_model, recipe, checkpoint=Checkpoint(tmp_path / "ck", "key"), resume=True)
    assert resumed.resumed_from_block == 2
    assert_same_run(full, resumed, full_model, resumed_model)


def test_a_later_stage_aims_at_the_uncompressed_layer_not_at_the_earlier_stage():
    """With fp_target the target is built from the uncompressed layer's weight (the block copy), whatever weight an
    earlier stage of the recipe left in the layer: otherwise a stage after another fp_target stage corrects the drift
    twice (P1 sparse50 then w4g128, both with fp_target: WikiText-2 perplexity 1358 before this)."""
    from types import SimpleNamespace

    from torch import nn

    from lmshrink.engine.jobs import LayerJob

    def _solve(stage, module, hessian, drift, uncompressed=None):
        stats = SimpleNamespace(hessian=hessian, fp_target=drift, tokens=None, channels=None)
        return stage.solve(LayerJob(name="layer", module=module, uncompressed=uncompressed, stats=stats, state={}))

    weight, x, x_tilde = _drifted_layer(out=24, inp=64, samples=400, seed=3)
    _, drift, h_tilde = _stats(x, x_tilde)
    stage = parse_recipe(_gptq(bits=3, group_size=32, fp_target=True)).stages[0]

    def layer(w):
        module = nn.Linear(64, 24, bias=False)
        module.weight.data.copy_(w)
        return module

    uncompressed = layer(weight)
    earlier = layer(weight + 0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(4)))
    from_uncompressed = _solve(stage, layer(weight), h_tilde, drift)
    later = _solve(stage, earlier, h_tilde, drift, uncompressed)
    assert torch.equal(later.codes, from_uncompressed.codes) and torch.equal(later.weight, from_uncompressed.weight)
    # without the block copy the earlier stage's weight would be the target's source: a different solution
    assert not torch.equal(_solve(stage, earlier, h_tilde, drift).codes, later.codes)


@pytest.mark.parametrize("recipe", [_gptq(fp_target=True),
                                    [{"method": "sparsegpt", "sparsity": 0.5, "fp_target": True},
                                     {"method": "gptq", "bits": 4, "group_size": 32, "targets": ["*proj"],
                                      "fp_target": True}],
                                    [{"method": "gptq", "bits": 4, "group_size": 32, "fp_target": True,
                                      "targets": ["*q_proj", "*k_proj", "*v_proj"]}],
                                    # block 1 has no fp_target layer: its copy runs a final forward instead
                                    [{"method": "gptq", "bits": 4, "group_size": 32, "fp_target": True,
                                      "targets": ["model.layers.0.*"]}]],
                         ids=["gptq", "prune-then-gptq", "first-group-only", "block-0-only"])
def test_the_uncompressed_stream_is_the_dense_models_hidden_states(tmp_path, recipe):
    """The uncompressed stream carried to the next block (by the block copy's last fp_target pass, which runs to the
    block's end, or by a final forward) is exactly the dense model's hidden states, batch by batch."""
    from lmshrink.engine.capture import capture_block_inputs, run_block

    base = tiny_llama(num_hidden_layers=3)
    dense = copy.deepcopy(base)
    _run_killed_after_second_block(base, recipe, tmp_path / "ck")
    saved = Checkpoint(tmp_path / "ck", "key").load_reference_hidden()
    blocks = get_adapter(dense).blocks(dense)
    captured = capture_block_inputs(dense, blocks, _calib(), torch.device("cpu"))
    expected = []
    with torch.no_grad():
        for batch in torch.cat(captured.hidden).split(2):  # the engine's batches (batch_size=2)
            for index in range(2):
                batch = run_block(blocks[index], batch, captured.args[index], captured.kwargs[index])
            expected.append(batch)
    assert torch.equal(saved, torch.cat(expected))
