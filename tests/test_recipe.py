import pytest

from lmshrink.recipe import PRESETS, GPTQStage, RecipeError, check_recipe, load_recipe, parse_recipe


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
