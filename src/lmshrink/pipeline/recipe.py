"""Recipes: ordered stages with validated options, YAML in and out, presets by name.

A stage's ``method`` names a registered stage type (``core.stage.register_stage``); importing ``lmshrink.methods``
registers the built-in ones. Nothing here loads the numerical libraries, so recipes parse (and the CLI lists them)
at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import lmshrink.methods  # noqa: F401  (registers the built-in stage types)
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.stage import Scope, StageBase, stage_types
from lmshrink.pipeline.presets import PRESETS


class RecipeError(LmshrinkError):
    """A recipe that cannot run: unknown method, bad option, or options that contradict each other."""


def quantizes(stage: StageBase) -> bool:
    """Whether the stage rounds the layers it solves onto a grid (RTN, GPTQ, joint SparseGPT)."""
    return bool(getattr(stage, "quantizes", False))


def prunes(stage: StageBase) -> bool:
    """Whether the stage sets weights of the layers it solves to zero."""
    return bool(getattr(stage, "prunes", False))


def factorizes(stage: StageBase) -> bool:
    """Whether the stage replaces the layers it solves by low-rank factors."""
    return bool(getattr(stage, "factorizes", False))


def scale_dtype_for_model(recipe: Recipe, dtype: str | Any) -> tuple[Recipe, list[str]]:
    """``recipe`` with each quantizing stage that leaves ``scale_dtype`` at its default (float16) given the model's
    dtype instead when float16 values are not exact in it (bfloat16): a checkpoint stores the scales in the model's
    dtype, so float16 scales could not be saved. Stages that set ``scale_dtype`` keep it. Returns the recipe and a
    note per changed stage."""
    name = str(dtype).removeprefix("torch.")
    if name != "bfloat16":
        return recipe, []
    stages, notes = [], []
    for index, stage in enumerate(recipe.stages):
        if quantizes(stage) and "scale_dtype" not in stage.model_fields_set and stage.scale_dtype == "float16":
            stage = stage.model_copy(update={"scale_dtype": name})
            notes.append(f"stage {index + 1} ({stage.method}): scales fitted in {name}, the model's dtype (float16, "
                         "the default, is not exact in it); set scale_dtype in the recipe to choose")
        stages.append(stage)
    return (recipe.model_copy(update={"stages": stages}) if notes else recipe), notes


_ORDER_DESCRIPTION = (
    "how a block's stages and its linear groups nest, for recipes of several stages: 'stage' (default) runs each "
    "stage over the whole block before the next stage starts; 'group' runs every stage on a group (e.g. q,k,v) "
    "before the next group's statistics are collected, so a later group is pruned on the inputs the earlier groups "
    "give once the whole recipe ran on them, and stages on the same group share one collection pass (faster; measured "
    "worse than 'stage' on a prune-then-quantize recipe, docs/decisions.md). Recipes of one stage are the same "
    "either way")


class Recipe(BaseModel):
    """An ordered list of stages (``stages``) and how a block's stages and its linear groups nest (``order``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    summary: str = Field("", description="what the recipe does, in one line")
    stages: list[StageBase]
    order: Literal["stage", "group"] = Field("stage", description=_ORDER_DESCRIPTION)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **({"summary": self.summary} if self.summary else {}), "order": self.order,
                "stages": [s.describe() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def needs_calibration(self) -> bool:
        """Whether any stage reads statistics of the calibration windows (or whole blocks, or trains)."""
        return any(s.needs() or s.scope is not Scope.LAYER for s in self.stages)


def _parse_stage(index: int, raw: Any) -> StageBase:
    where = f"stage {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} is {type(raw).__name__}, not a mapping", fix="write each stage as `- method: ...`")
    if len(raw) == 1 and "method" not in raw:  # short form: `- gptq: {bits: 4}`
        (method, options), = raw.items()
        if not isinstance(method, str) or method not in stage_types():
            raise RecipeError(f"{where}: unknown method {method!r} (a one-key stage is the short form `- METHOD: "
                              "{options}`)", fix=f"use one of: {', '.join(stage_types())}, or write `- method: ...`")
        if options is not None and not isinstance(options, dict):
            raise RecipeError(f"{where} ({method}): the short form `- {method}: ...` takes a mapping of options, "
                              f"not {type(options).__name__} {options!r}",
                              fix=f"write e.g. `- {method}: {{bits: 4}}`, or `- method: {method}` with one option "
                                  "per line")
        raw = {"method": method, **(options or {})}
    method = raw.get("method")
    if method is not None and not isinstance(method, str):
        raise RecipeError(f"{where}: option 'method' = {method!r} is a {type(method).__name__}, not a method name",
                          fix=f"write one method per stage, e.g. `- method: gptq` (methods: {', '.join(stage_types())})")
    if method not in stage_types():
        raise RecipeError(f"{where}: unknown method {method!r}", fix=f"use one of: {', '.join(stage_types())}")
    if "fp_target" in raw and "fp_target" not in stage_types()[method].model_fields:
        raise RecipeError(f"{where} ({method}): option 'fp_target' (asymmetric calibration) needs a solver that "
                          f"updates the weights from the layer statistics, which {method} does not",
                          fix="use fp_target on a stage that has it: " + ", ".join(
                              m for m, cls in stage_types().items() if "fp_target" in cls.model_fields))
    try:
        return stage_types()[method].model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        option = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            known = ", ".join(f for f in stage_types()[method].model_fields if f != "method")
            raise RecipeError(f"{where} ({method}): unknown option {option!r}", fix=f"options are: {known}") from None
        raise RecipeError(f"{where} ({method}): option {option!r} = {err.get('input')!r}: {err['msg']}",
                          fix="see `lmshrink recipes --show NAME` for valid examples") from None


