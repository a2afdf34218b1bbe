"""How the compressed-tensors layout stores group sizes (torch-free: recipe checks use it before any work)."""

from __future__ import annotations

import math

MIN_STORED_GROUP = 16  # below this, repeating scales to reach a dividing group size costs too much


def stored_group_size(group_size: int, widths) -> int | None:
    """The group size written for layers of input ``widths`` that share one grid of ``group_size`` (-1 per
    channel): ``gcd(group_size, *widths)``, or None when that is too small to store (see ``_stored_group_sizes``).
    """
    if group_size == -1:
        return -1
    size = math.gcd(group_size, *widths)
    return None if size < min(MIN_STORED_GROUP, group_size) else size


def group_size_fix(widths) -> str:
    """The fix for a group size that cannot be stored, considering every input width of the layers sharing the grid
    (a size that divides one width can still fail on another: 12 divides 36 but not 70)."""
    widths = sorted(set(widths))
    common = math.gcd(*widths)
    sizes = [d for d in range(MIN_STORED_GROUP, min(common, 256) + 1) if common % d == 0][-8:]
    named = ", ".join(map(str, widths))
    if sizes:
        return (f"use a group size that divides every input width of these layers ({named}), e.g. "
                f"{', '.join(map(str, sizes))}, or -1 (per channel)")
    return (f"no group size of 16 or more divides every input width of these layers ({named}): use -1 (per "
            "channel), or leave the layers of the odd width(s) out (ignore), or quantize them in a stage of their "
            "own with other bits, symmetry or group size (layers share a stored group size only with the same grid)")
