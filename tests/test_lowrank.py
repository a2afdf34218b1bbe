"""Low-rank factorization (plain SVD, ASVD, SVD-LLM), rank allocation, Basis Sharing and low-rank correction: the
layer math on random data, and whole runs on tiny models through ``compress``, the saved folder, resume and
streaming."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_resume_and_streaming_identical, save_tiny_llama, write_calibration_text

from lmshrink import compress, load_model
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import CorrectedResult, LowRankResult, QuantResult
from lmshrink.formats.lowrank import LOWRANK_KEY, lowrank_layers
from lmshrink.methods.lowrank.allocation import LayerCurve, allocate_ranks
from lmshrink.methods.lowrank.factorize import (
    activation_scale,
    check_rank,
    cholesky_whitening,
    max_rank,
    rank_for_ratio,
    refit_left,
    shared_basis,
    truncated_svd,
    truncation_errors,
)
from lmshrink.pipeline.recipe import RecipeError, parse_recipe
from lmshrink.runtime.lowrank import CorrectedLinear, LowRankLinear


def _layer(out_features=24, in_features=32, tokens=400, seed=0):
    """A weight and correlated inputs (a few strong directions), float64."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    mix = torch.randn(in_features, in_features, generator=g, dtype=torch.float64)
    mix = mix * torch.logspace(0, -2, in_features, dtype=torch.float64)[None, :]
    inputs = torch.randn(tokens, in_features, generator=g, dtype=torch.float64) @ mix.t()
    return weight, inputs


# -- the layer math ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whitening", ["none", "asvd", "cholesky"])
def test_full_rank_reproduces_the_layer(whitening):
    weight, inputs = _layer()
    scale = {"none": None, "asvd": activation_scale(inputs.abs().mean(0), 0.5),
             "cholesky": cholesky_whitening(inputs.t() @ inputs)[0]}[whitening]
    truncation = truncated_svd(weight, min(weight.shape), scale)
    torch.testing.assert_close((truncation.left @ truncation.right).double(), weight, rtol=0, atol=2e-5)


def test_whitened_truncation_error_is_the_sum_of_dropped_squared_singular_values():
    weight, inputs = _layer(out_features=40, in_features=30, tokens=600, seed=3)
    hessian = inputs.t() @ inputs
    lower, info = cholesky_whitening(hessian)
    assert info["whitening_shift"] == 0.0
    for rank in (1, 7, 20):
        truncation = truncated_svd(weight, rank, lower)
        approx = truncation.left.double() @ truncation.right.double()
        output_error = float(((weight - approx) @ inputs.t()).square().sum())
        dropped = float(truncation.singular_values[rank:].square().sum())
        assert output_error == pytest.approx(dropped, rel=1e-4)
        # and the curve from one SVD says the same, relative to ||W X||^2
        curve = truncation_errors(weight, hessian, lower)
        assert float(curve[rank]) == pytest.approx(dropped / float((weight @ inputs.t()).square().sum()), rel=1e-6)
    # no other rank-r matrix does better on these inputs: plain SVD's truncation is worse
    plain = truncated_svd(weight, 7)
    plain_error = float(((weight - plain.left.double() @ plain.right.double()) @ inputs.t()).square().sum())
    assert plain_error > float(truncated_svd(weight, 7, lower).singular_values[7:].square().sum())


def test_truncation_error_curves_hold_for_every_weighting():
    weight, inputs = _layer(seed=5)
    hessian = inputs.t() @ inputs
    for scale in (None, activation_scale(inputs.abs().mean(0), 0.5)):
        curve = truncation_errors(weight, hessian, scale)
        for rank in (3, 11):
            t = truncated_svd(weight, rank, scale)
            diff = weight - t.left.double() @ t.right.double()
            measured = float((diff @ hessian * diff).sum() / (weight @ hessian * weight).sum())
            assert float(curve[rank]) == pytest.approx(measured, rel=1e-4)
        assert float(curve[0]) == pytest.approx(1.0) and float(curve[-1]) == pytest.approx(0.0, abs=1e-12)


