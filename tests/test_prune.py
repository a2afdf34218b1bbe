"""Pruning methods on single layers: exact sparsity and N:M patterns, Wanda's score, SparseGPT vs magnitude, joint
mode codes, the shared solver, OWL allocation, and recipe validation; and the engine collecting no statistics for
magnitude stages (same results as collecting them)."""

import pytest
import torch
from helpers import correlated_layer as _layer

from lmshrink.core.grids import GridSpec, dequantize
from lmshrink.core.results import PruneResult
from lmshrink.methods.prune.magnitude import magnitude_prune
from lmshrink.methods.prune.owl import outlier_ratio, owl_sparsities
from lmshrink.methods.prune.sparsegpt import sparsegpt_prune
from lmshrink.methods.prune.wanda import wanda_prune
from lmshrink.methods.quant.gptq import gptq_keep_mask, gptq_quantize
from lmshrink.methods.solver import output_error, solve_columns
from lmshrink.pipeline.checks import check_recipe
from lmshrink.pipeline.recipe import RecipeError, load_recipe


def _check_nm(weight, n, m):
    groups = (weight == 0).reshape(weight.shape[0], -1, m).sum(-1)
    assert bool((groups >= n).all()), f"a group of {m} has fewer than {n} zeros"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_sparsity_is_exact(method, sparsity):
    weight, _, hessian = _layer()
    if method == "magnitude":
        result = magnitude_prune(weight, sparsity)
    elif method == "wanda":
        result = wanda_prune(weight, hessian, sparsity)
    else:
        result = sparsegpt_prune(weight, hessian, sparsity, block_size=16)
    assert isinstance(result, PruneResult)
    expected = int(weight.numel() * sparsity + 0.5)
    if method == "wanda":  # Wanda compares within each output row
        expected = weight.shape[0] * int(weight.shape[1] * sparsity + 0.5)
        assert bool(((result.weight == 0).sum(1) == expected // weight.shape[0]).all())
    assert int(result.mask.sum()) == expected
    assert bool((result.weight[result.mask] == 0).all()) and bool((result.weight[~result.mask] != 0).all())
    assert result.sparsity == pytest.approx(expected / weight.numel())
    assert torch.equal(result.dense(), result.weight)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_pattern_is_exact(method, pattern):
    weight, _, hessian = _layer()
    n, m = map(int, pattern.split(":"))
    if method == "magnitude":
        result = magnitude_prune(weight, n / m, pattern)
    elif method == "wanda":
        result = wanda_prune(weight, hessian, n / m, pattern)
    else:
        result = sparsegpt_prune(weight, hessian, 0.0, pattern, block_size=16)
    _check_nm(result.weight, n, m)
    assert int(result.mask.sum()) == weight.numel() * n // m
    assert result.pattern == pattern


def test_wanda_equals_direct_computation():
    weight, x, hessian = _layer()
    result = wanda_prune(weight, hessian, 0.5)
    score = weight.abs() * x.norm(dim=0)  # |W_ij| * ||X_j||_2 from the raw inputs
    k = weight.shape[1] // 2
    expected = torch.zeros_like(weight, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(score, dim=1)[:, :k], True)
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, weight.masked_fill(expected, 0.0))
    # 2:4: the two lowest scores of every 4 columns of a row
    nm = wanda_prune(weight, hessian, 0.5, "2:4")
    groups = score.reshape(weight.shape[0], -1, 4)
    lowest = torch.argsort(groups, dim=-1)[..., :2]
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(weight.shape)
    assert torch.equal(nm.mask, expected)


def test_magnitude_prunes_smallest_of_the_layer():
    weight, _, _ = _layer()
    result = magnitude_prune(weight, 0.5)
    assert float(weight.abs()[result.mask].max()) <= float(weight.abs()[~result.mask].min())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda_on_output_error(pattern):
    weight, x, hessian = _layer(rows=64, cols=128, tokens=1024)

    def err(w):
        return float(((x @ (weight - w).t()) ** 2).sum() / ((x @ weight.t()) ** 2).sum())

    sgpt = sparsegpt_prune(weight, hessian, 0.5, pattern, block_size=32)
    mag = magnitude_prune(weight, 0.5, pattern)
    wanda = wanda_prune(weight, hessian, 0.5, pattern)
    assert err(sgpt.weight) < 0.8 * err(mag.weight)
    assert err(sgpt.weight) < err(wanda.weight)
    assert sgpt.rel_output_error == pytest.approx(err(sgpt.weight), rel=1e-3)


@pytest.mark.parametrize("static", [False, True])
def test_solver_without_pruning_reproduces_gptq(static):
    """The sparse rule with sparsity 0 and a grid is exactly GPTQ's rule: same codes, same weights (groups fitted
    during the sweep, or static ones fitted before it)."""
    weight, _, hessian = _layer()
    spec = GridSpec(bits=4, group_size=16)
    gptq = gptq_quantize(weight, hessian, spec, act_order=False, static_groups=static)
    joint = sparsegpt_prune(weight, hessian, 0.0, block_size=128, spec=spec, static_groups=static)
    assert torch.equal(joint.codes, gptq.codes) and torch.equal(joint.weight, gptq.weight)
    assert torch.equal(joint.scale, gptq.scale)
    # and GPTQ with an empty fixed mask (act-order, static groups) too
    kept = gptq_keep_mask(weight, hessian, torch.zeros_like(weight, dtype=torch.bool), spec, act_order=True)
    reference = gptq_quantize(weight, hessian, spec, act_order=True, static_groups=True)
    assert torch.equal(kept.codes, reference.codes) and torch.equal(kept.weight, reference.weight)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_codes_decode_to_zero_exactly_where_pruned(pattern):
    weight, _, hessian = _layer()
    spec = GridSpec(bits=4, group_size=16, symmetric=False)
    result = sparsegpt_prune(weight, hessian, 0.5, pattern, block_size=16, spec=spec)
    decoded = dequantize(result.codes, result.scale, result.zero, result.group_index())
    assert torch.equal(decoded, result.weight)
    zero = result.zero[:, result.group_index().long()]
    pruned = result.codes == zero
    assert int(pruned.sum()) >= weight.numel() // 2
    assert bool((decoded[pruned] == 0).all()) and bool((decoded[~pruned] != 0).all())
    if pattern == "2:4":
        _check_nm(decoded, 2, 4)
    assert result.info["sparsity"] >= 0.5 and result.info["pruned_fraction"] == 0.5


def test_sparsegpt_act_order_keeps_exact_sparsity_and_codes():
    """act_order sweeps columns by decreasing Hessian diagonal: masks, codes and weights come back in the original
    column order (the exact-zero and decode checks fail if a permutation is left in), and the static group grids
    are the ones fitted on the original column groups."""
    weight, x, hessian = _layer(rows=64, cols=128, tokens=1024)
    spec = GridSpec(bits=4, group_size=32)
    plain = sparsegpt_prune(weight, hessian, 0.5, block_size=32, spec=spec, static_groups=True)
    ordered = sparsegpt_prune(weight, hessian, 0.5, block_size=32, spec=spec, act_order=True)
    assert ordered.info["act_order"] and not plain.info["act_order"]
    assert torch.equal(ordered.scale, plain.scale) and torch.equal(ordered.zero, plain.zero)
    decoded = dequantize(ordered.codes, ordered.scale, ordered.zero, ordered.group_index())
    assert torch.equal(decoded, ordered.weight)
    assert ordered.info["pruned_fraction"] == 0.5 and ordered.info["sparsity"] >= 0.5
    assert ordered.rel_output_error == pytest.approx(output_error(weight, ordered.weight, hessian), rel=1e-4)
    pruned = sparsegpt_prune(weight, hessian, 0.5, block_size=32, act_order=True)
    assert int(pruned.mask.sum()) == weight.numel() // 2 and bool((pruned.weight[pruned.mask] == 0).all())
    assert bool((pruned.weight[~pruned.mask] != 0).all())
    with pytest.raises(ValueError, match="original order"):
        sparsegpt_prune(weight, hessian, 0.5, "2:4", act_order=True)
    with pytest.raises(RecipeError, match="act_order"):
        load_recipe([{"method": "sparsegpt", "pattern": "2:4", "act_order": True}])


def test_gptq_keeps_a_fixed_mask():
    weight, _, hessian = _layer()
    pruned = sparsegpt_prune(weight, hessian, 0.5, block_size=16)
    spec = GridSpec(bits=4, group_size=16)
    result = gptq_keep_mask(pruned.weight, hessian, pruned.mask, spec, act_order=True)
    assert bool((result.weight[pruned.mask] == 0).all())
    plain = gptq_quantize(pruned.weight, hessian, spec)
    assert not bool((plain.weight[pruned.mask] == 0).all())  # plain GPTQ would refill the zeros
    assert output_error(weight, result.weight, hessian) < 2 * output_error(weight, pruned.weight, hessian) + 0.05


def test_owl_sparsities_average_to_target_and_follow_outliers():
    ratios = [0.01, 0.05, 0.02, 0.03]
    values = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(values) / len(values) == pytest.approx(0.5)
    assert max(values) - min(values) == pytest.approx(0.16)
    assert values.index(min(values)) == 1 and values.index(max(values)) == 0  # more outliers -> pruned less
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    scores = [torch.tensor([1.0, 1.0, 1.0, 10.0]), torch.tensor([1.0, 1.0])]
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)  # mean 2.5, one score above 5


