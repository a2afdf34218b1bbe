"""What the built-in layer stages share: the statistics a Hessian-based solve reads, asymmetric calibration
(``fp_target``), and which of a result's ``info`` keys go into the run record. Torch-free, like every stage
module, so recipes parse without the numerical libraries; the solves load them when a stage runs."""

from __future__ import annotations

from typing import Any

from lmshrink.core.stage import PENDING_OUTPUT_NORM, StageBase, Stat

FP_TARGET_DESCRIPTION = (
    "asymmetric calibration: solve each layer to reproduce the uncompressed model's output on the uncompressed "
    "model's inputs, min ||W X - Q X~|| (X: the layer's inputs in the original model, X~: its inputs in the "
    "partly compressed model), instead of min ||(W - Q) X~||; keeps a second stream of hidden states through the "
    "original blocks (about twice the engine's time)")

# the solver facts a layer's line in the run record keeps (the rest of ``info`` stays with the result)
RECORD_KEYS = ("damp_percent", "damp", "damp_retries", "dead_columns", "loss", "sparsity", "target_sparsity",
               "pattern", "refit_rows", "refit_iterations", "refit_rows_kept", "rel_output_error_before_refit",
               "rel_output_error_local", "rel_output_error_drift_only", "fp_target_damp_retries", "cd_passes",
               "cd_changed_codes", "rel_output_error_before_cd", PENDING_OUTPUT_NORM)

LOCAL_OBJECTIVE = "||(W - Q) X~||^2 / ||W X~||^2"
FP_TARGET_OBJECTIVE = "||W X - Q X~||^2 / ||W X||^2 (fp_target)"


class LayerSolveStage(StageBase):
    """A layer stage whose solve reads the layer's input Hessian (and, with ``fp_target``, the uncompressed
    model's inputs too)."""

    def needs(self) -> frozenset[Stat]:
        if getattr(self, "fp_target", False):
            return frozenset({Stat.HESSIAN, Stat.FP_TARGET})
        return frozenset({Stat.HESSIAN})

    @property
    def fp_target_projected(self) -> bool:
        # solve_layer reads the drift only through the layer's own weight (correction, weighted_cross, output_norm)
        return True

    @property
    def sequential(self) -> bool:
        # the stage's true_sequential option, where it has one; stages without it collect once per block
        return bool(getattr(self, "true_sequential", False))

    def objective(self) -> str | None:
        return FP_TARGET_OBJECTIVE if getattr(self, "fp_target", False) else LOCAL_OBJECTIVE

    def record(self, result: Any) -> dict[str, Any]:
        return {k: v for k, v in (result.info or {}).items() if k in RECORD_KEYS}

    def complete_output_error(self, info: dict[str, Any], output_norm: float) -> None:
        from lmshrink.methods.layer import complete_output_error

        complete_output_error(info, info[PENDING_OUTPUT_NORM], output_norm)
