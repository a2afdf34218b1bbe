"""Recipes: ordered compression stages with validated options, YAML in and out, and named presets."""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from pathlib import Path
from typing import Any, Collection, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import LmshrinkError

DEFAULT_IGNORE = ["lm_head", "*embed*"]


class RecipeError(LmshrinkError):
    """A recipe that cannot run: unknown method, bad option, or options that contradict each other."""


_FP_TARGET_DESCRIPTION = (
    "asymmetric calibration: solve each layer to reproduce the uncompressed model's output on the uncompressed "
    "model's inputs, min ||W X - Q X~|| (X: the layer's inputs in the original model, X~: its inputs in the "
    "partly compressed model), instead of min ||(W - Q) X~||; keeps a second stream of hidden states through the "
    "original blocks (about twice the engine's time)")


class StageBase(BaseModel):
    """Options every stage has: which linear layers of the decoder blocks it touches."""

    model_config = ConfigDict(extra="forbid")
    method: str
    targets: list[str] = Field(default_factory=lambda: ["*"],
                               description="module-name patterns (glob, or 're:' regex) of the layers to compress")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module-name patterns to leave alone")

    def selects(self, name: str) -> bool:
        return any(_match(p, name) for p in self.targets) and not any(_match(p, name) for p in self.ignore)


class GridOptions(BaseModel):
    """The grid options shared by quantizing stages and SparseGPT's joint mode (``bits`` is each stage's own)."""

    group_size: int = Field(128, description="input columns per group; -1 for one grid per output channel")
    symmetric: bool = False
    clip_search: bool = Field(True, description="MSE-optimal clipping: shrink each range while the error drops")
    clip_norm: float = Field(2.4, gt=0)
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("must be -1 (per channel) or a positive number of columns")
        return value

    def _grid_spec(self, bits: int):
        from .quant.grids import GridSpec

        return GridSpec(bits=bits, group_size=self.group_size, symmetric=self.symmetric,
                        clip_search=self.clip_search, clip_norm=self.clip_norm, scale_dtype=self.scale_dtype)


class QuantStage(StageBase, GridOptions):
    bits: Literal[2, 3, 4, 8] = 4

    def grid(self):
        return self._grid_spec(self.bits)


class RTNStage(QuantStage):
    """Round to nearest on the grid, no calibration needed."""

    method: Literal["rtn"] = "rtn"


class GPTQStage(QuantStage):
    """GPTQ/OPTQ: round column by column and spread the error over the remaining columns (needs calibration)."""

    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal (desc_act)")
    static_groups: bool = Field(True, description="fit group grids before the sweep (act-order with groups)")
    damp_percent: float = Field(0.01, gt=0, le=1, description="damping: this fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    true_sequential: bool = Field(True, description="re-collect inputs after each group of layers is compressed")
    refit_scales: bool = Field(False, description="after the sweep, least-squares group scales for the chosen codes")
    descent_passes: int = Field(0, ge=0, le=100, description="after the sweep, this many coordinate-descent passes "
                                "over the codes on the fixed grid (each keeps or lowers the layer's error)")
    fp_target: bool = Field(False, description=_FP_TARGET_DESCRIPTION)


class PruneStage(StageBase):
    """Options every pruning stage has: how much, in which pattern, and how the sparsity is spread over blocks."""

    sparsity: float | None = Field(None, ge=0.0, le=0.95, description="fraction of each targeted layer's weights "
                                   "set to zero (default 0.5; N:M patterns imply N/M)")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M': N of every M consecutive input "
                         "weights of a row are zero (2:4, 4:8)")
    allocation: Literal["uniform", "owl"] = Field("uniform", description="uniform: every block at the target; owl: "
                                                  "outlier-weighted layer-wise sparsity (averages to the target)")
    owl_m: float = Field(5.0, gt=0, description="OWL: a score is an outlier above this many times its block's mean")
    owl_lambda: float = Field(0.08, ge=0, le=0.5, description="OWL: block sparsities span target +- this")
    true_sequential: bool = Field(True, description="re-collect inputs after each group of layers is pruned")
    refit_iterations: int = Field(0, ge=0, le=1000, description="after the mask is chosen, refit the kept weights "
                                  "by least squares on the layer's calibration inputs (conjugate-gradient steps; "
                                  "0 = off, 20 converges on SmolLM2)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str, info) -> str:
        from .methods.prune.common import parse_pattern

        n, m = parse_pattern(value)  # ValueError names the accepted forms
        sparsity = info.data.get("sparsity")
        if m and sparsity is not None and abs(sparsity - n / m) > 1e-9:
            raise ValueError(f"pattern {value} prunes {n / m:g} of the weights but sparsity is {sparsity:g}: "
                             "leave sparsity out or make it match")
        return value

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, value: str, info) -> str:
        if value == "owl" and info.data.get("pattern", "unstructured") != "unstructured":
            raise ValueError("owl allocation varies the sparsity per block, which a fixed N:M pattern cannot: "
                             "use allocation 'uniform' with N:M, or pattern 'unstructured' with owl")
        return value

    @model_validator(mode="after")
    def _default_sparsity(self):
        if self.sparsity is None:
            from .methods.prune.common import parse_pattern

            n, m = parse_pattern(self.pattern)
            self.sparsity = n / m if m else 0.5
        return self

    def nm(self) -> tuple[int, int]:
        """``(N, M)`` of the pattern, ``(0, 0)`` when unstructured."""
        from .methods.prune.common import parse_pattern

        return parse_pattern(self.pattern)


