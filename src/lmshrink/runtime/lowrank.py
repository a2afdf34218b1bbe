"""Modules that run low-rank layers as two matmuls: a factorized linear layer, and a layer plus a low-rank
correction.

``LowRankLinear``: ``y = left(right(x)) + bias`` with ``right`` an ``nn.Linear(in, r)`` and ``left`` an
``nn.Linear(r, out)`` (no biases of their own): ``r (in + out)`` multiply-adds per token instead of ``in out``.
Layers that share a basis (Basis Sharing) hold the same ``right`` module. ``CorrectedLinear``: ``y = base(x) +
correction(x)``, ``base`` any layer module (a dense ``nn.Linear``, a packed ``QuantLinear``), ``correction`` a
``LowRankLinear`` without bias.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``x -> left(right(x)) + bias``; ``weight`` is not stored (``dense_weight()`` computes it)."""

    replaces_linear = True  # the model adapters see it as the layer it replaced, its two linears as its parts

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 right: nn.Linear | None = None, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if right is not None and (right.in_features, right.out_features) != (in_features, rank):
            raise ValueError(f"shared right factor is {right.out_features} x {right.in_features}, "
                             f"expected {rank} x {in_features}")
        self.right = right if right is not None else nn.Linear(in_features, rank, bias=False, dtype=dtype,
                                                               device=device)
        self.left = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.left(self.right(x))
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``left @ right`` as ``[out, in]`` (float32)."""
        return self.left.weight.float() @ self.right.weight.float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class CorrectedLinear(nn.Module):
    """``x -> base(x) + correction(x)``."""

    replaces_linear = True

    def __init__(self, base: nn.Module, correction: LowRankLinear):
        super().__init__()
        self.base = base
        self.correction = correction
        self.in_features, self.out_features = correction.in_features, correction.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.correction(x).to(x.dtype)
