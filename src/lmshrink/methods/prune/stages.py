"""Pruning stages: ``magnitude``, ``wanda`` and ``sparsegpt`` (options, the OWL allocation, and the solves)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmshrink.core.stage import Stat, register_stage
from lmshrink.methods.prune.patterns import parse_pattern
from lmshrink.methods.quant.stages import GridOptions
from lmshrink.methods.stage_base import FP_TARGET_DESCRIPTION, LayerSolveStage


class PruneStage(LayerSolveStage):
    """Options every pruning stage has: how much, in which pattern, and how the sparsity is spread over blocks."""

    leading_options = ("sparsity", "pattern")

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
                                  "0 = off)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str, info) -> str:
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
            n, m = parse_pattern(self.pattern)
            self.sparsity = n / m if m else 0.5
        return self

    @property
    def prunes(self) -> bool:
        return True

    def inapplicable_options(self) -> set[str]:
        return set() if self.allocation == "owl" else {"owl_m", "owl_lambda"}

    def nm(self) -> tuple[int, int]:
        """``(N, M)`` of the pattern, ``(0, 0)`` when unstructured."""
        return parse_pattern(self.pattern)

    def before_blocks(self, job, number: int) -> None:
        """OWL: every block's own sparsity from a dense pre-pass (blocks this stage selects no layer of keep the
        target and do not count in the mean)."""
        if self.allocation != "owl":
            return
        from lmshrink.methods.prune.owl import block_outlier_ratio, owl_sparsities

        ratios = job.statistics_pass(frozenset({Stat.CHANNELS}), self.selects,
                                     lambda index, block, stats: block_outlier_ratio(block, stats, self.owl_m))
        counted = [i for i, r in enumerate(ratios) if r == r]  # NaN: no selected layer in that block
        values = owl_sparsities([ratios[i] for i in counted], self.sparsity, self.owl_lambda)
        for block, value in zip(counted, values):
            job.set_block_options(number, block, {"sparsity": value})
        job.log(f"OWL stage {number + 1}: block sparsities " + " ".join(f"{v:.3f}" for v in values)
                + " (outlier ratios " + " ".join(f"{ratios[i]:.4f}" for i in counted) + ")")



@register_stage
class MagnitudeStage(PruneStage):
    """Magnitude pruning: the smallest weights of each layer (or of each group of M) become zero; no calibration."""

    summary = "magnitude pruning: the smallest weights become zero"
    method: Literal["magnitude"] = "magnitude"

    def needs(self) -> frozenset[Stat]:
        # the mask depends on |W| alone; the Hessian serves only the refit (and then the error diagnostic)
        return frozenset({Stat.HESSIAN}) if self.refit_iterations else frozenset()

    def objective(self) -> str | None:
        return "||(W - P) X~||^2 / ||W X~||^2 (refit)" if self.refit_iterations else None

    def solve(self, job) -> Any:
        from lmshrink.methods.prune.solve import prune_magnitude, solve_prune

        return solve_prune(self, job, prune_magnitude)


@register_stage
class WandaStage(PruneStage):
    """Wanda: prune by |weight| x input column norm within each output row; no weight update (needs calibration).

    Statistics are collected once per block by default (``true_sequential: false``), as the Wanda reference code
    does: every layer of a block is scored on the block's unpruned inputs (docs/decisions.md).
    """

    summary = "Wanda: prune by |weight| x input norm per output row"
    method: Literal["wanda"] = "wanda"
    true_sequential: bool = Field(False, description="re-collect inputs after each group of layers is pruned "
                                  "(default false for Wanda: one statistics pass per block, as its reference code)")

    def solve(self, job) -> Any:
        from lmshrink.methods.prune.solve import prune_wanda, solve_prune

        return solve_prune(self, job, prune_wanda)


@register_stage
class SparseGPTStage(PruneStage, GridOptions):
    """SparseGPT: adaptive mask and optimal-brain-surgeon error compensation; with ``bits``, joint prune + quantize."""

    summary = "SparseGPT: prune with error compensation (optionally quantize jointly)"
    leading_options = ("sparsity", "pattern", "bits", "group_size", "symmetric")
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
    fp_target: bool = Field(False, description=FP_TARGET_DESCRIPTION)

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

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    def inapplicable_options(self) -> set[str]:
        grid = set() if self.bits is not None else set(GridOptions.model_fields) | {"static_groups"}
        return super().inapplicable_options() | grid

    def grid(self):
        """The joint-mode grid, or None when ``bits`` is not set."""
        return None if self.bits is None else self._grid_spec(self.bits)

    def solve(self, job) -> Any:
        from lmshrink.methods.prune.solve import prune_sparsegpt, solve_prune

        return solve_prune(self, job, prune_sparsegpt)