class MagnitudeStage(PruneStage):
    """Magnitude pruning: the smallest weights of each layer (or of each group of M) become zero; no calibration."""

    method: Literal["magnitude"] = "magnitude"


class WandaStage(PruneStage):
    """Wanda: prune by |weight| x input column norm within each output row; no weight update (needs calibration).

    Statistics are collected once per block by default (``true_sequential: false``), as the Wanda reference code
    does: every layer of a block is scored on the block's unpruned inputs. On protocol P1 this order gave 65.214
    WikiText-2 perplexity at 50% (reference 65.26) against 65.478 for true-sequential collection, and was better on
    held-out text too (``bench/results/prune_p1_wanda50_onepass.md``, ``prune_p1_partial.md``).
    """

    method: Literal["wanda"] = "wanda"
    true_sequential: bool = Field(False, description="re-collect inputs after each group of layers is pruned "
                                  "(default false for Wanda: one statistics pass per block, as its reference code)")


class SparseGPTStage(PruneStage, GridOptions):
    """SparseGPT: adaptive mask and optimal-brain-surgeon error compensation; with ``bits``, joint prune + quantize."""

    method: Literal["sparsegpt"] = "sparsegpt"
    damp_percent: float = Field(0.01, gt=0, le=1, description="damping: this fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per mask-selection and lazy-update block")
    bits: Literal[2, 3, 4, 8] | None = Field(None, description="joint mode: also quantize kept weights to this many "
                                             "bits in the same sweep")
    act_order: bool = Field(False, description="sweep the columns by decreasing Hessian diagonal (unstructured "
                            "patterns only; joint-mode group grids stay fitted on the original column groups)")
    static_groups: bool = Field(False, description="joint mode: fit the group grids before the sweep on the original "
                                "weights (the SparseGPT reference) instead of on the kept, up-to-date weights when "
                                "the sweep reaches each group; act_order implies it")
    fp_target: bool = Field(False, description=_FP_TARGET_DESCRIPTION)

    @model_validator(mode="after")
    def _act_order_needs_unstructured(self):
        if self.act_order and self.pattern != "unstructured":
            raise ValueError(f"act_order: true with pattern {self.pattern!r}: an N:M mask needs the columns in their "
                             "original order; set act_order: false")
        return self

    @model_validator(mode="after")
    def _refit_needs_prune_only(self):
        if self.refit_iterations and self.bits is not None:
            raise ValueError(f"refit_iterations: {self.refit_iterations} with bits: {self.bits}: the joint sweep "
                             "rounds the kept weights as it goes, so there is nothing left to refit; prune with "
                             "refit in one stage and quantize in the next (method: gptq), or set refit_iterations: 0")
        return self

    def grid(self):
        """The joint-mode grid, or None when ``bits`` is not set."""
        return None if self.bits is None else self._grid_spec(self.bits)


