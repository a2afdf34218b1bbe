"""What the pruning methods share: sparsity counts and mask selection by a score."""

from __future__ import annotations

import math

import torch

from lmshrink.methods.prune.patterns import parse_pattern


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a target ``sparsity`` prunes (rounded to nearest, halves up)."""
    return int(math.floor(total * sparsity + 0.5))


def measured_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool mask pruning the ``n`` lowest-scoring of every ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool mask pruning the lowest-scoring ``sparsity`` fraction of each row (ties broken by column order)."""
    rows, cols = score.shape
    k = prune_count(cols, sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        lowest = torch.sort(score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, lowest, True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float, count: int | None = None) -> torch.Tensor:
    """bool mask pruning the ``count`` (default: ``sparsity`` of all) lowest-scoring entries of the whole matrix."""
    k = prune_count(score.numel(), sparsity) if count is None else count
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        lowest = torch.sort(score.reshape(-1), stable=True).indices[:k]
        mask[lowest] = True
    return mask.reshape(score.shape)


def select_mask(score: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """The mask for a pattern: N:M groups, else per row (Wanda) or per layer (magnitude) lowest scores."""
    n, m = parse_pattern(pattern)
    if m:
        return nm_mask(score, n, m)
    return row_mask(score, sparsity) if per_row else layer_mask(score, sparsity)