def test_a_hessian_that_is_not_positive_definite_is_shifted():
    _, inputs = _layer(in_features=16, tokens=8)  # fewer tokens than inputs: singular
    hessian = inputs.t() @ inputs
    hessian[3, :] = hessian[:, 3] = 0.0  # a dead channel
    lower, info = cholesky_whitening(hessian)
    assert info["whitening_shift"] > 0 and torch.isfinite(lower).all()


def test_ranks_that_would_grow_a_layer_are_refused():
    assert max_rank(576, 576) == 287 and max_rank(192, 576) == 143  # m n / (m + n) = 288 and 144
    check_rank("q", 576, 576, 287)
    for rank in (288, 400, 0):
        with pytest.raises(LmshrinkError, match="pays only for 1 <= rank < 288"):
            check_rank("q", 576, 576, rank)
    with pytest.raises(LmshrinkError, match="2 layers sharing one basis"):
        check_rank("q", 576, 576, 384, shared_by=2)  # 2 m k / (k + 2 m) = 384
    assert rank_for_ratio(576, 576, 0.2) == 230


def test_left_refit_on_the_same_inputs_keeps_the_whitened_truncation():
    weight, inputs = _layer(seed=2)
    hessian = inputs.t() @ inputs
    truncation = truncated_svd(weight, 9, cholesky_whitening(hessian)[0])
    refit = refit_left(weight, truncation.right, hessian)
    torch.testing.assert_close(refit, truncation.left, rtol=1e-4, atol=1e-5)


def test_left_refit_toward_other_inputs_lowers_that_error():
    weight, inputs = _layer(seed=4)
    drifted = inputs + 0.3 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(9), dtype=inputs.dtype)
    hessian, cross = drifted.t() @ drifted, inputs.t() @ drifted
    truncation = truncated_svd(weight, 6, cholesky_whitening(hessian)[0])

    def error(left):
        return float((weight @ inputs.t() - left.double() @ truncation.right.double() @ drifted.t()).square().sum())

    assert error(refit_left(weight, truncation.right, hessian, cross)) < error(truncation.left)


def test_shared_basis_of_one_layer_is_its_whitened_truncation():
    weight, inputs = _layer(seed=6)
    hessian = inputs.t() @ inputs
    lefts, right, _ = shared_basis([weight], hessian, 5)
    single = truncated_svd(weight, 5, cholesky_whitening(hessian)[0])
    torch.testing.assert_close(lefts[0] @ right, single.left @ single.right, rtol=1e-4, atol=1e-5)


def test_sensitivity_allocation_spends_the_budget_where_the_error_drops_most():
    easy = LayerCurve("easy", 16, 16, torch.tensor([1.0] + [0.0] * 16))  # one rank removes all its error
    hard = LayerCurve("hard", 16, 16, torch.linspace(1.0, 0.0, 17))
    ranks = allocate_ranks([easy, hard], ratio=0.5)
    assert ranks["easy"] == 1 and ranks["hard"] == 7  # budget 256 numbers: 32 per rank; 1 + 7 ranks
    assert sum(r * 32 for r in ranks.values()) <= 0.5 * 2 * 256
    # a layer whose error does not fall with rank is better left dense, if the budget allows its last step
    stubborn = LayerCurve("stubborn", 16, 16, torch.tensor([1.0] * 16 + [0.0]))
    ranks = allocate_ranks([easy, stubborn], ratio=0.4)
    assert ranks == {"easy": 1, "stubborn": None}
    assert allocate_ranks([easy, stubborn], ratio=0.4, allow_dense=False)["stubborn"] == 1  # no rank gains


# -- modules -------------------------------------------------------------------------------------------------------


def test_lowrank_modules_compute_two_matmuls():
    g = torch.Generator().manual_seed(0)
    module = LowRankLinear(8, 6, 3, bias=True)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(5, 8, generator=g)
    torch.testing.assert_close(module(x), x @ module.dense_weight().t() + module.bias)
    base = torch.nn.Linear(8, 6)
    corrected = CorrectedLinear(base, LowRankLinear(8, 6, 2))
    torch.testing.assert_close(corrected(x), base(x) + corrected.correction(x))


