"""Low-rank stages: ``svd`` (plain SVD, ASVD, SVD-LLM), ``basis-sharing`` (one basis for a type of layer across
adjacent blocks), ``gptq-factors`` (GPTQ on the factors an ``svd`` stage left) and ``lowrank-correction`` (a
low-rank term fitted to an earlier stage's error). Options, the
statistics each needs, and the solves, which load the algorithms (``factorize``, ``sharing``, ``correction``) when
they run.

A factorized layer ``W ~ left @ right`` (``[out, r] @ [r, in]``) stores ``r (m + n)`` numbers: it is smaller than
the dense layer only for ``r < m n / (m + n)``, and a rank that is not is refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from lmshrink.core.stage import StageBase, Stat, register_stage
from lmshrink.methods.quant.stages import GridOptions

# the layer record keys a low-rank result's info contributes
RECORD_KEYS = ("rank", "dense_params", "stored_params", "whitening", "whitening_shift", "basis", "update",
               "fp_target", "rel_output_error_before_update", "rel_output_error_local", "rel_output_error_drift_only",
               "rel_weight_error", "correction_rank", "base_rel_output_error", "storage_dtype", "merged",
               "factor_bits", "factor_group_size", "rel_output_error_factorized")

SHARED_TYPES = ["*q_proj", "*k_proj", "*v_proj", "*gate_proj", "*up_proj"]


class LowRankStage(StageBase):
    """What the factorizing stages share: the result is a factorized layer, optionally merged back to dense."""

    merge: bool = Field(False, description="store the dense product of the factors instead of the factors (for "
                        "runtimes that cannot hold them; then the checkpoint saves no parameters)")

    @property
    def factorizes(self) -> bool:
        return True

    def record(self, result: Any) -> dict[str, Any]:
        return {k: v for k, v in (result.info or {}).items() if k in RECORD_KEYS}


@register_stage
class SVDStage(LowRankStage):
    """Truncated SVD of each layer: plain, ASVD or SVD-LLM (``whitening``), at a rank from ``ratio``, ``rank`` or
    ``ranks``; ``allocation: sensitivity`` sets per-layer ranks from a dense statistics pass."""

    summary = "low-rank factorization by truncated SVD (plain, ASVD or SVD-LLM whitening)"
    leading_options = ("ratio", "whitening", "allocation")
    method: Literal["svd"] = "svd"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's parameters removed (the "
                                "rank is floor((1 - ratio) m n / (m + n))); with allocation: sensitivity, of all the "
                                "selected layers' parameters together. Default 0.2 when no rank is given")
    rank: int | None = Field(None, ge=1, description="one rank for every selected layer (instead of ratio)")
    ranks: dict[str, int] | None = Field(None, description="per-layer ranks: layer name (full, or relative to its "
                                         "block such as 'self_attn.q_proj') -> rank; set per block by "
                                         "allocation: sensitivity")
    whitening: Literal["none", "asvd", "cholesky"] = Field(
        "cholesky", description="none: plain SVD of W; asvd: SVD of W diag(mean|x|)^alpha (ASVD); cholesky: SVD of "
        "W S with S S^T the input Hessian (SVD-LLM), optimal for the layer's output")
    alpha: float = Field(0.5, gt=0, le=2, description="asvd: the exponent of the activation scale")
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="uniform: every layer loses `ratio` of its parameters; sensitivity: a dense pre-pass "
        "measures each layer's output error at every rank and a greedy knapsack spends the budget where the error "
        "drops most per parameter")
    true_sequential: bool = Field(True, description="re-collect the inputs after each group of layers is factorized, "
                                  "so each layer is factorized on the inputs the factorized earlier layers give")
    update: bool = Field(False, description="SVD-LLM's sequential update: after truncation, refit the left factor by "
                         "least squares on the compressed model's inputs toward the uncompressed model's outputs "
                         "(keeps a second stream of hidden states, about twice the engine's time)")
    fp_target: bool = Field(False, description="truncate the asymmetric target W C H~^-1 instead of W, which makes both "
                            "factors optimal for ||W X - A B X~|| (X: the layer's inputs in the uncompressed model, X~: "
                            "in the partly compressed one); cholesky only; about twice the engine's time")
    damp_percent: float = Field(0.01, gt=0, le=1, description="fp_target: damping of the target's solve (fraction "
                                "of the mean Hessian diagonal)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give either rank or ratio, not both")
        if self.allocation == "sensitivity" and (self.rank is not None or self.ranks is not None):
            raise ValueError("allocation: sensitivity chooses the ranks from `ratio`; leave rank and ranks out")
        if self.update and self.fp_target:
            raise ValueError("fp_target already makes both factors optimal for the uncompressed outputs: the update "
                             "of the left factor would change nothing; use one of them")
        if self.fp_target and self.whitening != "cholesky":
            raise ValueError(f"fp_target needs whitening: cholesky (the truncation must be optimal in the output "
                             f"space), not {self.whitening!r}")
        return self

    def budget_ratio(self) -> float:
        return 0.2 if self.ratio is None else self.ratio

    def inapplicable_options(self) -> set[str]:
        skip = set()
        if self.whitening != "asvd":
            skip.add("alpha")
        if not self.fp_target:
            skip.add("damp_percent")
        return skip

    def needs(self) -> frozenset[Stat]:
        needs = {Stat.HESSIAN} if self.whitening != "none" or self.update else set()
        if self.whitening == "asvd":
            needs.add(Stat.CHANNELS)
        if self.update or self.fp_target:
            needs.add(Stat.FP_TARGET)
        return frozenset(needs)

    @property
    def sequential(self) -> bool:
        return self.true_sequential

    def objective(self) -> str | None:
        if self.update or self.fp_target:
            return "||W X - A B X~||^2 / ||W X||^2 (fp_target)"
        return None if self.whitening == "none" else "||(W - A B) X~||^2 / ||W X~||^2"

    def before_blocks(self, job, number: int) -> None:
        if self.allocation != "sensitivity":
            return
        from lmshrink.methods.lowrank.solve import allocate_by_sensitivity

        allocate_by_sensitivity(self, job, number)

    def solve(self, job) -> Any:
        from lmshrink.methods.lowrank.solve import solve_svd

        return solve_svd(self, job)


@register_stage
class BasisSharingStage(LowRankStage):
    """Basis Sharing: the layers of one type in ``layers_per_basis`` adjacent blocks share one right factor (the
    basis), from one whitened SVD of their stacked weights with the Cholesky factor of their summed input Hessians
    (a dense statistics pass before the block loop); each layer keeps its own left factor (its coefficients)."""

    summary = "Basis Sharing: one low-rank basis shared by a layer type across adjacent blocks"
    leading_options = ("ratio", "layers_per_basis")
    method: Literal["basis-sharing"] = "basis-sharing"
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the selected layers' parameters removed (the "
                         "rank of a group of n layers is floor((1 - ratio) n m k / (k + n m)))")
    layers_per_basis: int = Field(2, ge=1, le=64, description="how many adjacent blocks' layers of one type share a "
                                  "basis (the last group may be smaller)")
    refit: bool = Field(False, description="refit each layer's coefficients by least squares on the inputs it gets "
                        "in the model being compressed (true-sequential), the shared basis fixed")
    targets: list[str] = Field(default_factory=lambda: list(SHARED_TYPES),
                               description="module-name patterns of the layers that share bases (the reference "
                                           "shares q, k, v, gate and up, and keeps o and down per layer)")
    _factors: dict[str, Any] = PrivateAttr(default_factory=dict)

    def needs(self) -> frozenset[Stat]:
        return frozenset({Stat.HESSIAN}) if self.refit else frozenset()

    @property
    def sequential(self) -> bool:
        return True

    def objective(self) -> str | None:
        return "||(W - A B) X~||^2 / ||W X~||^2 (coefficients refit)" if self.refit else None

    def before_blocks(self, job, number: int) -> None:
        from lmshrink.methods.lowrank.sharing import compute_shared_bases

        self._factors = compute_shared_bases(self, job, number)

    def solve(self, job) -> Any:
        from lmshrink.methods.lowrank.solve import solve_shared

        return solve_shared(self, job, self._factors)


@register_stage
class FactorGPTQStage(StageBase, GridOptions):
    """GPTQ on the two factors of layers an earlier ``svd`` stage factorized: the right factor on the layer's input
    Hessian H, then the left factor refit by least squares for the quantized right factor Q_B and quantized on the
    Hessian of its own input, ``Q_B H Q_B^T``."""

    summary = "GPTQ on the factors of factorized layers (after an svd stage)"
    leading_options = ("bits", "group_size", "symmetric")
    method: Literal["gptq-factors"] = "gptq-factors"
    bits: Literal[2, 3, 4, 8] = 4
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal")
    damp_percent: float = Field(0.01, gt=0, le=1, description="damping: this fraction of the mean Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    refit_scales: bool = Field(False, description="after the sweep, least-squares group scales for the chosen codes")
    true_sequential: bool = Field(True, description="re-collect inputs after each group of layers is quantized")

    @property
    def quantizes_factors(self) -> bool:
        return True

    def grid(self):
        return self._grid_spec(self.bits)

    def needs(self) -> frozenset[Stat]:
        return frozenset({Stat.HESSIAN})

    @property
    def sequential(self) -> bool:
        return self.true_sequential

    def objective(self) -> str | None:
        return "||(A B - Q_A Q_B) X~||^2 / ||A B X~||^2"

    def record(self, result: Any) -> dict[str, Any]:
        return {k: v for k, v in (result.info or {}).items() if k in RECORD_KEYS}

    def solve(self, job) -> Any:
        from lmshrink.methods.lowrank.solve import solve_factor_gptq

        return solve_factor_gptq(self, job)


@register_stage
class LowRankCorrectionStage(StageBase):
    """A low-rank term fitted to the output error an earlier stage (GPTQ, RTN, pruning) left in a layer, in the
    whitened space (as EoRA / LQER do): the SVD of ``(W* - Q) S`` truncated, ``S S^T`` the layer's input Hessian
    and ``W*`` the uncompressed layer (or its asymmetric target with ``fp_target``); stored as two factors beside
    the earlier stage's weights."""

    summary = "low-rank correction of an earlier stage's error (EoRA-style), stored as two factors"
    leading_options = ("bits_per_weight", "rank", "storage_dtype")
    method: Literal["lowrank-correction"] = "lowrank-correction"
    bits_per_weight: float | None = Field(None, gt=0, le=16, description="the correction's stored size in bits per "
                                          "weight of the layer (the rank is floor(b m n / (bits of storage_dtype "
                                          "(m + n)))); default 1.0 when no rank is given")
    rank: int | None = Field(None, ge=1, description="one rank for every selected layer (instead of bits_per_weight)")
    storage_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of the stored "
                                                                     "factors (without factor_bits)")
    factor_bits: Literal[4, 8] | None = Field(None, description="quantize the two factors with GPTQ on asymmetric "
                                              "grids of this many bits (groups of factor_group_size, float16 "
                                              "scales) instead of storing them as floats; the rank grows to fill "
                                              "bits_per_weight")
    factor_group_size: int = Field(64, ge=8, description="factor_bits: columns per group of the factors' grids")
    fp_target: bool = Field(True, description="fit the correction to the uncompressed model's output on its own "
                            "inputs (min ||W X - (Q + L R) X~||) rather than to the uncompressed weight on the "
                            "compressed inputs (min ||(W - Q - L R) X~||)")
    damp_percent: float = Field(0.01, gt=0, le=1, description="fp_target: damping of the target's solve")
    true_sequential: bool = Field(True, description="re-collect the inputs after each group of layers is corrected")

    @property
    def corrects(self) -> bool:
        return True

    @model_validator(mode="after")
    def _one_size(self):
        if self.rank is not None and self.bits_per_weight is not None:
            raise ValueError("give either rank or bits_per_weight, not both")
        return self

    def correction_bits(self) -> float:
        return 1.0 if self.bits_per_weight is None else self.bits_per_weight

    def inapplicable_options(self) -> set[str]:
        skip = set() if self.fp_target else {"damp_percent"}
        return skip | ({"storage_dtype"} if self.factor_bits else {"factor_group_size"})

    def element_bits(self) -> float:
        """Stored bits per element of a factor: the float dtype's, or a grid's codes plus its scale and zero point
        shared by a group."""
        if self.factor_bits is None:
            return 32.0 if self.storage_dtype == "float32" else 16.0
        return self.factor_bits + (16 + self.factor_bits) / self.factor_group_size

    def needs(self) -> frozenset[Stat]:
        # FP_TARGET also gives the uncompressed layer (the target) in LayerJob.uncompressed
        return frozenset({Stat.HESSIAN, Stat.FP_TARGET})

    @property
    def sequential(self) -> bool:
        return self.true_sequential

    def objective(self) -> str | None:
        if self.fp_target:
            return "||W X - (Q + L R) X~||^2 / ||W X||^2 (fp_target)"
        return "||(W - Q - L R) X~||^2 / ||W X~||^2"

    def record(self, result: Any) -> dict[str, Any]:
        return {k: v for k, v in (result.info or {}).items() if k in RECORD_KEYS}

    def solve(self, job) -> Any:
        from lmshrink.methods.lowrank.correction import solve_correction

        return solve_correction(self, job)