class RecoverStage(StageBase):
    """Recovery after compression: distil the uncompressed model (teacher) into LoRA adapters on the compressed model
    (student), then merge them (keeping pruned zeros and quantization grids) or save them in PEFT format.

    Quantized layers train against their dequantized weights (QLoRA-style); on merge, ``requantize`` says how the
    merged weights are put back onto each layer's stored grid: ``round`` (to nearest) or ``gptq`` (the GPTQ sweep on
    the fixed grid with the merged model's calibration Hessians, see ``methods/recover/requant``).

    Runs on the whole model after the block-by-block stages before it (see ``methods/recover``).

    Cost on CPU (estimated from the passes, not measured on the real model): one step of ``batch`` x ``seqlen``
    tokens is a teacher forward, a student forward, its backward (about two forwards) and, with
    ``gradient_checkpointing``, a second student forward of each block: about 5 forward passes' worth (4 without
    checkpointing; one fewer with ``teacher_cache: topk``, whose teacher runs over the training windows once, before
    training). On SmolLM2-135M at about 200 tokens/s forward (2 cores), a default step (4 x 512 tokens) takes
    roughly 50 s, so the default 200 steps take nearly 3 hours; ``max_seconds`` gives the stage a fixed wall-time
    budget instead (e.g. 1800 for 30 minutes, about 35 default steps; the learning rate then decays over that time).
    """

    method: Literal["recover"] = "recover"
    targets: list[str] = Field(default_factory=lambda: ["all-linear"],
                               description="'all-linear' (every decoder-block linear) or module-name patterns")
    teacher: Literal["base"] = Field("base", description="the uncompressed model the recipe started from")
    loss: Literal["kl", "mse", "kl+mse"] = Field(
        "kl", description="kl: KL(teacher || student) on next-token distributions; mse: mean over decoder blocks of "
        "the MSE between student and teacher block outputs divided by the teacher's variance; kl+mse: KL plus "
        "hidden_weight times that MSE")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the per-block hidden-state MSE in 'kl+mse'")
    teacher_cache: Literal["none", "topk"] = Field(
        "none", description="none: the teacher's logits are computed on the fly at every step (its decoder blocks "
        "stay in memory); topk: before training the teacher runs once over every training window, its teacher_topk "
        "largest log-probabilities (at the stage temperature) and their token ids per position are written to disk "
        "(the output's work folder, else a temporary folder), its decoder blocks are freed, and the KL is taken over "
        "the k cached tokens plus one 'rest' bucket (a lower bound of the full KL, equal to it when k is the "
        "vocabulary size; the held-out KL stays exact); loss 'kl' only, and not for models whose logits are "
        "changed after the output head (logit soft-capping)")
    teacher_topk: int = Field(64, ge=1, le=65536, description="tokens per position kept by teacher_cache 'topk' "
                              "(capped at the vocabulary size; disk: about 6 bytes per token per position of each "
                              "of the min(steps x batch, 4096) training windows, all written before training, also "
                              "when max_seconds ends it sooner)")
    lm_weight: float = Field(0.0, ge=0, description="weight of the student's next-token cross-entropy added to KL")
    temperature: float = Field(1.0, gt=0, le=100, description="softmax temperature of both distributions in the "
                               "KL (the loss is scaled by temperature**2)")
    rank: int = Field(16, ge=1, le=4096, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is B@A * alpha/rank")
    steps: int = Field(200, ge=1, description="optimizer steps (at most; early stopping may end sooner)")
    lr: float = Field(2e-4, gt=0, le=1, description="AdamW learning rate (cosine decay to 0 over the steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapters")
    batch: int = Field(4, ge=1, description="windows per optimizer step")
    seqlen: int = Field(512, ge=8, description="tokens per training and evaluation window")
    data: str | None = Field(None, description="text set for training and held-out windows (default: the "
                             "calibration text)")
    eval_windows: int = Field(8, ge=1, description="held-out windows (documents not used for training)")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evaluations (default steps/8)")
    patience: int = Field(2, ge=0, description="stop after this many evaluations without a better held-out KL "
                          "(0: never stop early); the best adapters are kept")
    merge: bool = Field(True, description="merge the adapters into the weights (pruned zeros and grids kept); "
                        "false: save them in PEFT format in <output>/adapter")
    requantize: Literal["round", "gptq"] = Field(
        "round", description="how merged quantized layers go back onto their stored grid (scales, zeros and group "
        "index unchanged, pruned zeros kept): round: each weight to nearest; gptq: codes chosen by a GPTQ sweep on "
        "the Hessians of the merged model's inputs on the calibration windows (one more pass over the calibration "
        "windows, block by block; usually a lower layer output error than round)")
    gradient_checkpointing: bool = Field(True, description="recompute each decoder block's activations in backward "
                                         "instead of keeping them (much less memory, about one more forward pass "
                                         "of time per step; results equal up to float rounding)")
    max_seconds: float | None = Field(None, gt=0, description="stop training once the stage has run this many "
                                      "seconds (wall time, data preparation and held-out evaluations included); the "
                                      "cosine learning-rate decay then follows elapsed time or steps, whichever is "
                                      "further along (not bit-reproducible)")
    save_every: int = Field(50, ge=0, description="save adapters, optimizer and step to the output's work folder "
                            "every this many steps, so --resume continues a killed run from there (0: never)")
    chunk_tokens: int = Field(256, ge=1, description="token positions per chunk of the vocabulary-wide KL (caps "
                              "the memory of the next-token distributions: about 3 x chunk_tokens x vocab floats)")
    seed: int = 0

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("teacher_cache")
    @classmethod
    def _teacher_cache(cls, value: str, info) -> str:
        loss = info.data.get("loss", "kl")
        if value == "topk" and loss != "kl":
            raise ValueError(f"loss {loss!r} compares the teacher's block outputs, which the top-k cache does not "
                             "keep: use loss 'kl' with teacher_cache 'topk', or teacher_cache 'none' with "
                             f"loss {loss!r}")
        return value

    def selects(self, name: str) -> bool:
        if "all-linear" in self.targets:
            return not any(_match(p, name) for p in self.ignore)
        return super().selects(name)

    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 8)


