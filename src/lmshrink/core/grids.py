"""Integer affine quantization grids (per channel or per group), shared by methods, formats and runtime.

Conventions (the GPTQ / compressed-tensors ones):

* codes are unsigned integers ``0 .. 2**bits - 1`` (``torch.uint8``), and the weight they stand for is
  ``(code - zero) * scale``;
* ``zero`` is an unsigned integer in the same range (``torch.uint8``). Asymmetric grids fit it per row/group;
  symmetric grids always use ``zero = 2**(bits-1)`` (so code ``2**(bits-1)`` is 0.0, the grid spans
  ``[-2**(bits-1), 2**(bits-1) - 1] * scale`` and ``scale = 2 * max|w| / (2**bits - 1)``);
* ``scale`` is float32, shape ``[rows, n_groups]`` (``n_groups == 1`` per channel);
* groups are contiguous runs of ``group_size`` input columns in the original column order; when the group size
  does not divide the width the last group is shorter. ``g_idx[col]`` names the group of each input column
  (needed only when act-order assigns groups out of order).

compressed-tensors stores symmetric weights as signed ints without a zero point: see ``to_signed``/``from_signed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmshrink.core.errors import LmshrinkError

SUPPORTED_BITS = (2, 3, 4, 8)
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GridSpec:
    """How to build a grid.

    bits: 2..8 (2/3/4/8 are the ones runtimes use). group_size: -1 per output channel, else columns per group.
    symmetric: zero fixed at 2**(bits-1). clip_search: MSE-optimal range shrinking (``fit_grid``);
    clip_grid / clip_max_shrink: try shrink factors ``1 - i/clip_grid`` for ``i < clip_max_shrink*clip_grid``;
    clip_norm: the error exponent p of ``sum |w - q|**p`` (2.4 as the GPTQ reference, 2.0 for plain L2).
    scale_dtype: the dtype scales will be stored in; scales are rounded to it when fitted so the stored model
    decodes to exactly the weights the solver saw.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip_search: bool = False
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    scale_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LmshrinkError(f"bits={self.bits!r} is not supported", fix="use bits 2, 3, 4 or 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise LmshrinkError(f"group_size={self.group_size!r} is not valid",
                                fix="use -1 (per channel) or a positive number of columns, e.g. 128")
        if self.clip_grid < 1 or not 0.0 < self.clip_max_shrink < 1.0 or self.clip_norm <= 0:
            raise LmshrinkError(
                f"clip options clip_grid={self.clip_grid}, clip_max_shrink={self.clip_max_shrink}, "
                f"clip_norm={self.clip_norm} are not valid",
                fix="use clip_grid >= 1, 0 < clip_max_shrink < 1 and clip_norm > 0 (e.g. 100, 0.8, 2.4)")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise LmshrinkError(f"scale_dtype={self.scale_dtype!r} is not supported",
                                fix=f"use one of {sorted(_SCALE_DTYPES)}")

    @property
    def maxq(self) -> int:
        """The largest code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def group_width(self, in_features: int) -> int:
        """Columns per group for a layer of this input width (the whole width when per channel)."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        """Number of groups along the input (the last one may be shorter)."""
        width = self.group_width(in_features)
        return -(-in_features // width)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``g_idx`` for contiguous groups: int32 ``[in_features]`` with ``g_idx[col] = col // group_size``."""
    width = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // width


def round_scale(scale: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    dtype = _SCALE_DTYPES[spec.scale_dtype]
    if dtype is torch.float32:
        return scale
    # keep scales positive and representable after the cast (tiny weights would underflow to 0): at least the
    # smallest subnormal (float16: 2**-24, not its smallest normal 2**-14, which would coarsen small groups' grids)
    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return scale.clamp(min=smallest).to(dtype).to(torch.float32)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec):
    """Float scale and zero for rows with ranges [xmin, xmax] (xmin <= 0 <= xmax)."""
    maxq = spec.maxq
    if spec.symmetric:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = round_scale(2.0 * amax / maxq, spec)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = round_scale((xmax - xmin) / maxq, spec)
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def _fake(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round-to-grid and back, for float per-row scale/zero of shape [rows, 1]."""
    codes = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return (codes - zero) * scale


def _clip_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, norm: float,
                col_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-row ``sum weights * |fake_quant(w) - w| ** norm``, in one buffer (the clip search is memory-bound)."""
    buf = w / scale[:, None]
    buf.round_().add_(zero[:, None]).clamp_(0, maxq).sub_(zero[:, None]).mul_(scale[:, None]).sub_(w).abs_()
    if norm == 2.0:
        buf.square_()
    else:  # |e| ** norm as exp(norm * log |e|), log 0 = -inf giving 0: much faster than pow_ on CPU
        # (bench/clip_search_speed.py)
        buf.log_().mul_(norm).exp_()
    if col_weights is not None:
        buf.mul_(col_weights)
    return buf.sum(dim=1)


def fit_grid_float(w: torch.Tensor, spec: GridSpec, weights: torch.Tensor | None = None):
    """Like ``fit_grid`` but returns float32 ``(scale [rows], zero [rows])`` (zero integer-valued), for hot loops.

    weights may also be ``[rows, cols]`` (a weight per element).
    """
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    scale, zero = _params_from_range(xmin, xmax, spec)
    if not spec.clip_search:
        return scale, zero
    maxq = spec.maxq
    best = torch.full_like(scale, float("inf"))
    # [cols] weights apply to every row; [rows, cols] weights give each row its own
    col_weights = None if weights is None else weights.float().reshape(-1, w.shape[1])
    steps = int(spec.clip_max_shrink * spec.clip_grid)
    # Coarse to fine: every 4th shrink factor first, then the fine steps around each row's best coarse one
    # (the error is close to unimodal in the shrink factor; 1.0, no clipping, is always a candidate).
    coarse = 4
    best_step = torch.zeros_like(scale, dtype=torch.long)

    def consider(step_of_row: torch.Tensor) -> None:
        nonlocal best, scale, zero, best_step
        shrink = 1.0 - step_of_row.float() / spec.clip_grid
        cand_scale, cand_zero = _params_from_range(shrink * xmin, shrink * xmax, spec)
        err = _clip_error(w, cand_scale, cand_zero, maxq, spec.clip_norm, col_weights)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, cand_scale, scale)
        zero = torch.where(better, cand_zero, zero)
        best_step = torch.where(better, step_of_row, best_step)

    for i in range(0, steps, coarse):
        consider(torch.full_like(best_step, i))
    centre = best_step.clone()
    for offset in range(-(coarse - 1), coarse):
        if offset:
            candidate = centre + offset
            valid = (candidate >= 0) & (candidate < steps)
            if bool(valid.any()):
                consider(torch.where(valid, candidate, centre))
    return scale, zero


