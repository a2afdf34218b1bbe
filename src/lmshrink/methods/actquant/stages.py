"""Stages that quantize what flows between the weights: ``activations`` (the inputs of linear layers) and
``kv-cache`` (the attention's keys and values). Torch-free; the work loads ``calibrate`` when it runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmshrink.core.stage import BlockOutcome, Problem, Scope, StageBase, register_stage


@register_stage
class ActivationsStage(StageBase):
    """Attach an activation quantizer to each selected linear layer; static grids are calibrated on the block's
    calibration inputs as the earlier stages left it, one group of layers at a time (so a later group's ranges
    are those of the quantized earlier groups' outputs)."""

    scope = Scope.BLOCK
    summary = "quantize the inputs of linear layers (per tensor, token or group; static or dynamic)"
    leading_options = ("bits", "granularity", "dynamic")
    method: Literal["activations"] = "activations"
    bits: int = Field(8, ge=2, le=8, description="bits of the activation grid")
    granularity: Literal["tensor", "token", "group", "cluster"] = Field(
        "token", description="one scale per tensor, per token (row), per token and group of channels, or per cluster "
                             "of channels with similar calibration ranges (RPTQ; static)")
    group_size: int = Field(128, ge=1, description="channels per group (granularity: group)")
    symmetric: bool = Field(True, description="signed grid without zero point (compressed-tensors' symmetric)")
    dynamic: bool = Field(True, description="measure the range of every input (true) or calibrate it once (false: "
                                            "per tensor or per group of channels, stored as input_scale)")
    clip_ratio: float = Field(1.0, gt=0, le=1, description="shrink every range by this factor before rounding")
    clusters: int = Field(8, ge=1, description="channel clusters per layer input (granularity: cluster), found by "
                                               "k-means on each channel's (min, max) calibration range")

    @model_validator(mode="after")
    def _static_token(self):
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("static scales per token do not exist: use granularity 'tensor' or 'group', or "
                             "dynamic: true")
        if self.granularity == "cluster" and self.dynamic:
            raise ValueError("clusters of channels have calibrated ranges: set dynamic: false")
        return self

    def inapplicable_options(self) -> set[str]:
        unused = set() if self.granularity == "group" else {"group_size"}
        return unused | (set() if self.granularity == "cluster" else {"clusters"})

    def spec(self):
        from lmshrink.core.actquant import ActSpec

        return ActSpec(bits=self.bits, granularity=self.granularity, group_size=self.group_size,
                       symmetric=self.symmetric, dynamic=self.dynamic, clip_ratio=self.clip_ratio,
                       clusters=self.clusters)

    def check_layers(self, layers: list[tuple[str, int]]) -> list[Problem]:
        if self.granularity != "group":
            return []
        for name, width in layers:
            if width % self.group_size:
                return [Problem(message=f"group_size {self.group_size} does not divide the "
                                        f"{width} input channels of {name}",
                                fix="use a group_size that divides every targeted layer's input width, or leave "
                                    f"{name} out (ignore)")]
        return []

    def scheme(self) -> dict[str, Any]:
        return {"activations": self.spec().to_dict()}

    def solve_block(self, job) -> BlockOutcome:
        from lmshrink.methods.actquant.calibrate import calibrate_activations

        return calibrate_activations(self, job)

    def restore_block(self, index, block, groups, tensors) -> None:
        from lmshrink.methods.actquant.calibrate import restore_activations

        restore_activations(self, block, groups, tensors)


@register_stage
class SmoothQuantStage(StageBase):
    """SmoothQuant: per input channel, ``s = max|X|^alpha / max|W|^(1 - alpha)`` moves activation outliers into the
    weights, folded into the producer (norm -> q,k,v and gate,up; v -> o; up -> down) so the float model is
    unchanged. ``alpha`` fixed, or searched per block and pair (``act_*``, ``weight_bits``: the quantization the
    search scores against, the one the later stages apply)."""

    scope = Scope.BLOCK
    summary = "SmoothQuant: move activation outliers into the weights (scales folded into norms and projections)"
    leading_options = ("alpha", "pairs")
    method: Literal["smoothquant"] = "smoothquant"
    alpha: float | None = Field(None, ge=0, le=1, description="migration strength; none: searched per block and "
                                                              "pair among `alphas` and no smoothing")
    alphas: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9,
                                                         0.95], description="the search's candidates")
    pairs: list[Literal["attn-norm", "v-o", "mlp-norm", "up-down"]] = Field(
        default_factory=lambda: ["attn-norm", "v-o", "mlp-norm", "up-down"],
        description="producer -> consumers the scales are folded through")
    act_bits: int = Field(8, ge=2, le=8, description="search objective: the activations' bits")
    act_granularity: Literal["tensor", "token"] = Field("token", description="search objective: activation scales")
    act_dynamic: bool = Field(True, description="search objective: dynamic (true) or static ranges")
    weight_bits: int = Field(8, ge=2, le=8, description="search objective: per-channel weight bits")
    samples: int = Field(2048, ge=64, description="calibration tokens the search scores on (an even sample)")

    def inapplicable_options(self) -> set[str]:
        if self.alpha is not None:
            return {"alphas", "act_bits", "act_granularity", "act_dynamic", "weight_bits", "samples"}
        return set()

    def scheme(self) -> dict[str, Any]:
        return {"smoothing": {"describe": "smoothquant " + (f"alpha {self.alpha:g}" if self.alpha is not None
                                                             else "alpha searched"), "pairs": self.pairs}}

    def before_blocks(self, job, number: int) -> None:
        from lmshrink.methods.actquant.smooth import check_model

        check_model(job.model)

    def solve_block(self, job) -> BlockOutcome:
        from lmshrink.methods.actquant.smooth import smooth_block

        return smooth_block(self, job)


