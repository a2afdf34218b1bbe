"""Magnitude pruning: zero the smallest weights (per layer threshold, or per group of M for N:M); no calibration."""

from __future__ import annotations

import torch

from lmshrink.core.results import PruneResult
from lmshrink.methods.prune.common import select_mask
from lmshrink.methods.solver import output_error


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                    hessian: torch.Tensor | None = None) -> PruneResult:
    """Prune ``weight`` (``[out, in]``) by ``|w|``: the ``sparsity`` smallest of the whole layer (unstructured), or
    the N smallest of every M consecutive inputs of each row (``pattern="N:M"``, ``sparsity`` is then N/M).

    ``hessian`` (``X^T X``), when given, only yields ``rel_output_error``; the mask does not depend on it, so the
    engine collects none for magnitude stages (their layers' ``rel_output_error`` is None).
    """
    weight = weight.float()
    mask = select_mask(weight.abs(), sparsity, pattern, per_row=False)
    pruned = weight.masked_fill(mask, 0.0)
    rel = None if hessian is None else output_error(weight, pruned, hessian.to(weight.device).float())
    return PruneResult.from_weight(pruned, mask, pattern=pattern, target_sparsity=sparsity, rel_output_error=rel,
                                   info={"method": "magnitude"})
