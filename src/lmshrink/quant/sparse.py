"""Pruned weights as methods return them and writers consume them: a dense weight with zeros, and its compact form
(the mask of pruned weights and the kept values), shared by methods, the engine checkpoint and formats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneResult:
    """A pruned linear layer: a dense weight with zeros where the mask is set.

    mask: bool ``[out, in]``, True where the weight was pruned. values: float32 kept weights (``~mask``, row-major),
    the compact form (it survives when ``weight`` is dropped to save memory in streamed mode). weight: float32
    ``[out, in]`` dense weights with zeros (may be empty: ``dense()`` rebuilds it). pattern: ``"unstructured"`` or
    ``"N:M"``. target_sparsity: what was asked for this layer. rel_output_error: ``||(W-P)X||^2 / ||WX||^2`` when a
    Hessian was available. info: JSON-friendly record.
    """

    mask: torch.Tensor
    values: torch.Tensor
    weight: torch.Tensor
    pattern: str = "unstructured"
    target_sparsity: float = 0.0
    rel_output_error: float | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, mask: torch.Tensor, **kw) -> "PruneResult":
        """Build from dense pruned weights (zeros where ``mask``); zeroes masked entries to be sure."""
        weight = weight.float().masked_fill(mask, 0.0)
        result = cls(mask=mask, values=weight[~mask].contiguous(), weight=weight, **kw)
        result.info = {"sparsity": result.sparsity, "pattern": result.pattern,
                       "target_sparsity": result.target_sparsity, **result.info}
        return result

    def dense(self) -> torch.Tensor:
        """float32 ``[out, in]`` weights with zeros where pruned."""
        if self.weight.numel():
            return self.weight
        weight = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.values.device)
        weight[~self.mask] = self.values
        return weight

    @property
    def sparsity(self) -> float:
        """Measured: the fraction of pruned weights (the mask) in the layer."""
        return float(self.mask.sum()) / self.mask.numel()
