"""Wanda (Sun et al. 2023): prune by ``|W_ij| * ||X_j||_2`` within each output row; no weight update.

The input column norms come from the Hessian the engine already accumulates: ``H = (2/n) X^T X``, so
``||X_j||_2`` is proportional to ``sqrt(H_jj)``, and a common factor does not change any row's ranking.
"""

from __future__ import annotations

import torch

from lmshrink.core.results import PruneResult
from lmshrink.methods.prune.common import select_mask
from lmshrink.methods.solver import output_error


def wanda_score(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(diag H)``: ``[out, in]``, the Wanda importance of each weight."""
    return weight.float().abs() * hessian_diag.float().clamp(min=0).sqrt().reshape(1, -1)


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                pattern: str = "unstructured") -> PruneResult:
    """Prune ``weight`` (``[out, in]``) given the layer's Hessian ``X^T X`` (``[in, in]``, only its diagonal is used).

    Unstructured: the ``sparsity`` lowest-scoring weights of each output row (the Wanda paper's comparison group).
    ``N:M``: the N lowest of every M consecutive inputs of each row.
    """
    weight = weight.float()
    hessian = hessian.to(weight.device).float()
    mask = select_mask(wanda_score(weight, hessian.diagonal()), sparsity, pattern, per_row=True)
    pruned = weight.masked_fill(mask, 0.0)
    return PruneResult.from_weight(pruned, mask, pattern=pattern, target_sparsity=sparsity,
                                   rel_output_error=output_error(weight, pruned, hessian), info={"method": "wanda"})
