"""The least-squares refit of a pruned layer's kept weights (``refit_iterations``): it reaches the per-row
least-squares solution for the mask, never ends worse, keeps the mask; recipe validation; and the engine path (the
Hessian is collected for magnitude stages that refit, the layers record the error before and after)."""

import json

import pytest
import torch
from helpers import correlated_layer, save_tiny_llama, write_calibration_text
from transformers import AutoModelForCausalLM

from lmshrink import compress, load_model
from lmshrink.methods.prune.magnitude import magnitude_prune
from lmshrink.methods.prune.refit import damped_hessian, refit_kept_weights
from lmshrink.methods.prune.sparsegpt import sparsegpt_prune
from lmshrink.methods.prune.wanda import wanda_prune
from lmshrink.methods.solver import output_error
from lmshrink.models.adapters import iter_linears
from lmshrink.pipeline.recipe import RecipeError, load_recipe


def _layer(rows=48, cols=96, tokens=768, seed=0):
    """A random weight and its correlated inputs' Hessian (``helpers.correlated_layer``)."""
    weight, _, hessian = correlated_layer(rows, cols, tokens, seed)
    return weight, hessian


def _exact(weight, hessian, mask, damp_percent=0.01):
    """Per row: solve ``H_KK q_K = (H w)_K`` in float64 with the sweep's damping (the refit's fixed point)."""
    h = damped_hessian(hessian, damp_percent)[0].double()
    target = weight.double() @ h
    out = torch.zeros_like(weight, dtype=torch.float64)
    for r in range(weight.shape[0]):
        keep = ~mask[r]
        out[r, keep] = torch.linalg.solve(h[keep][:, keep], target[r, keep])
    return out.float()


def _prune(method, weight, hessian, pattern):
    if method == "magnitude":
        return magnitude_prune(weight, 0.5, pattern)
    if method == "wanda":
        return wanda_prune(weight, hessian, 0.5, pattern)
    return sparsegpt_prune(weight, hessian, 0.5, pattern, block_size=32)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refit_reaches_the_least_squares_solution_for_the_mask(method, pattern):
    weight, hessian = _layer()
    pruned = _prune(method, weight, hessian, pattern)
    refit, info = refit_kept_weights(weight, pruned.weight, pruned.mask, hessian, iterations=300)
    exact = _exact(weight, hessian, pruned.mask)
    assert torch.allclose(refit, exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))
    assert torch.equal(refit == 0, pruned.mask | (exact == 0))  # zeros exactly where pruned
    before, after = output_error(weight, pruned.weight, hessian), output_error(weight, refit, hessian)
    assert info["rel_output_error_before_refit"] == pytest.approx(before)
    assert after < before * (0.95 if method == "sparsegpt" else 0.7)  # SparseGPT's sweep is close already


def test_refit_converges_in_a_few_iterations_and_each_row_only_improves():
    weight, hessian = _layer(rows=64, cols=128, tokens=1024, seed=1)
    pruned = sparsegpt_prune(weight, hessian, 0.5, block_size=32)
    exact = _exact(weight, hessian, pruned.mask)
    h = damped_hessian(hessian, 0.01)[0]

    def rows(q):
        diff = q - weight
        return ((diff @ h) * diff).sum(1)

    errors = []
    for iterations in (0, 1, 5, 20):
        refit, info = refit_kept_weights(weight, pruned.weight, pruned.mask, hessian, iterations)
        assert info["refit_iterations"] == iterations
        assert bool((rows(refit) <= rows(pruned.weight) * (1 + 1e-6)).all())
        errors.append(output_error(weight, refit, hessian))
    assert torch.equal(refit_kept_weights(weight, pruned.weight, pruned.mask, hessian, 0)[0], pruned.weight)
    assert errors[0] > errors[1] > errors[2] >= errors[3]
    assert errors[3] == pytest.approx(output_error(weight, exact, hessian), rel=1e-3)


def test_refit_handles_dead_inputs_and_refuses_bad_shapes():
    weight, hessian = _layer()
    hessian[:, 5] = 0.0
    hessian[5, :] = 0.0  # input 5 is always 0
    pruned = magnitude_prune(weight, 0.5)  # keeps some weights of input 5: the refit zeroes them
    assert bool((pruned.weight[:, 5] != 0).any())
    refit, _ = refit_kept_weights(weight, pruned.weight, pruned.mask, hessian, 50)
    assert bool(torch.isfinite(refit).all()) and bool((refit[:, 5] == 0).all())
    assert output_error(weight, refit, hessian) < output_error(weight, pruned.weight, hessian)
    with pytest.raises(ValueError, match="shapes do not match"):
        refit_kept_weights(weight, pruned.weight[:, :10], pruned.mask, hessian, 5)
    with pytest.raises(ValueError, match="iterations"):
        refit_kept_weights(weight, pruned.weight, pruned.mask, hessian, -1)


