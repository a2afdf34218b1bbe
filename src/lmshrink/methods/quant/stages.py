"""Quantization stages: ``rtn``, ``gptq`` and ``owq`` (options, and the solve that runs them on one layer), and
``awq``, the block stage that scales each group of layers for the quantizing stage after it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from lmshrink.core.stage import Problem, Scope, StageBase, register_stage
from lmshrink.methods.stage_base import FP_TARGET_DESCRIPTION, LayerSolveStage


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
        from lmshrink.core.grids import GridSpec

        return GridSpec(bits=bits, group_size=self.group_size, symmetric=self.symmetric,
                        clip_search=self.clip_search, clip_norm=self.clip_norm, scale_dtype=self.scale_dtype)


class QuantStage(LayerSolveStage, GridOptions):
    """A stage that rounds each selected layer onto a grid of ``bits``."""

    leading_options = ("bits", "group_size", "symmetric")
    # 7: an int8 grid of half the range, whose products oneDNN computes exactly on CPUs without VNNI (W8A8)
    bits: Literal[2, 3, 4, 7, 8] = 4

    @property
    def quantizes(self) -> bool:
        return True

    def grid(self):
        return self._grid_spec(self.bits)

    def scheme(self) -> dict[str, Any]:
        return {"weights": {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}}


@register_stage
class RTNStage(QuantStage):
    """Round to nearest on the grid (the clip search weights columns by the calibration Hessian's diagonal)."""

    summary = "round to nearest on a grid"
    method: Literal["rtn"] = "rtn"

    def solve(self, job) -> Any:
        from lmshrink.methods.quant.solve import solve_rtn

        return solve_rtn(self, job)


@register_stage
class GPTQStage(QuantStage):
    """GPTQ/OPTQ: round column by column and spread the error over the remaining columns (needs calibration)."""

    summary = "GPTQ: round columns one by one, spreading each error over the rest"
    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal (desc_act)")
    static_groups: bool = Field(True, description="fit group grids before the sweep (act-order with groups)")
    damp_percent: float = Field(0.01, gt=0, le=1, description="damping: this fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    true_sequential: bool = Field(True, description="re-collect inputs after each group of layers is compressed")
    refit_scales: bool = Field(False, description="after the sweep, least-squares group scales for the chosen codes")
    descent_passes: int = Field(0, ge=0, le=100, description="after the sweep, this many coordinate-descent passes "
                                "over the codes on the fixed grid (each keeps or lowers the layer's error)")
    fp_target: bool = Field(False, description=FP_TARGET_DESCRIPTION)

    def solve(self, job) -> Any:
        from lmshrink.methods.quant.solve import solve_gptq

        return solve_gptq(self, job)


@register_stage
class OWQStage(QuantStage):
    """OWQ: per layer, the input columns whose rounding costs most (Hessian diagonal times the column's rounding
    error) stay in 16 bits; GPTQ rounds the rest onto the grid, sweeping the kept columns last so the others'
    errors are compensated into them."""

    summary = "OWQ: the most sensitive input columns kept in 16 bits, GPTQ on the rest"
    method: Literal["owq"] = "owq"
    leading_options = ("bits", "group_size", "extra_bits", "fraction")
    group_size: int = Field(-1, description="input columns per group; -1 (default, as OWQ) for one grid per output "
                            "channel")
    extra_bits: float | None = Field(None, gt=0, le=8, description="keep per layer the fewest columns whose 16-bit "
                                     "values cost at least this many bits per weight (ceil(extra_bits * in / 16); "
                                     "0.01 when neither this nor fraction is set)")
    fraction: float | None = Field(None, gt=0, lt=1, description="keep this fraction of each layer's input columns "
                                   "(instead of extra_bits)")
    act_order: bool = Field(True, description="sweep the rounded columns by decreasing Hessian diagonal")
    damp_percent: float = Field(0.01, gt=0, le=1, description="damping: this fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    true_sequential: bool = Field(True, description="re-collect inputs after each group of layers is compressed")
    fp_target: bool = Field(False, description=FP_TARGET_DESCRIPTION)

    @field_validator("fraction")
    @classmethod
    def _one_budget(cls, value, info):
        if value is not None and info.data.get("extra_bits") is not None:
            raise ValueError("set either extra_bits or fraction (how many columns to keep), not both")
        return value

    @model_validator(mode="after")
    def _default_budget(self):
        if self.extra_bits is None and self.fraction is None:
            self.extra_bits = 0.01
        return self

    @property
    def stores_outliers(self) -> bool:
        return True

    def record(self, result: Any) -> dict[str, Any]:
        info = result.info or {}
        return {**super().record(result), "kept_columns": info.get("kept_columns"),
                "kept_sensitivity_share": info.get("kept_sensitivity_share")}

    def solve(self, job) -> Any:
        from lmshrink.methods.quant.owq import solve_owq

        return solve_owq(self, job)


@register_stage
class AWQStage(StageBase):
    """AWQ: for each group of layers that read one input, the per-channel input scale ``mean|x| ** alpha`` (alpha
    searched on a grid) that minimises the group's rounding error on the calibration inputs, folded into the module
    producing that input; then AWQ's clipping search. It rounds nothing itself: a quantizing stage on the same grid
    follows (``awq`` then ``rtn`` is AWQ as published)."""

    scope = Scope.BLOCK
    summary = "AWQ: activation-aware input scales folded into the producing norm/linear, then range clipping"
    method: Literal["awq"] = "awq"
    leading_options = ("bits", "group_size", "symmetric")
    bits: Literal[2, 3, 4, 8] = Field(4, description="the grid the search rounds onto (the next stage's)")
    group_size: int = Field(128, description="input columns per group of that grid; -1 per output channel")
    symmetric: bool = False
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    alpha_grid: int = Field(20, ge=1, le=1000, description="alphas searched: 0, 1/n, ..., (n-1)/n")
    duo_scaling: bool = Field(False, description="divide the scale by the weights' relative magnitude ** (1 - "
                              "alpha) (AutoAWQ's variant)")
    clip: bool = Field(True, description="AWQ's clipping search: clamp each (row, group) range to minimise the "
                       "group's output error after rounding")
    clip_grid: int = Field(20, ge=1, le=1000, description="clip bounds tried: max|w| * (1 - i/clip_grid)")
    clip_max_shrink: float = Field(0.5, gt=0, lt=1, description="the smallest bound tried is max|w| * (1 - this)")
    clip_ignore: list[str] = Field(default_factory=lambda: ["*q_proj", "*k_proj", "*qkv_proj", "*c_attn"],
                                   description="layers not clipped (their outputs become attention scores)")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("must be -1 (per channel) or a positive number of columns")
        return value

    def inapplicable_options(self) -> set[str]:
        return set() if self.clip else {"clip_grid", "clip_max_shrink", "clip_ignore"}

    def grid(self):
        from lmshrink.core.grids import GridSpec

        return GridSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                        scale_dtype=self.scale_dtype)

    def objective(self) -> str | None:
        return "sum over the group of ||(W - Q(W s)/s) X||^2 (the scale); per (row, group) ||(W - Q(clamp W)) X||^2"

    def check_in_recipe(self, index: int, stages: list) -> list[Problem]:
        later = [(i, s) for i, s in enumerate(stages) if i > index and getattr(s, "quantizes", False)]
        if not later:
            return [Problem(message=f"stage {index + 1} (awq) scales and clips layers for rounding, but no later "
                            "stage rounds them (add rtn or gptq after it)")]
        number, stage = later[0]
        ours = (self.bits, self.group_size, self.symmetric)
        theirs = (stage.bits, stage.group_size, stage.symmetric)
        if ours != theirs:
            return [Problem(message=f"stage {index + 1} (awq) searches for a {ours[0]}-bit grid of group {ours[1]} "
                            f"(symmetric {ours[2]}), but stage {number + 1} ({stage.method}) rounds onto {theirs[0]} "
                            f"bits, group {theirs[1]} (symmetric {theirs[2]}): set awq's bits, group_size and "
                            "symmetric to the rounding stage's")]
        return []

    def solve_block(self, job):
        from lmshrink.methods.quant.awq import awq_block

        return awq_block(self, job)