# -- recipes -------------------------------------------------------------------------------------------------------


def test_recipes_refuse_contradictions():
    with pytest.raises(RecipeError, match="either rank or ratio"):
        parse_recipe([{"method": "svd", "rank": 4, "ratio": 0.2}])
    with pytest.raises(RecipeError, match="fp_target needs whitening: cholesky"):
        parse_recipe([{"method": "svd", "whitening": "asvd", "fp_target": True}])
    with pytest.raises(RecipeError, match="update"):
        parse_recipe([{"method": "svd", "update": True, "fp_target": True}])


# -- whole runs on a tiny model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-lowrank"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt",
                                  "A factorized layer runs as two smaller matmuls.")


def _compress(source, calib_file, recipe, **kw):
    return compress(source, recipe, calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False, **kw)


def _logits(model):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loaded(tiny_dir):
    return load_model(str(tiny_dir), progress=False)


RECIPES = {
    "svd-llm": [{"method": "svd", "ratio": 0.3}],
    "asvd": [{"method": "svd", "whitening": "asvd", "ratio": 0.3}],
    "sensitivity": [{"method": "svd", "ratio": 0.3, "allocation": "sensitivity"}],
    "update": [{"method": "svd", "ratio": 0.3, "update": True}],
    "share": [{"method": "basis-sharing", "ratio": 0.3, "layers_per_basis": 2},
              {"method": "svd", "ratio": 0.3, "targets": ["*o_proj", "*down_proj"]}],
    "share-refit": [{"method": "basis-sharing", "ratio": 0.3, "refit": True}],
    "factors-w4": [{"method": "svd", "ratio": 0.3}, {"method": "gptq-factors", "bits": 4, "group_size": 16}],
    "gptq+lrc": {"order": "group", "stages": [{"method": "gptq", "bits": 3, "group_size": 32, "fp_target": True},
                                              {"method": "lowrank-correction", "rank": 4}]},
    "gptq+lrc4": [{"method": "gptq", "bits": 3, "group_size": 32},
                  {"method": "lowrank-correction", "bits_per_weight": 1.0, "factor_bits": 4, "factor_group_size": 16}],
}


@pytest.mark.parametrize("recipe", ["svd-llm", "asvd", "share", "factors-w4", "gptq+lrc", "gptq+lrc4"])
def test_saved_folder_reloads_to_the_same_logits(tiny_dir, calib_file, tmp_path, recipe):
    model = _loaded(tiny_dir)
    record = _compress(model, calib_file, RECIPES[recipe], output=tmp_path / "out")
    reloaded = load_model(str(tmp_path / "out"), progress=False).model
    torch.testing.assert_close(_logits(reloaded), _logits(model.model), rtol=1e-4, atol=1e-4)
    layers = lowrank_layers(tmp_path / "out")
    modules = dict(reloaded.named_modules())
    kinds = {type(modules[name]).__name__ for name in layers}
    assert kinds == ({"CorrectedLinear"} if recipe.startswith("gptq+lrc") else {"LowRankLinear"})
    storage = record["summary"]["lowrank_storage"]
    assert "plain transformers cannot load" in storage["loading"]
    if not recipe.startswith("gptq+lrc"):
        assert storage["block_linear_params"]["removed_fraction"] >= 0.29
        # the folder holds the factors, not the dense weights
        assert all(f"{name}.weight" not in dict(reloaded.named_parameters()) for name in layers)


def test_evaluate_reads_a_factorized_folder(tiny_dir, calib_file, tmp_path):
    from lmshrink import evaluate

    _compress(_loaded(tiny_dir), calib_file, RECIPES["svd-llm"], output=tmp_path / "out")
    record = evaluate(str(tmp_path / "out"), ppl=f"file:{calib_file}", seqlen=16, limit=2, progress=False)
    assert record["perplexity"][0]["ppl"] > 1 and record["sparsity"]["skipped_packed_layers"] == 14
    dense_body = evaluate(str(tiny_dir), ppl=f"file:{calib_file}", seqlen=16, limit=2, progress=False)
    assert record["size"]["body_parameters"] < dense_body["size"]["body_parameters"]


