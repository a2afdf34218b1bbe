"""Quantization stages: ``rtn`` and ``gptq`` (options, and the solve that runs them on one layer)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from lmshrink.core.stage import register_stage
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
