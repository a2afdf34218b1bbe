import warnings

import pytest
import torch

from lmshrink.methods.quant.stages import GPTQStage
from lmshrink.pipeline.checks import check_recipe
from lmshrink.pipeline.presets import PRESETS
from lmshrink.pipeline.recipe import RecipeError, load_recipe, parse_recipe, quantizes


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_parse_and_round_trip_yaml(name, tmp_path):
    recipe = load_recipe(name)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(str(path))
    assert again.to_dict()["stages"] == recipe.to_dict()["stages"]


def test_short_stage_form_and_defaults():
    recipe = parse_recipe([{"gptq": {"bits": 3}}])
    (stage,) = recipe.stages
    assert isinstance(stage, GPTQStage) and stage.bits == 3 and stage.group_size == 128 and stage.act_order


@pytest.mark.parametrize("stages, needle", [
    ([{"method": "gptx"}], "stage 1: unknown method 'gptx'"),
    ([{"method": "gptq", "bits": 5}], "stage 1 (gptq): option 'bits' = 5"),
    ([{"method": "gptq", "group_size": 0}], "option 'group_size' = 0"),
    ([{"method": "rtn", "act_order": True}], "stage 1 (rtn): unknown option 'act_order'"),
    ([{"method": "gptq"}, {"method": "gptq", "damp_percent": -1}], "stage 2 (gptq): option 'damp_percent'"),
    ([], "non-empty"),
])
def test_bad_recipes_name_stage_and_option(stages, needle):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"stages": stages})
    assert needle in err.value.message


def test_unknown_preset_and_missing_file():
    with pytest.raises(RecipeError, match="unknown recipe 'w5'"):
        load_recipe("w5")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("missing.yaml")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages: [method: gptq\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


LAYERS = [("model.layers.0.self_attn.q_proj", 576), ("model.layers.0.mlp.down_proj", 1536)]


def test_check_recipe_against_model_layers():
    with pytest.raises(RecipeError, match="'group_size' = 1024 is larger than the input width 576"):
        check_recipe(parse_recipe([{"method": "gptq", "group_size": 1024}]), LAYERS)
    with pytest.raises(RecipeError, match="selects no layer"):
        check_recipe(parse_recipe([{"method": "gptq", "targets": ["*.nothing"]}]), LAYERS)
    with pytest.raises(RecipeError, match="both quantize"):
        check_recipe(parse_recipe([{"method": "gptq"}, {"method": "rtn", "targets": ["*down_proj"]}]), LAYERS)
    check_recipe(parse_recipe([{"method": "gptq", "targets": ["*q_proj"]}, {"method": "rtn", "targets": ["*down_proj"]}]),
                 LAYERS)


def test_group_size_not_dividing_width_warns_naming_runtimes():
    with pytest.warns(UserWarning, match="Marlin"):
        check_recipe(load_recipe("w4g128"), LAYERS)


def test_target_patterns():
    stage = parse_recipe([{"method": "rtn", "targets": ["re:.*\\.mlp\\..*"], "ignore": ["down_proj"]}]).stages[0]
    assert stage.selects("model.layers.3.mlp.up_proj")
    assert not stage.selects("model.layers.3.mlp.down_proj")
    assert not stage.selects("model.layers.3.self_attn.q_proj")
    assert not load_recipe("w4g128").stages[0].selects("lm_head")


@pytest.mark.parametrize("stages, needles", [
    ([{"gptq": 4}], ["stage 1 (gptq): the short form", "not int 4"]),
    ([{"gptq": [4]}], ["stage 1 (gptq): the short form", "not list [4]"]),
    ([{"rtn": {}}, {"gptq": "bits=4"}], ["stage 2 (gptq): the short form", "not str"]),
    ([{"method": ["gptq"]}], ["stage 1: option 'method' = ['gptq'] is a list, not a method name"]),
    ([{"method": "rtn"}, {"method": {"gptq": None}}], ["stage 2: option 'method'"]),
    ([{"bits": 4}], ["stage 1: unknown method 'bits'"]),
])
def test_malformed_stages_are_recipe_errors_naming_the_stage(stages, needles):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"stages": stages})
    for needle in needles:
        assert needle in err.value.message
    assert "gptq" in err.value.fix


ODD = [("model.layers.0.self_attn.q_proj", 36), ("model.layers.0.mlp.down_proj", 70)]
QUANTIZING = [name for name in PRESETS if any(quantizes(s) for s in load_recipe(name).stages)]