def test_bench_runs_a_factorized_folder_beside_the_dense_model(tiny_dir, calib_file, tmp_path):
    from lmshrink import bench

    record = _compress(_loaded(tiny_dir), calib_file, RECIPES["share"], output=tmp_path / "out")
    result = bench([str(tiny_dir), str(tmp_path / "out")], prompt_tokens=12, new_tokens=3, trials=1, warmup=0,
                   decode="fast")
    dense, factorized = result["models"]
    params = record["summary"]["lowrank_storage"]["block_linear_params"]
    # the bench counts the linears' bytes as held in memory: factors, each shared basis once
    assert factorized["size"]["linear_weight_bytes"] == 4 * params["stored"]
    assert dense["size"]["linear_weight_bytes"] == 4 * params["dense"]
    assert factorized["fast_linears"]["o:modules"] == 2  # the lean decoder runs the factorized modules as they are


def test_shared_bases_are_stored_once_and_shared_on_reload(tiny_dir, calib_file, tmp_path):
    model = _loaded(tiny_dir)
    record = _compress(model, calib_file, RECIPES["share"], output=tmp_path / "out")
    layers = lowrank_layers(tmp_path / "out")
    shared = {n: s for n, s in layers.items() if "basis" in s}
    assert len(shared) == 10 and sum("right_from" in s for s in shared.values()) == 5  # 5 types x 2 blocks
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert json.loads(handle.metadata()[LOWRANK_KEY]) == layers
    for name, spec in shared.items():
        assert (f"{name}.right.weight" in keys) == ("right_from" not in spec)
    reloaded = load_model(str(tmp_path / "out"), progress=False).model
    q0, q1 = reloaded.model.layers[0].self_attn.q_proj, reloaded.model.layers[1].self_attn.q_proj
    assert q0.right is q1.right and q0.left is not q1.left
    results = record["results"]
    assert results["model.layers.0.mlp.up_proj"].basis == "mlp.up_proj@0-1"
    assert all(isinstance(r, LowRankResult) for r in results.values())


def test_lowrank_correction_lowers_the_error_of_the_quantized_layer(tiny_dir, calib_file, tmp_path):
    model = _loaded(tiny_dir)
    record = _compress(model, calib_file, RECIPES["gptq+lrc"], output=tmp_path / "out")
    corrected = [line for line in record["layers"] if line["method"] == "lowrank-correction"]
    assert len(corrected) == 14 and all(line["correction_rank"] == 4 for line in corrected)
    assert all(line["rel_output_error"] < line["base_rel_output_error"] for line in corrected)
    result = record["results"]["model.layers.1.mlp.down_proj"]
    assert isinstance(result, CorrectedResult) and isinstance(result.base, QuantResult)
    assert result.left.dtype == torch.float32 and torch.equal(result.left, result.left.half().float())
    # the packed runtime runs the quantized base packed, plus the correction
    packed = load_model(str(tmp_path / "out"), runtime="packed", progress=False).model
    assert type(packed.model.layers[1].mlp.down_proj).__name__ == "CorrectedLinear"
    torch.testing.assert_close(_logits(packed), _logits(model.model), rtol=2e-3, atol=2e-3)


def test_gptq_on_the_factors_stores_codes(tiny_dir, calib_file, tmp_path):
    record = _compress(_loaded(tiny_dir), calib_file, RECIPES["factors-w4"], output=tmp_path / "out")
    result = record["results"]["model.layers.0.mlp.down_proj"]
    assert result.quantized and result.left_quant.spec.bits == 4
    assert torch.equal(result.left, result.left_quant.dense()) and int(result.right_quant.codes.max()) <= 15
    lines = [line for line in record["layers"] if line["method"] == "gptq-factors"]
    assert len(lines) == 14 and all(line["rel_output_error"] < 0.2 for line in lines)
    layers = lowrank_layers(tmp_path / "out")
    assert all(spec["grid"]["bits"] == 4 for spec in layers.values())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        name = "model.layers.0.mlp.down_proj"
        assert handle.get_tensor(f"{name}.left.codes").dtype == torch.int32
        assert f"{name}.left.weight" not in handle.keys()
    with pytest.raises(RecipeError, match="which no earlier stage factorizes"):
        _compress(_loaded(tiny_dir), calib_file, [{"method": "gptq-factors", "group_size": 16}])