@pytest.mark.parametrize("ratios,target,lam", [([0.01] * 29 + [0.0], 0.9, 0.08), ([0.0] * 29 + [0.01], 0.1, 0.08),
                                                ([0.01, 0.05, 0.02, 0.03], 0.95, 0.08),
                                                ([0.01, 0.05, 0.02, 0.03], 0.5, 0.5)])
def test_owl_sparsities_at_the_bounds_still_average_to_target_in_order(ratios, target, lam):
    values = owl_sparsities(ratios, target, lam)
    assert sum(values) / len(values) == pytest.approx(target, abs=1e-9)
    assert min(values) >= 0.0 and max(values) <= 0.99
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])  # more outliers -> pruned no more
    assert all(values[a] >= values[b] - 1e-12 for a, b in zip(order, order[1:]))


def test_sparse_rule_needs_original_order_for_nm():
    from lmshrink.methods.prune.sparsegpt import SparseRule

    weight, _, hessian = _layer()
    with pytest.raises(ValueError, match="original order"):
        solve_columns(weight, hessian, SparseRule(pattern="2:4"), act_order=True)
    with pytest.raises(ValueError, match="multiple of"):
        magnitude_prune(weight[:, :62], 0.5, "2:4")


@pytest.mark.parametrize("stage, option", [
    ({"method": "wanda", "sparsity": 0.99}, "sparsity"),
    ({"method": "sparsegpt", "pattern": "4:2"}, "pattern"),
    ({"method": "magnitude", "pattern": "2-4"}, "pattern"),
    ({"method": "wanda", "pattern": "2:4", "sparsity": 0.7}, "pattern"),
    ({"method": "sparsegpt", "pattern": "2:4", "allocation": "owl"}, "allocation"),
    ({"method": "sparsegpt", "bits": 5}, "bits"),
    ({"method": "sparsegpt", "damp_percent": 0}, "damp_percent"),
    ({"method": "wanda", "allocation": "global"}, "allocation"),
    ({"method": "magnitude", "block_size": 64}, "block_size"),
])
def test_bad_prune_options_name_stage_and_option(stage, option):
    with pytest.raises(RecipeError) as err:
        load_recipe([stage])
    assert "stage 1" in err.value.message and option in err.value.message