@register_stage
class RotateStage(StageBase):
    """QuaRot: fold the norms into the linears, rotate the residual stream by a random-sign Hadamard (embeddings,
    every block, the head; tied embeddings are untied), turn v_proj/o_proj per head, and put online Hadamards on
    the inputs of down_proj and o_proj; the float model is unchanged. Put quantizing stages after it (GPTQ then
    sees the rotated weights)."""

    scope = Scope.MODEL
    summary = "QuaRot: rotate the residual stream and heads by Hadamards (float model unchanged), for 4-bit activations"
    leading_options = ("seed", "online")
    method: Literal["rotate"] = "rotate"
    seed: int = Field(0, description="seed of the residual rotation's and head rotations' random signs")
    head_rotation: bool = Field(True, description="turn v_proj's outputs and o_proj's inputs per head")
    online: list[Literal["down_proj", "o_proj"]] = Field(
        default_factory=lambda: ["down_proj", "o_proj"],
        description="layers whose input gets an online Hadamard (their weight the inverse, offline)")

    def scheme(self) -> dict[str, Any]:
        return {"rotation": {"describe": "hadamard rotation" + (f", online {'+'.join(self.online)}" if self.online
                                                                else ""), "seed": self.seed,
                             "head_rotation": self.head_rotation, "online": self.online}}

    def before_blocks(self, job, number: int) -> None:
        from lmshrink.methods.actquant.rotate import check_model, rotate_outside

        check_model(job.model, self.online)
        rotate_outside(job.model, job.adapter, self.seed)

    def transform_block(self, index: int, block) -> list[str]:
        from lmshrink.methods.actquant.rotate import rotate_block

        return rotate_block(self, index, block)


@register_stage
class KVCacheStage(StageBase):
    """Quantize the key/value cache of each block whose k_proj and v_proj the stage selects (KIVI: keys per channel
    over groups of tokens, values per token over groups of channels, the latest ``window`` positions unquantized);
    used by perplexity evaluation and the fast decoder's cache."""

    scope = Scope.BLOCK
    summary = "quantize the key/value cache (KIVI: keys per channel, values per token, a recent window kept)"
    leading_options = ("bits", "group_size", "window")
    method: Literal["kv-cache"] = "kv-cache"
    bits: Literal[2, 4, 8] = Field(8, description="bits of keys and values")
    group_size: int = Field(32, ge=1, description="tokens per key group and channels per value group")
    window: int = Field(32, ge=0, description="the most recent positions kept unquantized")
    rotate: bool = Field(False, description="turn queries and keys by a Hadamard transform per head after the "
                                            "rotary embedding, before the keys are quantized")

    def spec(self):
        from lmshrink.core.actquant import KVSpec

        return KVSpec(bits=self.bits, group_size=self.group_size, window=self.window, rotate=self.rotate)

    def scheme(self) -> dict[str, Any]:
        return {"kv_cache": self.spec().to_dict()}

    def before_blocks(self, job, number: int) -> None:
        from lmshrink.runtime import kvcache

        kvcache.enable(job.model)

    def solve_block(self, job) -> BlockOutcome:
        from lmshrink.methods.actquant.calibrate import install_kv

        install_kv(self, job.block, job.groups)
        return BlockOutcome()

    def restore_block(self, index, block, groups, tensors) -> None:
        from lmshrink.methods.actquant.calibrate import install_kv

        install_kv(self, block, groups)