def test_quantized_correction_fills_its_bit_budget_with_a_higher_rank(tiny_dir, calib_file):
    record = _compress(_loaded(tiny_dir), calib_file, RECIPES["gptq+lrc4"])
    lines = {line["name"]: line for line in record["layers"] if line["method"] == "lowrank-correction"}
    # 1 bit per weight of a 64 x 64 layer at 4 + 20/16 bits per factor element: rank floor(4096 / (5.25 * 128)) = 6
    assert lines["model.layers.0.self_attn.q_proj"]["correction_rank"] == 6
    assert all(line["rel_output_error"] < line["base_rel_output_error"] for line in lines.values())
    result = record["results"]["model.layers.0.self_attn.q_proj"]
    assert result.quantized and int(result.left_quant.codes.max()) <= 15


def test_merge_stores_dense_weights_that_plain_transformers_loads(tiny_dir, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _loaded(tiny_dir)
    record = _compress(model, calib_file, [{"method": "svd", "ratio": 0.3, "merge": True}], output=tmp_path / "out")
    assert lowrank_layers(tmp_path / "out") == {}
    storage = record["summary"]["lowrank_storage"]
    assert storage["merged_layers"] == 14 and "save no parameters" in storage["merged"]
    assert storage["block_linear_params"]["removed_fraction"] == 0.0
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(_logits(plain), _logits(model.model), rtol=1e-4, atol=1e-4)


def test_sensitivity_allocation_records_the_ranks_under_the_budget(tiny_dir, calib_file):
    record = _compress(_loaded(tiny_dir), calib_file, RECIPES["sensitivity"])
    options = record["block_options"]["stage 1"]
    ranks = {f"model.layers.{b}.{n}": r for b, o in options.items() for n, r in o["ranks"].items()}
    kept_dense = [n for o in options.values() for n in o.get("ignore", []) if n.startswith("model.layers.")]
    assert len(ranks) + len(kept_dense) == 14 and not set(ranks) & set(kept_dense)
    lines = {line["name"]: line for line in record["layers"]}
    assert set(lines) == set(ranks) and all(lines[n]["rank"] == r for n, r in ranks.items())
    params = record["summary"]["lowrank_storage"]["block_linear_params"]
    assert params["removed_fraction"] >= 0.3 - 1e-9 and len(set(ranks.values())) > 2


def test_a_rank_that_grows_a_layer_is_refused_in_a_run(tiny_dir, calib_file):
    with pytest.raises(LmshrinkError, match="pays only for"):
        _compress(_loaded(tiny_dir), calib_file, [{"method": "svd", "rank": 40}])  # 64 x 64: below 32


def test_factorized_layers_cannot_be_quantized_or_recovered_after(tiny_dir, calib_file):
    with pytest.raises(RecipeError, match="replaced by low-rank factors"):
        _compress(_loaded(tiny_dir), calib_file, [{"method": "svd"}, {"method": "gptq", "group_size": 32}])
    with pytest.raises(RecipeError, match="which an earlier stage quantizes"):
        _compress(_loaded(tiny_dir), calib_file, [{"method": "gptq", "group_size": 32}, {"method": "svd"}])
    with pytest.raises(RecipeError, match="no error to correct|no earlier stage"):
        _compress(_loaded(tiny_dir), calib_file, [{"method": "lowrank-correction", "rank": 2}])


@pytest.mark.parametrize("recipe", ["svd-llm", "update", "sensitivity", "share", "share-refit", "factors-w4",
                                    "gptq+lrc", "gptq+lrc4"])
def test_resume_and_streaming_are_bit_identical(tiny_dir, calib_file, tmp_path, recipe):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else _loaded(tiny_dir)
        return _compress(source, calib_file, RECIPES[recipe], output=output,
                         offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)
