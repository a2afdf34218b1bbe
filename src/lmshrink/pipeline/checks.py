"""Checks of a recipe against a model before any work starts: every stage selects something, each layer is pruned
and quantized at most once and in a workable order, and what saving would refuse only after the compression."""

from __future__ import annotations

import math
import warnings
from typing import Any, Collection

from lmshrink.core.stage import PhaseStage
from lmshrink.formats.layout import group_size_fix, stored_group_size
from lmshrink.pipeline.recipe import Recipe, RecipeError, factorizes, prunes, quantizes


def check_recipe(recipe: Recipe, layers: list[tuple[str, int]], *, dtype: str | Any | None = None,
                 unpacked: Collection[str] = ()) -> None:
    """Check the recipe against the model's block linears ``[(name, in_features)]`` before any work starts.

    Raises RecipeError for a group size wider than a targeted layer, a stage that selects no layer, or two
    quantization stages on the same layer. Warns when a group size does not divide a layer's width.

    dtype: the model's dtype (``torch.dtype`` or its name) when the result will be saved as a compressed-tensors
    checkpoint; then it also raises RecipeError for what saving would refuse only after the compression: scales not
    exact in that dtype, group sizes the format cannot store, act-order without static groups, and asymmetric grids
    mixed with other grids (see ``formats.compressed_tensors``). None (nothing saved) skips these checks.
    unpacked: layers the checkpoint stores dense even when quantized (GPT-2 ``Conv1D``), exempt from them.
    """
    selected: dict[str, int] = {}
    pruned: dict[str, int] = {}
    pruned_before_recover: dict[str, int] = {}  # layers pruned in an earlier phase (before a recover stage)
    factorized: dict[str, int] = {}  # layers a low-rank stage replaced by factors
    changed = False  # a stage before this one changes the model (quantizes, prunes, restructures, ...)
    for index, stage in enumerate(recipe.stages):
        for problem in stage.check_in_recipe(index, recipe.stages):
            if problem.fix is None:
                warnings.warn(problem.message)
            else:
                raise RecipeError(problem.message, fix=problem.fix)
        names = [(n, width) for n, width in layers if stage.selects(n)]
        if not names:
            raise RecipeError(f"stage {index + 1} ({stage.method}) selects no layer "
                              f"(targets {stage.targets}, ignore {stage.ignore})",
                              fix="check the patterns against the model's layer names, e.g. 'model.layers.0.mlp.*'")
        for problem in stage.check_layers(names):
            if problem.fix is None:
                warnings.warn(problem.message)
            else:
                raise RecipeError(f"stage {index + 1} ({stage.method}): {problem.message}", fix=problem.fix)
        if isinstance(stage, PhaseStage):
            if factorized:
                raise RecipeError(f"stage {index + 1} ({stage.method}) comes after low-rank factors (stage "
                                  f"{min(factorized.values()) + 1}), which it cannot merge into yet",
                                  fix=f"drop the {stage.method} stage, or factorize in another run after it")
            if not changed:
                raise RecipeError(f"stage {index + 1} ({stage.method}) comes before any compression stage: there is "
                                  "nothing to recover from", fix=f"put {stage.method} stages after pruning/quantization")
            for problem in stage.check_position(index, last=index == len(recipe.stages) - 1):
                if problem.fix is None:
                    warnings.warn(problem.message)
                else:
                    raise RecipeError(problem.message, fix=problem.fix)
            pruned_before_recover.update(pruned)
            pruned = {}  # iterative schedules: a layer may be pruned again after recovery
            continue
        changed = True
        for name, width in names:
            if getattr(stage, "quantizes_factors", False):
                if name not in factorized or not factorizes(recipe.stages[factorized[name]]):
                    raise RecipeError(f"stage {index + 1} ({stage.method}) quantizes the factors of {name}, which no "
                                      "earlier stage factorizes", fix="put it after an svd stage on the same layers")
                if getattr(recipe.stages[factorized[name]], "merge", False):
                    raise RecipeError(f"stage {index + 1} ({stage.method}): stage {factorized[name] + 1} merges the "
                                      f"factors of {name} back to a dense weight, so there are no factors to quantize",
                                      fix="set merge: false on the factorizing stage")
                continue
            if name in factorized:
                earlier = factorized[name]
                raise RecipeError(f"stage {index + 1} ({stage.method}) selects {name}, which stage {earlier + 1} "
                                  f"({recipe.stages[earlier].method}) replaced by low-rank factors: a later stage would "
                                  "work on their dense product and drop the factorization",
                                  fix=f"leave {name} out of stage {index + 1} (ignore), or factorize after it")
            if getattr(stage, "corrects", False):
                if name not in selected and name not in pruned:
                    raise RecipeError(f"stage {index + 1} ({stage.method}) corrects {name}, which no earlier stage "
                                      "of its phase quantizes or prunes: there is no error to correct",
                                      fix="put the correction after a gptq, rtn or pruning stage that selects the "
                                          "same layers")
                factorized[name] = index  # later stages would drop the correction as they drop factors
            if factorizes(stage):
                if name in selected or name in pruned or name in pruned_before_recover:
                    raise RecipeError(f"stage {index + 1} ({stage.method}) factorizes {name}, which an earlier stage "
                                      "quantizes or prunes: the factors would drop its grid or its zeros",
                                      fix="factorize a layer in its first stage, or use lowrank-correction after "
                                          "quantization or pruning")
                factorized[name] = index
            if quantizes(stage) and name in pruned_before_recover and name not in pruned:
                raise RecipeError(f"stage {index + 1} ({stage.method}) quantizes {name}, which stage "
                                  f"{pruned_before_recover[name] + 1} pruned before a recover stage: the zeros are "
                                  "kept only when quantization is in the same phase as pruning",
                                  fix="quantize before the recover stage (e.g. sparsegpt, gptq, recover)")
            if prunes(stage):
                if name in pruned or name in selected:
                    earlier = pruned.get(name, selected.get(name))
                    raise RecipeError(
                        f"stage {index + 1} ({stage.method}) prunes {name}, which stage {earlier + 1} already "
                        f"{'prunes' if name in pruned else 'quantizes'}",
                        fix="prune each layer once, before any quantization stage (e.g. sparsegpt, then gptq)")
                pruned[name] = index
                n, m = stage.nm()
                if m and width % m:
                    raise RecipeError(f"stage {index + 1} ({stage.method}): option 'pattern' = {stage.pattern!r} "
                                      f"needs input widths that are multiples of {m}, but {name} has {width}",
                                      fix=f"use another N:M pattern, or leave {name} out (ignore)")
            if quantizes(stage):
                if name in pruned and getattr(stage, "act_order", False) and not getattr(stage, "static_groups", True):
                    raise RecipeError(f"stage {index + 1} ({stage.method}): option 'static_groups' = False with "
                                      f"act_order on {name}, which stage {pruned[name] + 1} prunes: keeping the "
                                      "pruned zeros through GPTQ needs static groups with act-order",
                                      fix="set static_groups: true (the default), or act_order: false")
                if name in pruned and getattr(stage, "stores_outliers", False):
                    raise RecipeError(f"stage {index + 1} ({stage.method}) quantizes {name}, which stage "
                                      f"{pruned[name] + 1} prunes: {stage.method} does not keep pruned zeros",
                                      fix="quantize pruned layers with gptq or rtn, or drop the pruning stage")
                if name in selected:
                    raise RecipeError(
                        f"stages {selected[name] + 1} and {index + 1} both quantize {name}",
                        fix="give each layer at most one quantization stage (use targets/ignore)")
                selected[name] = index
                gs = stage.group_size
                if gs != -1 and gs > width:
                    raise RecipeError(f"stage {index + 1} ({stage.method}): option 'group_size' = {gs} is larger "
                                      f"than the input width {width} of {name}",
                                      fix=f"use group_size {width} or less, or -1 for per channel")
    if dtype is not None:
        unpacked = set(unpacked)
        _check_saving(recipe, dict(layers), {n: i for n, i in selected.items() if n not in unpacked},
                      str(dtype).removeprefix("torch."))
    widths = sorted({w for n, w in layers if n in selected and recipe.stages[selected[n]].group_size not in (-1,)
                     and w % recipe.stages[selected[n]].group_size})
    if widths:
        sizes = sorted({recipe.stages[i].group_size for i in set(selected.values())})
        warnings.warn(LayoutNote(
            f"group size {sizes} does not divide the input width(s) {widths}: the last group of each row is shorter "
            "(as the GPTQ reference does). The checkpoint stores it exactly; a GGUF export maps such layers code for "
            "code where every group starts on a multiple of 32 and re-quantizes the others (it says which); kernels "
            "that need the group size to divide the width (e.g. Marlin) cannot use them directly."), stacklevel=2)