def fit_grid(w: torch.Tensor, spec: GridSpec, weights: torch.Tensor | None = None):
    """Grid parameters for a block of columns, one per row.

    w: ``[rows, cols]``. weights: optional non-negative ``[cols]`` importance of each column in the clip search
    (e.g. the Hessian diagonal); the search minimises ``sum_j weights_j * |w_j - q_j|**clip_norm`` per row, and
    shrink factor 1 (no clipping) is always a candidate, so clipping never raises that error.
    Returns ``(scale float32 [rows], zero uint8 [rows])``; the range always includes 0.
    """
    scale, zero = fit_grid_float(w, spec, weights)
    return scale, zero.to(torch.uint8)


def fit_groups(w: torch.Tensor, spec: GridSpec, weights: torch.Tensor | None = None):
    """Grid parameters for contiguous groups of ``spec.group_size`` columns (a shorter last group if needed).

    Returns ``(scale float32 [rows, n_groups], zero uint8 [rows, n_groups])``.
    """
    scale, zero = fit_groups_float(w, spec, weights)
    return scale, zero.to(torch.uint8)


def fit_groups_float(w: torch.Tensor, spec: GridSpec, weights: torch.Tensor | None = None):
    """``fit_groups`` with float32 zero (integer-valued)."""
    rows, cols = w.shape
    width = spec.group_width(cols)
    full = cols // width
    scales, zeros = [], []
    if full:
        # all full groups at once: each (row, group) pair is a row of the reshaped block
        block = w[:, : full * width].reshape(rows * full, width)
        block_weights = None
        if weights is not None:
            block_weights = weights[: full * width].reshape(1, full, width).expand(rows, full, width)
            block_weights = block_weights.reshape(rows * full, width)
        s, z = fit_grid_float(block, spec, block_weights)
        scales.append(s.reshape(rows, full))
        zeros.append(z.reshape(rows, full))
    if full * width < cols:
        tail_weights = None if weights is None else weights[full * width:]
        s, z = fit_grid_float(w[:, full * width:], spec, tail_weights)
        scales.append(s[:, None])
        zeros.append(z[:, None])
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def expand_groups(param: torch.Tensor, cols: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-column view of per-group parameters ``[rows, n_groups]`` (or ``[rows]``)."""
    if param.ndim == 1:
        param = param[:, None]
    if g_idx is not None:
        return param[:, g_idx.long()]
    if param.shape[1] != 1:
        raise ValueError("per-group parameters need g_idx (use group_index(in_features, group_size))")
    return param


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as uint8 ``[rows, cols]``.

    scale/zero: ``[rows]`` or ``[rows, 1]`` (per row), or ``[rows, n_groups]`` with ``g_idx [cols]``.
    """
    cols = w.shape[1]
    s = expand_groups(scale, cols, g_idx).float()
    z = expand_groups(zero, cols, g_idx).float()
    return torch.clamp(torch.round(w.float() / s) + z, 0, maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """float32 weights ``(codes - zero) * scale``; scale/zero shaped as for ``quantize``."""
    cols = codes.shape[1]
    s = expand_groups(scale, cols, g_idx).float()
    z = expand_groups(zero, cols, g_idx).float()
    return (codes.float() - z) * s


def fake_quantize(w: torch.Tensor, spec: GridSpec, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest onto the grid ``spec`` fits to ``w`` (contiguous groups); float32 like ``w``."""
    scale, zero = fit_groups(w, spec, weights)
    g_idx = group_index(w.shape[1], spec.group_size, device=w.device)
    return dequantize(quantize(w, scale, zero, spec.maxq, g_idx), scale, zero, g_idx)


def to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (or zero points) -> the signed int8 values compressed-tensors stores (``code - 2**(bits-1)``).

    For a symmetric grid the signed zero point is 0, so compressed-tensors omits it; the weight is
    ``signed_code * scale``.
    """
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def from_signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``to_signed``: signed int8 values -> unsigned uint8 codes."""
    return (values.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