STAGES: dict[str, type[StageBase]] = {"rtn": RTNStage, "gptq": GPTQStage, "magnitude": MagnitudeStage,
                                      "wanda": WandaStage, "sparsegpt": SparseGPTStage, "recover": RecoverStage}
QUANT_METHODS = {"rtn", "gptq"}
PRUNE_METHODS = {"magnitude", "wanda", "sparsegpt"}
RECOVER_METHODS = {"recover"}


def quantizes(stage: StageBase) -> bool:
    """Whether the stage rounds weights to a grid (RTN, GPTQ, joint SparseGPT)."""
    return stage.method in QUANT_METHODS or getattr(stage, "bits", None) is not None and stage.method == "sparsegpt"


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


def _ordered(stage: dict[str, Any]) -> dict[str, Any]:
    """A stage's options for YAML and records: the method first, then the rest in declaration order."""
    return {"method": stage["method"], **{k: v for k, v in stage.items() if k != "method"}}


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


_ORDER_DESCRIPTION = (
    "how a block's stages and its linear groups nest, for recipes of several stages: 'stage' (default) runs each "
    "stage over the whole block before the next stage starts; 'group' runs every stage on a group (e.g. q,k,v) "
    "before the next group's statistics are collected, so a later group is pruned on the inputs the earlier groups "
    "give once the whole recipe ran on them, and stages on the same group share one collection pass (faster; on P1 "
    "sparse50-then-w4g128 it was 3% worse on WikiText-2). Recipes of one stage are the same either way")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    stages: list[StageBase]
    order: Literal["stage", "group"] = Field("stage", description=_ORDER_DESCRIPTION)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "order": self.order,
                "stages": [_ordered(s.model_dump()) for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def needs_calibration(self) -> bool:
        return any(s.method not in ("rtn", "magnitude") for s in self.stages)


def _parse_stage(index: int, raw: Any) -> StageBase:
    where = f"stage {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} is {type(raw).__name__}, not a mapping", fix="write each stage as `- method: ...`")
    if len(raw) == 1 and "method" not in raw:  # short form: `- gptq: {bits: 4}`
        (method, options), = raw.items()
        if not isinstance(method, str) or method not in STAGES:
            raise RecipeError(f"{where}: unknown method {method!r} (a one-key stage is the short form `- METHOD: "
                              "{options}`)", fix=f"use one of: {', '.join(STAGES)}, or write `- method: ...`")
        if options is not None and not isinstance(options, dict):
            raise RecipeError(f"{where} ({method}): the short form `- {method}: ...` takes a mapping of options, "
                              f"not {type(options).__name__} {options!r}",
                              fix=f"write e.g. `- {method}: {{bits: 4}}`, or `- method: {method}` with one option "
                                  "per line")
        raw = {"method": method, **(options or {})}
    method = raw.get("method")
    if method is not None and not isinstance(method, str):
        raise RecipeError(f"{where}: option 'method' = {method!r} is a {type(method).__name__}, not a method name",
                          fix=f"write one method per stage, e.g. `- method: gptq` (methods: {', '.join(STAGES)})")
    if method not in STAGES:
        raise RecipeError(f"{where}: unknown method {method!r}", fix=f"use one of: {', '.join(STAGES)}")
    if "fp_target" in raw and "fp_target" not in STAGES[method].model_fields:
        raise RecipeError(f"{where} ({method}): option 'fp_target' (asymmetric calibration) needs a solver that "
                          f"updates the weights from the layer statistics, which {method} does not",
                          fix="use fp_target on gptq or sparsegpt stages only")
    try:
        return STAGES[method].model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        option = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            known = ", ".join(f for f in STAGES[method].model_fields if f != "method")
            raise RecipeError(f"{where} ({method}): unknown option {option!r}", fix=f"options are: {known}") from None
        raise RecipeError(f"{where} ({method}): option {option!r} = {err.get('input')!r}: {err['msg']}",
                          fix="see `lmshrink recipes --show NAME` for valid examples") from None