@pytest.mark.parametrize("name", QUANTIZING)
def test_scales_the_checkpoint_cannot_store_are_refused_before_compressing(name):
    """Presets fit float16 scales, which a bfloat16 checkpoint cannot store exactly: refused with a recipe fix."""
    recipe = load_recipe(name)
    layers = [("model.layers.0.self_attn.q_proj", 576), ("model.layers.0.mlp.down_proj", 1536)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_recipe(recipe, layers)  # nothing saved: no dtype, no check
        check_recipe(recipe, layers, dtype=torch.float32)
        check_recipe(recipe, layers, dtype="float16")
        with pytest.raises(RecipeError) as err:
            check_recipe(recipe, layers, dtype=torch.bfloat16)
        assert "option 'scale_dtype' = 'float16'" in err.value.message and "bfloat16" in err.value.message
        assert "scale_dtype: bfloat16" in err.value.fix and "--dtype float32" in err.value.fix
        assert "GridSpec" not in err.value.fix
        as_bf16 = parse_recipe({"stages": [{**s.model_dump(), "scale_dtype": "bfloat16"} if quantizes(s)
                                           else s.model_dump() for s in recipe.stages]})
        check_recipe(as_bf16, layers, dtype=torch.bfloat16)
        # a bfloat16 scale is not always a float16 value (range), nor float32 scales in either
        with pytest.raises(RecipeError, match="scale_dtype"):
            check_recipe(as_bf16, layers, dtype=torch.float16)


def test_group_sizes_the_checkpoint_cannot_store_are_refused_before_compressing():
    """What save_quantized refuses after the work (gcd of the group with every width of its grid under 16) is
    refused up front, and the fix considers every width: 12 divides 36 but not 70."""
    for group_size in (12, 32):
        recipe = parse_recipe([{"method": "rtn", "group_size": group_size, "scale_dtype": "float32"}])
        with pytest.warns(UserWarning, match="does not divide"):
            check_recipe(recipe, ODD)  # compressing without saving stays possible
        with pytest.raises(RecipeError) as err:
            check_recipe(recipe, ODD, dtype="float32")
        assert f"stage 1 (rtn): option 'group_size' = {group_size} does not divide" in err.value.message
        assert "input widths 36, 70" in err.value.message
        assert "(36, 70)" in err.value.fix and "-1 (per channel)" in err.value.fix
        assert "dividing 36" not in err.value.fix
    # one grid over two stages is one stored group: the writer takes the gcd over both stages' layers, so two
    # stages each fine alone (gcd(240, 272) = 16, gcd(240, 360) = 120) are refused together (gcd 8)
    two = [{"method": "rtn", "group_size": 240, "targets": ["q_proj"]},
           {"method": "gptq", "group_size": 240, "act_order": False, "targets": ["down_proj"]}]
    widths = [("a.q_proj", 272), ("a.down_proj", 360)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_recipe(parse_recipe(two[:1]), widths[:1], dtype="float16")
        check_recipe(parse_recipe(two[1:]), widths[1:], dtype="float16")
        with pytest.raises(RecipeError, match=r"stages 1, 2 \(rtn, gptq\): option 'group_size' = 240"):
            check_recipe(parse_recipe(two), widths, dtype="float16")
    # a shorter last group stored with a gcd of 16 or more is fine (576 and 1536 with g128: stored as g64)
    with pytest.warns(UserWarning):
        check_recipe(load_recipe("w4g128"), LAYERS, dtype="float16")
    # layers stored dense (GPT-2 Conv1D) are exempt
    with pytest.warns(UserWarning):
        check_recipe(parse_recipe([{"method": "rtn", "group_size": 12}]), ODD, dtype="bfloat16",
                     unpacked=[name for name, _ in ODD])


def test_grids_the_checkpoint_cannot_store_are_refused_before_compressing():
    layers = [("a.q_proj", 64), ("a.down_proj", 128)]
    no_static = parse_recipe([{"method": "gptq", "group_size": 32, "static_groups": False}])
    check_recipe(no_static, layers)
    with pytest.raises(RecipeError, match="act_order without static_groups") as err:
        check_recipe(no_static, layers, dtype="float16")
    assert "static_groups: true" in err.value.fix
    mixed = [{"method": "rtn", "group_size": 32, "targets": ["q_proj"]},
             {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "targets": ["down_proj"]}]
    check_recipe(parse_recipe(mixed), layers)
    with pytest.raises(RecipeError, match="asymmetric grids mixed with other grids"):
        check_recipe(parse_recipe(mixed), layers, dtype="float16")
    mixed[0]["symmetric"] = True  # several symmetric config groups: transformers loads them
    check_recipe(parse_recipe(mixed), layers, dtype="float16")


def test_a_recipe_name_that_is_not_a_string_is_refused():
    with pytest.raises(RecipeError, match="recipe `name` must be a string, got list"):
        parse_recipe({"name": ["a"], "stages": [{"method": "rtn"}]})
    assert parse_recipe({"name": "mine", "stages": [{"method": "rtn"}]}).name == "mine"


def test_recipe_order_defaults_to_stage_round_trips_and_rejects_other_values(tmp_path):
    assert load_recipe("sparse50-then-w4g128").order == "stage"
    grouped = parse_recipe({"order": "group", "stages": [{"method": "gptq"}]})
    path = tmp_path / "grouped.yaml"
    path.write_text(grouped.to_yaml())
    assert load_recipe(str(path)).order == "group"
    with pytest.raises(RecipeError, match="order"):
        parse_recipe({"order": "groups", "stages": [{"method": "gptq"}]})