def parse_recipe(data: dict | list, name: str = "custom") -> Recipe:
    """Build a Recipe from a mapping ``{name, stages: [...]}`` or a bare list of stages; errors name the stage."""
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict) or "stages" not in data:
        raise RecipeError("a recipe needs a `stages:` list", fix="see `lmshrink recipes --show w4g128`")
    extra = set(data) - {"name", "summary", "stages", "order"}
    if extra:
        raise RecipeError(f"unknown recipe key(s): {', '.join(sorted(extra))}",
                          fix="a recipe has `stages`, and optionally `name`, `summary` and `order`")
    order = data.get("order", "stage")
    if order not in ("stage", "group"):
        raise RecipeError(f"recipe `order` is {order!r}, not 'stage' or 'group'",
                          fix="write `order: stage` (the default) or `order: group`")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise RecipeError("`stages` must be a non-empty list", fix="add at least one stage, e.g. `- method: gptq`")
    recipe_name = data.get("name", name)
    if not isinstance(recipe_name, (str, int, float)) or isinstance(recipe_name, bool):
        raise RecipeError(f"recipe `name` must be a string, got {type(recipe_name).__name__} {recipe_name!r}",
                          fix="write e.g. `name: my-recipe`")
    summary = data.get("summary", "")
    if not isinstance(summary, str):
        raise RecipeError(f"recipe `summary` must be a string, got {type(summary).__name__}",
                          fix="write e.g. `summary: 4-bit GPTQ for my model`")
    return Recipe(name=str(recipe_name), summary=summary, stages=[_parse_stage(i, s) for i, s in enumerate(stages)],
                  order=order)


def load_recipe(spec: str | dict | list | Recipe) -> Recipe:
    """A preset name, a path to a YAML file, a mapping, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, (dict, list)):
        return parse_recipe(spec)
    if spec in PRESETS:
        return parse_recipe(PRESETS[spec], name=spec)
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist", fix="check the path, or use a preset name")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe file {path} is not valid YAML: {exc}", fix="fix the YAML syntax") from exc
        return parse_recipe(data, name=path.stem)
    raise RecipeError(f"unknown recipe {spec!r}", fix=f"use a preset ({', '.join(PRESETS)}) or a YAML file path")


