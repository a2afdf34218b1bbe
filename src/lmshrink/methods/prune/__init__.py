"""Pruning methods: magnitude, Wanda, SparseGPT (unstructured and N:M, optionally joint with quantization), the
OWL layer-wise sparsity allocation, and the least-squares refit of the kept weights for a chosen mask."""

from lmshrink.methods.prune.common import PruneResult, measured_sparsity, nm_mask, parse_pattern
from lmshrink.methods.prune.magnitude import magnitude_prune
from lmshrink.methods.prune.owl import block_outlier_ratios, outlier_ratio, owl_sparsities
from lmshrink.methods.prune.refit import refit_kept_weights
from lmshrink.methods.prune.sparsegpt import SparseRule, gptq_keep_mask, sparsegpt_prune
from lmshrink.methods.prune.wanda import wanda_prune, wanda_score

__all__ = ["PruneResult", "SparseRule", "block_outlier_ratios", "gptq_keep_mask", "magnitude_prune",
           "measured_sparsity", "nm_mask", "outlier_ratio", "owl_sparsities", "parse_pattern", "refit_kept_weights",
           "sparsegpt_prune", "wanda_prune", "wanda_score"]