class LayoutNote(UserWarning):
    """A fact about how the result will be stored, not a problem with the run: recorded in ``lmshrink.json``
    (``notes``) and stated where it matters (the GGUF export), not printed on every compression."""


# scale dtypes whose values a model dtype holds exactly (the saved scales are cast to the model's dtype)
_EXACT_SCALES = {"float32": {"float16", "bfloat16", "float32"}, "float64": {"float16", "bfloat16", "float32"}}
_NOT_SAVED = "so saving the checkpoint would fail after the whole compression"


def _stages(indices: set[int], recipe: Recipe) -> str:
    """``stage 2 (gptq)`` or ``stages 1, 3 (rtn, gptq)``."""
    numbers = sorted(indices)
    methods = ", ".join(dict.fromkeys(recipe.stages[i].method for i in numbers))
    plural = "s" if len(numbers) > 1 else ""
    return f"stage{plural} {', '.join(str(i + 1) for i in numbers)} ({methods})"


def _check_saving(recipe: Recipe, widths: dict[str, int], packed: dict[str, int], dtype: str) -> None:
    """Refuse up front what ``save_quantized`` would refuse after the compression, for the layers ``packed``
    (name -> index of the stage quantizing it) of a model in ``dtype``; mirrors ``formats.compressed_tensors``."""
    for index in sorted(set(packed.values())):
        stage = recipe.stages[index]
        if stage.scale_dtype not in _EXACT_SCALES.get(dtype, {dtype}):
            raise RecipeError(
                f"stage {index + 1} ({stage.method}): option 'scale_dtype' = {stage.scale_dtype!r} gives scales that "
                f"are not all exact in the model's dtype {dtype}, in which the checkpoint stores them (it would "
                f"decode to other weights than the compressed model), {_NOT_SAVED}",
                fix=f"set `scale_dtype: {dtype}` in this stage of a recipe YAML (`lmshrink recipes --show NAME > "
                    "my.yaml`, edit it, then --recipe my.yaml), or compress in float32 (--dtype float32)")
    grids: dict[tuple, list[str]] = {}
    for name, index in packed.items():
        stage = recipe.stages[index]
        act_order = getattr(stage, "act_order", False)
        if (stage.method == "gptq" and act_order and not stage.static_groups
                and stage.group_size != -1 and stage.group_size < widths[name]):
            raise RecipeError(
                f"stage {index + 1} (gptq): act_order without static_groups permutes the group index of {name} "
                f"(actorder 'group'), which compressed-tensors 0.20.1 no longer loads, {_NOT_SAVED}",
                fix="set static_groups: true (the default), or act_order: false")
        # the writer's config groups: layers with one (bits, group size, symmetry, act-order) share a stored size
        grids.setdefault((stage.bits, stage.group_size, stage.symmetric, act_order), []).append(name)
    schemes = set()
    for (bits, group_size, symmetric, act_order), names in grids.items():
        layer_widths = [widths[n] for n in names]
        size = stored_group_size(group_size, layer_widths)
        if size is None:
            odd = next(n for n in names if widths[n] % group_size)
            common = math.gcd(group_size, *layer_widths)
            raise RecipeError(
                f"{_stages({packed[n] for n in names}, recipe)}: option 'group_size' = {group_size} does not divide "
                f"the {widths[odd]} input columns of {odd}, and compressed-tensors needs a divisor: the layers on this "
                f"grid (input widths {', '.join(map(str, sorted(set(layer_widths))))}) would store a scale every "
                f"{common} weights, which is refused, {_NOT_SAVED}", fix=group_size_fix(layer_widths))
        schemes.add((bits, size, symmetric, act_order))
    # a folder with 16-bit outlier columns is read by lmshrink only: transformers' single-group limit does not apply
    outliers = any(getattr(recipe.stages[i], "stores_outliers", False) for i in set(packed.values()))
    if len(schemes) > 1 and not outliers and not all(symmetric for _, _, symmetric, _ in schemes):
        described = "; ".join(f"{bits}-bit {'per channel' if size == -1 else f'group {size}'} "
                              f"{'symmetric' if symmetric else 'asymmetric'}{' act-order' if act_order else ''}"
                              for bits, size, symmetric, act_order in sorted(schemes, key=str))
        raise RecipeError(
            f"{_stages(set(packed.values()), recipe)}: asymmetric grids mixed with other grids ({described}) give "
            f"several compressed-tensors config groups, and transformers loads asymmetric checkpoints with one group "
            f"only, {_NOT_SAVED}",
            fix="use one grid (bits, group_size, symmetric, act_order) in every quantizing stage, or symmetric: true")