def test_check_recipe_prune_rules():
    layers = [("model.layers.0.mlp.down_proj", 64), ("model.layers.0.self_attn.q_proj", 62)]
    with pytest.raises(RecipeError, match="'pattern'.*multiples of 4"):
        check_recipe(load_recipe("2:4"), layers)
    layers = [("model.layers.0.mlp.down_proj", 64)]
    with pytest.raises(RecipeError, match="already quantizes"):
        check_recipe(load_recipe([{"method": "gptq", "group_size": 32}, {"method": "wanda"}]), layers)
    with pytest.raises(RecipeError, match="already prunes"):
        check_recipe(load_recipe([{"method": "wanda"}, {"method": "sparsegpt"}]), layers)
    with pytest.raises(RecipeError, match="static_groups"):
        check_recipe(load_recipe([{"method": "wanda"}, {"method": "gptq", "group_size": 32,
                                                         "static_groups": False}]), layers)
    check_recipe(load_recipe([{"method": "wanda"}, {"method": "gptq", "group_size": 32}]), layers)
    with pytest.raises(RecipeError, match="both quantize"):
        check_recipe(load_recipe([{"method": "sparsegpt", "bits": 4, "group_size": 32},
                                  {"method": "gptq", "group_size": 32}]), layers)


def test_prune_presets_parse():
    for name in ("magnitude50", "wanda50", "wanda-2:4", "sparse50", "2:4", "4:8", "sparse50-w4g128",
                 "owl-sparse50", "owl-wanda50", "sparse50-then-w4g128", "sparse50-refit"):
        recipe = load_recipe(name)
        assert recipe.stages[0].method in ("magnitude", "wanda", "sparsegpt")
        assert recipe.stages[0].sparsity == 0.5
    assert load_recipe("sparse50-w4g128").stages[0].grid().bits == 4
    assert not load_recipe("magnitude50").needs_calibration() and load_recipe("wanda50").needs_calibration()
    # Wanda collects once per block as its reference code does; the other methods stay true-sequential
    assert [load_recipe(n).stages[0].true_sequential for n in ("wanda50", "wanda-2:4", "owl-wanda50")] == [False] * 3
    assert load_recipe("sparse50").stages[0].true_sequential and load_recipe("magnitude50").stages[0].true_sequential
    explicit = load_recipe({"name": "w", "stages": [{"method": "wanda", "true_sequential": True}]})
    assert explicit.stages[0].true_sequential