def parse_recipe(data: dict | list, name: str = "custom") -> Recipe:
    """Build a Recipe from a mapping ``{name, stages: [...]}`` or a bare list of stages; errors name the stage."""
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict) or "stages" not in data:
        raise RecipeError("a recipe needs a `stages:` list", fix="see `lmshrink recipes --show w4g128`")
    extra = set(data) - {"name", "stages", "order"}
    if extra:
        raise RecipeError(f"unknown recipe key(s): {', '.join(sorted(extra))}",
                          fix="a recipe has `name`, `stages` and optionally `order`")
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
    return Recipe(name=str(recipe_name), stages=[_parse_stage(i, s) for i, s in enumerate(stages)], order=order)


def _quant(method: str, bits: int, group_size: int, symmetric: bool = False, **kw) -> dict:
    return {"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric, **kw}


PRESETS: dict[str, dict] = {
    "w8": {"stages": [_quant("gptq", 8, -1, symmetric=True)]},
    # asymmetric calibration on: on P1 it beat the plain sweep on WikiText-2, held-out text and KL at 4 and 3 bits
    # (bench/results/quantize_p1_w4g128_fp_vs_plain_8f1c25f.md, quantize_p1_w3g128_fp_vs_plain_69c26be.md), at about
    # twice the engine time. Least-squares scales after the sweep (refit_scales), on P1: WikiText-2 -1.7% (w4g128) and
    # -3.0% (w3g128), KL -6.3% / +0.2%, enwiki-sample +0.65% / -4.7%; with calibration seed 1, w4g128 better on all
    # three (bench/results/quantize_p1_*refit*scales*_0957b99.md)
    "w4g128": {"stages": [_quant("gptq", 4, 128, fp_target=True, refit_scales=True)]},
    "w4g32": {"stages": [_quant("gptq", 4, 32)]},
    "w4g32-sym": {"stages": [_quant("gptq", 4, 32, symmetric=True)]},
    "w3g128": {"stages": [_quant("gptq", 3, 128, fp_target=True, refit_scales=True)]},
    "w2g64": {"stages": [_quant("gptq", 2, 64)]},
    "rtn-w8": {"stages": [_quant("rtn", 8, -1, symmetric=True)]},
    "rtn-w4g128": {"stages": [_quant("rtn", 4, 128)]},
    "rtn-w4g32": {"stages": [_quant("rtn", 4, 32)]},
    "rtn-w3g128": {"stages": [_quant("rtn", 3, 128)]},
    "magnitude50": {"stages": [{"method": "magnitude", "sparsity": 0.5}]},
    "magnitude-2:4": {"stages": [{"method": "magnitude", "pattern": "2:4"}]},
    "wanda50": {"stages": [{"method": "wanda", "sparsity": 0.5}]},
    "wanda-2:4": {"stages": [{"method": "wanda", "pattern": "2:4"}]},
    "sparse50": {"stages": [{"method": "sparsegpt", "sparsity": 0.5}]},
    "2:4": {"stages": [{"method": "sparsegpt", "pattern": "2:4"}]},
    "4:8": {"stages": [{"method": "sparsegpt", "pattern": "4:8"}]},
    "sparse50-w4g128": {"stages": [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 128}]},
    # the kept weights refit by least squares before GPTQ: on P1 5.0% above SparseGPT 50% alone on WikiText-2, 12.8%
    # without (bench/results/prune_p1_refit_*_5ea6fe9.md); sparse50, 2:4 and wanda50 stay the published methods
    "sparse50-then-w4g128": {"stages": [{"method": "sparsegpt", "sparsity": 0.5, "refit_iterations": 20},
                                        _quant("gptq", 4, 128)]},
    "sparse50-refit": {"stages": [{"method": "sparsegpt", "sparsity": 0.5, "refit_iterations": 20}]},
    "owl-sparse50": {"stages": [{"method": "sparsegpt", "sparsity": 0.5, "allocation": "owl"}]},
    "owl-wanda50": {"stages": [{"method": "wanda", "sparsity": 0.5, "allocation": "owl"}]},
    "sparse50+recover": {"stages": [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "recover"}]},
    "2:4+recover": {"stages": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "recover"}]},
    # GPTQ re-quantization keeps about half of the adapters' held-out gain on SmolLM2 w3g128, rounding none of it
    "w3g128+recover": {"stages": [_quant("gptq", 3, 128), {"method": "recover", "requantize": "gptq"}]},
    "iterative-sparse": {"stages": [{"method": "sparsegpt", "sparsity": 0.3}, {"method": "recover", "steps": 100},
                                    {"method": "sparsegpt", "sparsity": 0.5}, {"method": "recover", "steps": 100}]},
}


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
    for index, stage in enumerate(recipe.stages):
        names = [(n, width) for n, width in layers if stage.selects(n)]
        if not names:
            raise RecipeError(f"stage {index + 1} ({stage.method}) selects no layer "
                              f"(targets {stage.targets}, ignore {stage.ignore})",
                              fix="check the patterns against the model's layer names, e.g. 'model.layers.0.mlp.*'")
        if stage.method in RECOVER_METHODS:
            if not selected and not pruned and not pruned_before_recover:
                raise RecipeError(f"stage {index + 1} (recover) comes before any compression stage: there is "
                                  "nothing to recover from", fix="put recover stages after pruning/quantization")
            if not stage.merge and index != len(recipe.stages) - 1:
                raise RecipeError(f"stage {index + 1} (recover): option 'merge' = False is only possible in the "
                                  "last stage (later stages would compress the model without the adapters)",
                                  fix="use merge: true here, or make this the last stage")
            if stage.requantize != "round" and not stage.merge:
                raise RecipeError(f"stage {index + 1} (recover): option 'requantize' = {stage.requantize!r} applies "
                                  "to merged layers, and 'merge' is False (the adapters are saved, nothing is "
                                  "re-quantized)", fix="use merge: true, or drop requantize")
            if stage.teacher_cache == "topk" and stage.max_seconds:
                windows = min(stage.steps * stage.batch, 4096)
                warnings.warn(f"stage {index + 1} (recover): teacher_cache 'topk' runs the teacher over all {windows} "
                              f"training windows (steps x batch, at most 4096) before training, and that time counts "
                              f"in max_seconds = {stage.max_seconds:g}: set steps to what the budget allows")
            pruned_before_recover.update(pruned)
            pruned = {}  # iterative schedules: a layer may be pruned again after recovery
            continue
        for name, width in names:
            if quantizes(stage) and name in pruned_before_recover and name not in pruned:
                raise RecipeError(f"stage {index + 1} ({stage.method}) quantizes {name}, which stage "
                                  f"{pruned_before_recover[name] + 1} pruned before a recover stage: the zeros are "
                                  "kept only when quantization is in the same phase as pruning",
                                  fix="quantize before the recover stage (e.g. sparsegpt, gptq, recover)")
            if stage.method in PRUNE_METHODS:
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
        warnings.warn(f"group size {sizes} does not divide the input width(s) {widths}: the last group of each row "
                      "is shorter (as the GPTQ reference does). Runtimes that need a divisor (Marlin kernels; "
                      "llama.cpp blocks of 32) cannot use such layers directly.", stacklevel=2)


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
    from .formats.compressed_tensors import group_size_fix, stored_group_size

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
        if (isinstance(stage, GPTQStage) and act_order and not stage.static_groups
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
    if len(schemes) > 1 and not all(symmetric for _, _, symmetric, _ in schemes):
        described = "; ".join(f"{bits}-bit {'per channel' if size == -1 else f'group {size}'} "
                              f"{'symmetric' if symmetric else 'asymmetric'}{' act-order' if act_order else ''}"
                              for bits, size, symmetric, act_order in sorted(schemes, key=str))
        raise RecipeError(
            f"{_stages(set(packed.values()), recipe)}: asymmetric grids mixed with other grids ({described}) give "
            f"several compressed-tensors config groups, and transformers loads asymmetric checkpoints with one group "
            f"only, {_NOT_SAVED}",
            fix="use one grid (bits, group_size, symmetric, act_order) in every quantizing stage, or symmetric: true")
