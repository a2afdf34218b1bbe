"""Structured pruning stages: ``prune-width`` (attention heads and FFN channels removed from every block, the
reading linears repaired) and ``prune-depth`` (whole decoder blocks removed). The model becomes a smaller dense
one; with uniform widths its config states the new sizes and plain transformers loads it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from lmshrink.core.stage import BlockOutcome, Scope, StageBase, Stat, register_stage

_BUDGET = "give one of ratio, params (or, for prune-width, channels_removed / heads_removed)"


@register_stage
class WidthStage(StageBase):
    """Remove attention heads and FFN channels from the decoder blocks (the rows of the linears that produce them,
    the columns of the linear that reads them, and their biases), repair the reading linear, and leave a smaller
    dense model. See docs/structured-pruning.md."""

    scope = Scope.BLOCK
    summary = "structured width pruning: heads and FFN channels removed, reader refit (a smaller dense model)"
    leading_options = ("ratio", "params", "importance", "repair", "widths")
    method: Literal["prune-width"] = "prune-width"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the parameters of each pruned block to "
                                "remove (at least this much, as little more as one removal step allows)")
    params: int | None = Field(None, ge=1, description="instead of ratio: the most parameters the whole model may "
                               "keep (embeddings and head included)")
    importance: Literal["magnitude", "activation", "fluctuation", "second-order"] = Field(
        "fluctuation", description="magnitude: sum of the unit's squared weights; activation (Minitron): mean |x| of "
        "a channel, RMS of a head's output; fluctuation (FLAP): Var(x_j) * ||W_:,j||^2 of the reading linear; "
        "second-order (ZipLM/OBS): the output error of removing the unit with the rest refit")
    repair: Literal["none", "bias", "lstsq", "lstsq+bias"] = Field(
        "lstsq", description="how the reading linear (o_proj, down_proj) is fixed: none; bias: the removed inputs' "
        "mean contribution into its bias (FLAP); lstsq: kept columns refit by least squares on the calibration "
        "inputs; lstsq+bias: both at once (the best affine refit)")
    widths: Literal["uniform", "per-layer"] = Field(
        "uniform", description="uniform: every block keeps the same numbers (a standard config that plain "
        "transformers loads); per-layer: the budget is spread by standardised scores across blocks (loads with "
        "lmshrink.load_model only)")
    structures: list[Literal["heads", "channels"]] = Field(
        default_factory=lambda: ["heads", "channels"], description="what may be removed: attention heads, FFN "
        "channels")
    gqa: Literal["queries", "groups"] = Field(
        "queries", description="grouped-query attention: queries: the same number of query heads from every KV "
        "group (k and v stay); groups: whole KV groups with their query heads")
    heads_removed: int | None = Field(None, ge=0, description="head steps removed per block (queries: query heads "
                                      "per KV group; groups: KV groups); default: chosen to meet the budget at the "
                                      "least estimated output variance (uniform) or by the allocation (per-layer)")
    channels_removed: int | None = Field(None, ge=0, description="FFN channels removed per block (default: from "
                                         "the budget)")
    multiple: int = Field(1, ge=1, description="FFN channels are removed in steps of this many (e.g. 32 keeps "
                          "widths that vector units like)")
    true_sequential: bool = Field(True, description="collect the FFN's statistics after the heads are removed")
    fp_target: bool = Field(False, description="lstsq repair aims at the unpruned model: the reading linear is refit "
                            "so that its outputs on the pruned model's inputs match the unpruned layer's outputs "
                            "on the unpruned model's inputs (errors of earlier blocks are corrected too; about "
                            "twice the engine time)")
    damp_percent: float = Field(0.01, gt=0, le=1, description="damping of the least-squares systems: this "
                                "fraction of the mean Hessian diagonal")
    # set before the block loop: the projections that get a zero bias beside each reader the repair gives one
    _companions: dict = PrivateAttr(default_factory=dict)

    def bias_companions(self) -> dict:
        return self._companions

    @model_validator(mode="after")
    def _budget(self):
        if self.ratio is not None and self.params is not None:
            raise ValueError(f"give ratio or params, not both ({_BUDGET})")
        if self.ratio is None and self.params is None and self.channels_removed is None \
                and self.heads_removed is None:
            raise ValueError(f"no budget: {_BUDGET}")
        if self.widths == "per-layer" and (self.heads_removed is not None or self.channels_removed is not None):
            raise ValueError("heads_removed and channels_removed fix the same widths in every block: use widths: "
                             "uniform with them, or a ratio / params budget with per-layer widths")
        if self.widths == "per-layer" and self.ratio is None and self.params is None:
            raise ValueError(f"per-layer widths need a budget: {_BUDGET}")
        if not self.structures:
            raise ValueError("structures is empty: name heads, channels or both")
        if self.fp_target and self.repair != "lstsq":
            raise ValueError(f"fp_target applies to the lstsq repair, not {self.repair!r}: use repair: lstsq, or "
                             "fp_target: false")
        return self

    def needs(self) -> frozenset[Stat]:
        # the engine keeps the unpruned stream only for stages that ask; the block solve collects the rest itself
        return frozenset({Stat.FP_TARGET}) if self.fp_target else frozenset()

    def inapplicable_options(self) -> set[str]:
        return set() if self.widths == "uniform" else {"heads_removed", "channels_removed"}

    def objective(self) -> str | None:
        if self.repair == "none":
            return None
        if self.fp_target:
            return "E||W x - W'_K x~_K||^2 of each reading linear, x: its inputs in the unpruned model (repair)"
        return "E||W x - W'_K x_K||^2 of each reading linear (repair)"

    def before_blocks(self, job, number: int) -> None:
        from lmshrink.methods.structured.run import plan_width

        plan_width(self, job, number)

    def solve_block(self, job) -> BlockOutcome:
        from lmshrink.methods.structured.run import solve_width

        return solve_width(self, job)


@register_stage
class DepthStage(StageBase):
    """Remove whole decoder blocks before the block loop, chosen by block influence (ShortGPT) or by the KL of the
    model's outputs when each block is skipped (greedy); the config's layer count and per-layer lists follow."""

    scope = Scope.MODEL
    # block removal changes the model's structure and scores blocks on the hidden states of one process: supported
    # in a single process only
    data_parallel = False
    summary = "structured depth pruning: whole decoder blocks removed (ShortGPT influence or greedy KL)"
    leading_options = ("ratio", "blocks", "score")
    method: Literal["prune-depth"] = "prune-depth"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the block parameters to remove (at "
                                "least; whole blocks)")
    blocks: int | None = Field(None, ge=1, description="instead of ratio: how many blocks to remove")
    remove: list[int] | None = Field(None, description="instead of a score: these block indices")
    score: Literal["influence", "kl"] = Field(
        "influence", description="influence (ShortGPT): 1 - mean cosine(block input, block output) on the "
        "calibration windows, the lowest removed at once; kl: greedily remove the block whose skipping changes the "
        "model's next-token distributions least (KL to the unpruned model on kl_windows windows; needs the model "
        "in memory)")
    kl_windows: int = Field(8, ge=1, description="kl: calibration windows the KL is measured on")

    @model_validator(mode="after")
    def _budget(self):
        given = [n for n in ("ratio", "blocks", "remove") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, blocks, remove (got {', '.join(given) or 'none'})")
        return self

    def inapplicable_options(self) -> set[str]:
        return set() if self.score == "kl" else {"kl_windows"}

    def before_blocks(self, job, number: int) -> None:
        from lmshrink.methods.structured.run import plan_depth

        plan_depth(self, job, number)
