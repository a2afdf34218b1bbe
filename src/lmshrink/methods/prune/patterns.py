"""Sparsity patterns (torch-free: recipes validate them without the numerical libraries)."""

from __future__ import annotations

import re

_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"unstructured"`` -> ``(0, 0)``; ``"N:M"`` -> ``(N, M)``: N of every M consecutive input weights of a row are
    pruned (2:4 keeps 2 of 4). Raises ValueError otherwise."""
    if pattern == "unstructured":
        return 0, 0
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError("must be 'unstructured' or 'N:M' (e.g. 2:4, 4:8)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError("N:M needs 0 < N < M (N of every M weights are pruned)")
    return n, m