# -- the engine collects no Hessian for magnitude stages -------------------------------------------------------


def _engine_run(tmp_path, recipe, monkeypatch, collect_all=False):
    """compress() a tiny Llama in memory; returns (record, model, accumulators created). ``collect_all``: the
    behaviour before magnitude stages skipped collection (every stage collects, every block runs forward)."""
    from helpers import tiny_llama, tiny_tokenizer, write_calibration_text

    from lmshrink import compress
    from lmshrink.core.stage import Stat
    from lmshrink.engine import passes
    from lmshrink.methods.prune.stages import MagnitudeStage

    created = []

    class Counting(passes.HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    with monkeypatch.context() as patch:
        patch.setattr(passes, "HessianAccumulator", Counting)
        if collect_all:
            patch.setattr(MagnitudeStage, "needs", lambda self: frozenset({Stat.HESSIAN}))
        model = tiny_llama()
        calib = write_calibration_text(tmp_path / "calib.txt")
        record = compress(model, recipe, tokenizer=tiny_tokenizer(), calibration=f"file:{calib}", nsamples=4,
                          seqlen=32, progress=False)
    return record, model, len(created)


def _same_results(one, two):
    assert one.keys() == two.keys()
    for name in one:
        a, b = one[name], two[name]
        assert torch.equal(a.weight, b.weight), name
        if isinstance(a, PruneResult):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values), name


def _original_linears():
    from helpers import tiny_llama

    from lmshrink.models.adapters import iter_linears

    return {name: module.weight.detach().clone() for name, module in iter_linears(tiny_llama()) if name != "lm_head"}


def _logits(model):
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("recipe", ["magnitude50", "magnitude-2:4"])
def test_magnitude_recipe_creates_no_hessian_and_matches_collecting(tmp_path, monkeypatch, recipe):
    record, model, created = _engine_run(tmp_path, recipe, monkeypatch)
    before, before_model, before_created = _engine_run(tmp_path, recipe, monkeypatch, collect_all=True)
    assert created == 0 and before_created == 8  # before: one per group (qkv, o, gate/up, down) of each of 2 blocks
    _same_results(record["results"], before["results"])
    assert torch.equal(_logits(model), _logits(before_model))
    # the Hessian's only use was the diagnostic error, now absent for magnitude layers
    assert all(layer["rel_output_error"] is None and layer["tokens"] is None for layer in record["layers"])
    assert all(layer["rel_output_error"] is not None for layer in before["layers"])
    originals, pattern = _original_linears(), load_recipe(recipe).stages[0].pattern
    for name, result in record["results"].items():  # and the same as pruning the original weights directly
        assert torch.equal(result.weight, magnitude_prune(originals[name], 0.5, pattern).weight), name


def test_mixed_recipe_skips_only_magnitude_collection(tmp_path, monkeypatch):
    """A magnitude stage between collecting stages: results are bit-identical. The first stage's pass leaves the
    attention outputs in the pass memo; the magnitude stage changes attention without a pass, so the memo must drop
    them (else the GPTQ stage and the final forward would reuse outputs of the unpruned attention)."""
    recipe = [{"method": "wanda", "targets": ["*mlp*"], "true_sequential": False},
              {"method": "magnitude", "targets": ["*self_attn*"]},
              {"method": "gptq", "bits": 4, "group_size": 32, "targets": ["*mlp*"]}]
    record, model, created = _engine_run(tmp_path, recipe, monkeypatch)
    before, before_model, before_created = _engine_run(tmp_path, recipe, monkeypatch, collect_all=True)
    _same_results(record["results"], before["results"])
    assert torch.equal(_logits(model), _logits(before_model))
    # magnitude's passes over the attention groups (qkv, o) of 2 blocks are gone; wanda and GPTQ still collect
    assert before_created - created == 4 and created > 0
    magnitude = [layer for layer in record["layers"] if layer["method"] == "magnitude"]
    assert len(magnitude) == 8 and all(layer["rel_output_error"] is None for layer in magnitude)
    assert all(layer["rel_output_error"] is not None for layer in record["layers"] if layer["method"] != "magnitude")