def test_refit_option_in_recipes():
    recipe = load_recipe([{"method": "sparsegpt", "refit_iterations": 20}, {"method": "gptq", "group_size": 32}])
    assert recipe.stages[0].refit_iterations == 20
    assert load_recipe(recipe.to_dict()).stages[0].refit_iterations == 20
    assert load_recipe("sparse50").stages[0].refit_iterations == 0  # SparseGPT as published, by default
    assert [load_recipe(n).stages[0].refit_iterations for n in ("sparse50-refit", "sparse50-then-w4g128")] == [20, 20]
    with pytest.raises(RecipeError) as err:
        load_recipe([{"method": "sparsegpt", "bits": 4, "refit_iterations": 20}])
    assert "stage 1" in err.value.message and "refit_iterations" in err.value.message
    with pytest.raises(RecipeError) as err:
        load_recipe([{"method": "wanda", "refit_iterations": -1}])
    assert "refit_iterations" in err.value.message


# -- through the engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-refit"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt", "Refit the weights we keep.")


def _compress(tiny_dir, calib_file, recipe, out=None):
    return compress(load_model(str(tiny_dir), progress=False), recipe, output=out, calibration=f"file:{calib_file}",
                    nsamples=4, seqlen=32, progress=False)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_engine_refits_with_the_same_mask_and_lower_error(tiny_dir, calib_file, tmp_path, method):
    plain = _compress(tiny_dir, calib_file, [{"method": method, "sparsity": 0.5}])
    out = tmp_path / "refit"
    record = _compress(tiny_dir, calib_file, [{"method": method, "sparsity": 0.5, "refit_iterations": 20}], out=out)
    layers = {layer["name"]: layer for layer in record["layers"]}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer["refit_iterations"] > 0, name
        assert layer["rel_output_error"] <= layer["rel_output_error_before_refit"] * (1 + 1e-6), name
    # block 0's first group sees the same inputs in both runs: the same mask, and the refit lowers its error
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(record["results"][first].mask, plain["results"][first].mask)
    if method != "magnitude":  # plain magnitude collects no Hessian, so it records no error to compare with
        plain_error = {layer["name"]: layer for layer in plain["layers"]}[first]["rel_output_error"]
        assert layers[first]["rel_output_error_before_refit"] == pytest.approx(plain_error)
    assert layers[first]["rel_output_error"] < layers[first]["rel_output_error_before_refit"]
    for name, result in record["results"].items():
        assert int(result.mask.sum()) == result.mask.numel() // 2 or method == "wanda", name
        assert bool((result.weight[result.mask] == 0).all()), name
    # the saved folder is a plain checkpoint of exactly these weights
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, module in iter_linears(reloaded):
        if name in record["results"]:
            assert torch.equal(module.weight.detach(), record["results"][name].weight), name
    saved = json.loads((out / "lmshrink.json").read_text())
    assert saved["recipe"]["stages"][0]["refit_iterations"] == 20


def test_engine_refit_then_gptq_keeps_the_mask(tiny_dir, calib_file):
    record = _compress(tiny_dir, calib_file, [{"method": "sparsegpt", "sparsity": 0.5, "refit_iterations": 20},
                                              {"method": "gptq", "bits": 4, "group_size": 32}])
    assert len(record["results"]) == 14
    for name, result in record["results"].items():
        assert int(result.pruned.sum()) == result.pruned.numel() // 2, name
        assert bool((result.weight[result.pruned] == 0).all()), name


def test_a_row_already_at_its_optimum_is_not_made_worse_by_rounding():
    """Started at the float64 least-squares solution, float32 iterations can only add rounding noise: every row whose
    objective would grow keeps its starting weights, so no row ends above where it started."""
    weight, hessian = _layer(seed=2)
    pruned = sparsegpt_prune(weight, hessian, 0.5, block_size=32)
    exact = _exact(weight, hessian, pruned.mask)
    h = damped_hessian(hessian, 0.01)[0].double()  # the refit's own damped Hessian, compared in float64

    def rows(q):
        diff = q.double() - weight.double()
        return ((diff @ h) * diff).sum(1)

    refit, info = refit_kept_weights(weight, exact, pruned.mask, hessian, 20)
    assert info["refit_rows_kept"] > 0  # rounding made some rows worse: they kept their start
    assert bool((rows(refit) <= rows(exact)).all())


def test_engine_refit_with_fp_target_refits_toward_the_asymmetric_target(tiny_dir, calib_file):
    """With ``fp_target`` the pruning sweep and the refit both work on the target ``W*`` with the compressed
    stream's Hessian: each layer's local error (against ``W*``) does not grow through the refit, and the recorded
    asymmetric error of block 0's first group (identical inputs, so ``W* = W``) is lower than without the refit."""
    stage = {"method": "sparsegpt", "sparsity": 0.5, "fp_target": True}
    plain = _compress(tiny_dir, calib_file, [stage])
    record = _compress(tiny_dir, calib_file, [{**stage, "refit_iterations": 20}])
    for layer in record["layers"]:
        assert layer["rel_output_error_local"] <= layer["rel_output_error_before_refit"] * (1 + 1e-6), layer["name"]
    first = "model.layers.0.self_attn.q_proj"
    before = {layer["name"]: layer for layer in plain["layers"]}[first]["rel_output_error"]
    after = {layer["name"]: layer for layer in record["layers"]}[first]["rel_output_error"]
    assert after < before
