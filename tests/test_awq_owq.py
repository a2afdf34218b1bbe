"""AWQ (the ``awq`` block stage: scales folded into the producer, clipping) and OWQ (the ``owq`` layer stage: 16-bit
outlier columns, GPTQ on the rest): folding on every family, the searches, storage, loading, the packed runtime,
export refusals, resume and streaming, and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    assert_resume_and_streaming_identical,
    correlated_layer,
    save_tiny_llama,
    tiny_tokenizer,
    write_calibration_text,
)
from tiny_families import FAMILIES, tiny_model

from lmshrink import compress, export, load_model
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec, dequantize, fake_quantize
from lmshrink.core.results import RESULT_KINDS, OutlierQuantResult
from lmshrink.formats.compressed_tensors import OUTLIER_FORMAT, load_quantized_results, packed_storage
from lmshrink.methods.quant.awq import candidate_scale, group_output_error, search_clip, search_scale
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.owq import column_sensitivity, kept_column_count, owq_quantize
from lmshrink.models.adapters import get_adapter, linear_weight
from lmshrink.pipeline.recipe import RecipeError, parse_recipe
from lmshrink.runtime.qlinear import OutlierLinear

AWQ_RTN = [{"method": "awq", "bits": 4, "group_size": 32}, {"method": "rtn", "bits": 4, "group_size": 32,
                                                             "clip_search": False}]
OWQ = [{"method": "owq", "bits": 3, "fraction": 0.1}]


def _logits(model, seed=1):
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_heads(family):
    """The tiny model with as many value heads as query heads (so v -> o folds too), where the family has both."""
    model = tiny_model(family)
    if getattr(model.config, "num_key_value_heads", None) is not None:
        model = tiny_model(family, num_key_value_heads=model.config.num_attention_heads)
    return model


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt", "Outlier channels matter.")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-awq"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


# -- folding ---------------------------------------------------------------------------------------------------------

# the links each family cannot fold, and why (on the tiny models with as many value heads as query heads)
SKIPPED = {"gpt2": {"mlp.c_fc": "gelu_new"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_a_scale_leaves_the_float_model_unchanged(family):
    model = _same_heads(family)
    before = _logits(model)
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(3)
    folded = []
    for block in adapter.blocks(model):
        for link in adapter.scale_links(block):
            expected = SKIPPED.get(family, {}).get(link.link.producer)
            if expected is not None:
                assert link.reason is not None and expected in link.reason
                continue
            assert link.reason is None, f"{family}: {link.link.producer}: {link.reason}"
            scale = torch.rand(link.width, generator=generator) * 3 + 0.2
            changed = adapter.fold_input_scale(block, link, scale)
            assert f"{link.link.consumers[0]}.weight" in changed and f"{link.link.producer}.weight" in changed
            folded.append(link.link.producer)
    assert len(folded) == 2 * (4 - len(SKIPPED.get(family, {})))
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3", "opt", "gpt2", "gemma2"])
def test_awq_without_clipping_leaves_the_float_model_unchanged(family, calib_file):
    model = _same_heads(family)
    before = _logits(model)
    record = compress(model, [{"method": "awq", "group_size": 16, "clip": False}], calibration=f"file:{calib_file}",
                      nsamples=4, seqlen=32, tokenizer=tiny_tokenizer(), progress=False)
    groups = [g for block in record["block_stages"] for g in block["groups"]]
    assert len(groups) == 8 and all("alpha" in g or "skipped" in g for g in groups)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_grouped_query_attention_skips_v_to_o_and_says_why(calib_file):
    model = tiny_model("llama")  # 4 query heads, 2 value heads
    record = compress(model, [{"method": "awq", "group_size": 16, "clip": False}], calibration=f"file:{calib_file}",
                      nsamples=4, seqlen=32, tokenizer=tiny_tokenizer(), progress=False)
    skipped = [g for g in record["block_stages"][0]["groups"] if "skipped" in g]
    assert [g["producer"] for g in skipped] == ["self_attn.v_proj"]
    assert "grouped-query attention (4 query heads, 2 value heads)" in skipped[0]["skipped"]


# -- the searches ----------------------------------------------------------------------------------------------------

def test_scale_search_picks_alpha_zero_when_activations_are_uniform():
    weight, _, hessian = correlated_layer(48, 64)
    spec = GridSpec(bits=3, group_size=32)
    scale, info = search_scale([weight], hessian, torch.full((64,), 0.7), spec)
    assert info["alpha"] == 0.0 and torch.equal(scale, torch.ones(64))
    assert info["rel_output_error"] == info["rel_output_error_alpha0"]


def test_scale_search_protects_loud_channels_and_never_scores_worse_than_no_scale():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=gen)
    loudness = torch.ones(64)
    loudness[[3, 17, 40]] = 30.0  # three channels with large activations
    x = torch.randn(512, 64, generator=gen) * loudness
    hessian = x.t() @ x
    spec = GridSpec(bits=3, group_size=32)
    scale, info = search_scale([weight], hessian, x.abs().mean(dim=0), spec)
    assert info["alpha"] > 0 and info["rel_output_error"] < 0.8 * info["rel_output_error_alpha0"]
    assert scale[[3, 17, 40]].min() > scale.max() * 0.9  # the loud channels get the largest scales
    # the reported error is the group's output error of that scale, computed from the inputs themselves
    rounded = fake_quantize(weight * scale, spec) / scale
    direct = float(((weight - rounded) @ x.t()).square().sum() / (weight @ x.t()).square().sum())
    assert math.isclose(info["rel_output_error"], direct, rel_tol=1e-3)
    assert math.isclose(group_output_error([weight], hessian, candidate_scale(x.abs().mean(0), 0.0), spec),
                        info["rel_output_error_alpha0"] * float((weight @ x.t()).square().sum()), rel_tol=1e-3)


def test_clip_search_never_raises_the_rounding_error():
    weight, _, hessian = correlated_layer(48, 96, seed=2)
    weight[:, 5] *= 8  # a few large weights: clipping pays off
    clamped, info = search_clip(weight, hessian, GridSpec(bits=3, group_size=32))
    assert info["rel_output_error_after_clip"] <= info["rel_output_error_before_clip"]
    assert 0 < info["clipped_ranges"] <= 1 and bool((clamped.abs() <= weight.abs()).all())


# -- OWQ on one layer ------------------------------------------------------------------------------------------------

def test_owq_keeps_exactly_k_columns_in_16_bits_and_rounds_the_rest_onto_the_grid():
    weight, _, hessian = correlated_layer(48, 64, seed=1)
    spec = GridSpec(bits=3, group_size=-1, clip_search=True, scale_dtype="float16")
    result = owq_quantize(weight, hessian, spec, 5)
    columns = result.columns
    assert columns.numel() == 5 and torch.equal(columns, torch.sort(columns).values)
    # the kept columns are the five most sensitive ones
    top = torch.argsort(column_sensitivity(weight, hessian, spec), descending=True)[:5]
    assert set(columns.tolist()) == set(top.tolist())
    assert result.values.dtype == torch.float16 and torch.equal(result.weight[:, columns], result.values.float())
    grid = dequantize(result.codes, result.scale, result.zero, result.group_index())
    rest = torch.ones(64, dtype=torch.bool)
    rest[columns] = False
    assert torch.equal(result.weight[:, rest], grid[:, rest])  # on the grid, bit for bit
    assert bool((grid[:, columns] == 0).all())  # the grid alone decodes the kept columns to 0
    # the kept columns absorbed the others' compensation: they differ from the original weights
    assert not torch.equal(result.values.float(), weight[:, columns].half().float())
    plain = gptq_quantize(weight, hessian, spec)
    assert result.rel_output_error < plain.rel_output_error


def test_kept_column_count_follows_extra_bits_or_fraction():
    assert kept_column_count(576, 0.01, None) == 1  # 0.36 columns' worth: at least the target
    assert kept_column_count(4096, 0.01, None) == 3
    assert kept_column_count(1536, 0.5, None) == 48
    assert kept_column_count(100, None, 0.1) == 10


def test_outlier_result_round_trips_its_checkpoint_form():
    weight, _, hessian = correlated_layer(16, 32)
    result = owq_quantize(weight, hessian, GridSpec(bits=4, group_size=16), 3)
    tensors, meta = result.to_state()
    back = RESULT_KINDS[result.kind].from_state(tensors, meta)
    assert isinstance(back, OutlierQuantResult) and torch.equal(back.weight, result.weight)
    assert torch.equal(back.columns, result.columns) and torch.equal(back.values, result.values)


# -- through compress: storage, loading, runtime, exports -----------------------------------------------------------

def test_owq_folder_loads_exactly_runs_packed_and_counts_its_stored_bits(tiny_dir, calib_file, tmp_path):
    model = load_model(str(tiny_dir), progress=False)
    out = tmp_path / "owq"
    with pytest.warns(UserWarning, match="14 layers \\(e.g. model.layers.0.mlp.down_proj\\) keep input columns in 16 "
                                         "bits.*plain transformers refuse.*lmshrink.load_model reads it"):
        record = compress(model, OWQ, output=out, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
                          progress=False)
    reference = _logits(model.model)
    torch.testing.assert_close(_logits(load_model(str(out), progress=False).model), reference, rtol=0, atol=0)
    packed = load_model(str(out), progress=False, runtime="packed")
    assert all(kind.endswith("+columns") for kind in packed.info.extra["packed_layers"])
    assert sum(isinstance(m, OutlierLinear) for m in packed.model.modules()) == 14
    torch.testing.assert_close(_logits(packed.model), reference, rtol=1e-4, atol=1e-4)
    results = load_quantized_results(out)
    kept = {layer["name"]: layer["kept_columns"] for layer in record["layers"]}
    assert {name: r.columns.numel() for name, r in results.items()} == kept
    for name, result in results.items():
        assert torch.equal(result.weight, record["results"][name].weight)
    # stored bits: 3-bit codes packed per row, a scale in the model's dtype (float32) and a packed 3-bit zero per
    # row, and per kept column an int32 index and a float16 value per row
    expected = 0
    for layer in record["layers"]:
        rows, cols, k = layer["out_features"], layer["in_features"], layer["kept_columns"]
        expected += 32 * rows * math.ceil(cols * 3 / 32) + 32 * rows + 32 * math.ceil(rows * 3 / 32) + 32 * k
        expected += 16 * rows * k
    storage = packed_storage(out)
    assert storage["layers"] == 14 and storage["bytes"] * 8 == expected
    weights = sum(layer["out_features"] * layer["in_features"] for layer in record["layers"])
    assert math.isclose(storage["bits_per_weight"], expected / weights)


def test_outlier_folders_are_refused_by_transformers_and_the_exports_that_cannot_hold_them(tiny_dir, calib_file,
                                                                                          tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "owq"
    compress(load_model(str(tiny_dir), progress=False), OWQ, output=out, calibration=f"file:{calib_file}",
             nsamples=4, seqlen=32, progress=False)
    with pytest.raises(Exception, match=OUTLIER_FORMAT):
        AutoModelForCausalLM.from_pretrained(str(out))
    for to, name in (("gguf", "GGUF"), ("gptq", "GPTQ")):
        with pytest.raises(LmshrinkError, match=f"model.layers.0.mlp.down_proj\\) keep input columns in 16 bits.*"
                                                f"{name}") as caught:
            export(str(out), to, str(tmp_path / f"x.{to}"))
        assert "w4g128" in caught.value.fix and not (tmp_path / f"x.{to}").exists()


def test_awq_folder_is_a_plain_compressed_tensors_checkpoint(tiny_dir, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_dir), progress=False)
    out = tmp_path / "awq"
    record = compress(model, AWQ_RTN, output=out, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
                      progress=False)
    assert [b["block"] for b in record["block_stages"]] == [0, 1]
    assert set(record["block_stages"][0]["clipped"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                         "mlp.up_proj", "mlp.down_proj"}
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(_logits(plain), _logits(model.model), rtol=1e-4, atol=1e-4)


def test_awq_lowers_the_rounding_error_of_rtn(tiny_dir, calib_file):
    errors = {}
    for name, recipe in (("rtn", AWQ_RTN[1:]), ("awq", AWQ_RTN)):
        record = compress(load_model(str(tiny_dir), progress=False), recipe, calibration=f"file:{calib_file}",
                          nsamples=4, seqlen=32, progress=False)
        errors[name] = record["summary"]["mean_rel_output_error"]
    assert errors["awq"] < errors["rtn"]


@pytest.mark.parametrize("recipe", [AWQ_RTN, OWQ, [{"method": "awq", "bits": 3, "group_size": 32, "clip": False},
                                                   {"method": "gptq", "bits": 3, "group_size": 32, "fp_target": True}]],
                         ids=["awq-rtn", "owq", "awq-gptq-fp"])
def test_resume_and_streaming_are_bit_identical(tiny_dir, calib_file, tmp_path, recipe):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, recipe, output=output, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
                        progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)


# -- options ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, option", [
    ({"method": "owq", "extra_bits": 0.01, "fraction": 0.1}, "fraction"),
    ({"method": "owq", "extra_bits": 0}, "extra_bits"),
    ({"method": "owq", "fraction": 1.5}, "fraction"),
    ({"method": "awq", "alpha_grid": 0}, "alpha_grid"),
    ({"method": "awq", "clip_max_shrink": 1.0}, "clip_max_shrink"),
    ({"method": "awq", "group_size": 0}, "group_size"),
    ({"method": "awq", "alpha": 0.5}, "alpha"),
])
def test_bad_options_name_the_option(stage, option):
    with pytest.raises(RecipeError, match=f"option '{option}'"):
        parse_recipe([stage])


def test_presets_parse_and_awq_warns_without_a_matching_rounding_stage(tiny_dir, calib_file):
    for name in ("awq-w4g128", "awq-w3g128", "awq-gptq-w4g128", "awq-gptq-w3g128", "owq-w3", "owq-w4"):
        from lmshrink.pipeline.recipe import load_recipe

        recipe = load_recipe(name)
        assert recipe.stages[0].method in ("awq", "owq")
    record = compress(load_model(str(tiny_dir), progress=False), [AWQ_RTN[0], {**AWQ_RTN[1], "bits": 3}],
                      calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    assert any("stage 2 (rtn) rounds onto 3 bits" in note for note in record["warnings"])


def test_owq_refuses_a_pruned_layer_before_any_work(tiny_dir, calib_file):
    with pytest.raises(RecipeError, match="owq does not keep pruned zeros"):
        compress(load_model(str(tiny_dir), progress=False), [{"method": "magnitude"}, OWQ[0]],
                 calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)


def test_awq_keeps_the_float_layers_it_scales_on_streamed_runs(tiny_dir, calib_file, tmp_path):
    """A layer the awq stage scales but no later stage rounds is written with its scaled weight (the engine's
    changed tensors), so a streamed run's folder is still the model it computed."""
    recipe = [{"method": "awq", "group_size": 32, "clip": False},
              {"method": "rtn", "group_size": 32, "targets": ["*mlp*"]}]
    model = load_model(str(tiny_dir), progress=False)
    compress(model, recipe, calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    out = tmp_path / "streamed"
    compress(str(tiny_dir), recipe, output=out, calibration=f"file:{calib_file}", nsamples=4, seqlen=32,
             progress=False, offload="disk")
    reloaded = load_model(str(out), progress=False).model
    torch.testing.assert_close(_logits(reloaded), _logits(model.model), rtol=1e-5, atol=1e-5)
    scaled = linear_weight(reloaded.model.layers[0].self_attn.q_proj)
    assert not torch.equal(scaled, linear_weight(load_model(str(tiny_dir), progress=False).model.model.layers[0]
                                                 .self_attn.q_proj))


def test_the_sweep_takes_an_explicit_column_order_and_refuses_a_wrong_one():
    from lmshrink.methods.quant.gptq import GridRule
    from lmshrink.methods.solver import solve_columns

    weight, _, hessian = correlated_layer(16, 32)
    spec = GridSpec(bits=4, group_size=-1)
    reverse = torch.arange(31, -1, -1)
    result = solve_columns(weight, hessian, GridRule(spec), order=reverse)
    assert torch.equal(result.perm, reverse) and result.weight.shape == weight.shape
    with pytest.raises(ValueError, match="permutation of the 32 columns"):
        solve_columns(weight, hessian, GridRule(spec), order=torch.zeros(32, dtype=torch.long))


@pytest.mark.parametrize("first", [{"method": "awq", "bits": 8, "group_size": 32, "clip": False},
                                   {"method": "smoothquant", "alpha": 0.5, "pairs": ["up-down"]}],
                         ids=["awq", "smoothquant"])
def test_fp_target_after_a_fold_aims_at_the_folded_layers(tiny_dir, calib_file, first):
    """A fold scales the producer linear's rows (up -> down): GPTQ with fp_target after awq (or smoothquant) aims at
    that folded layer, so at 8 bits the result is the folded block rounded finely, not the unscaled layer."""
    only = load_model(str(tiny_dir), progress=False)
    record = compress(only, [first], calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    if first["method"] == "awq":
        link = next(g for g in record["block_stages"][0]["groups"] if g["producer"] == "mlp.up_proj")
        assert link["alpha"] > 0  # else the fold changes nothing and the test says nothing
    both = load_model(str(tiny_dir), progress=False)
    compress(both, [first, {"method": "gptq", "bits": 8, "group_size": 32, "fp_target": True}],
             calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    original = load_model(str(tiny_dir), progress=False)

    def up(model):
        return linear_weight(model.model.model.layers[0].mlp.up_proj).float()

    folded, solved = up(only), up(both)
    assert (folded - up(original)).norm() > 0.1 * folded.norm()
    assert (solved - folded).norm() < 0.02 * folded.norm()
