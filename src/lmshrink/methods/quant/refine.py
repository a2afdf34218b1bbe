"""Coordinate descent on the codes after the sweep: lower the layer's output error with the grid fixed.

The GPTQ sweep decides each column once, in order, and only pushes its rounding error onto the columns after it: a
column decided early never sees the errors made later. Coordinate descent (as in QuantEase, Behdin et al. 2023)
revisits every column with all the others fixed. For the objective ``f(Q) = tr((W - Q) Hd (W - Q)^T)`` (``Hd``:
the damped Hessian the sweep used), column ``j`` enters as a one-dimensional quadratic in each row whose minimum is
at ``q_j + G_j / Hd_jj`` (``G = (W - Q) Hd``); the nearest grid point of the column's group is the exact minimiser
on the grid (a convex quadratic, a uniform clamped grid). So every step keeps or lowers ``f``, and the grid (scales,
zero points, group index) is untouched: only codes change, the stored layout does not.

Cost per pass: one ``[out, in] x [in, in]`` product's worth of rank-1 and block updates (blocked like the sweep),
no forward pass. Entries in ``keep`` (weights pruned by an earlier stage, exact zeros) are never changed.
"""

from __future__ import annotations

import torch

from lmshrink.core.grids import expand_groups
from lmshrink.core.results import QuantResult
from lmshrink.methods.solver import output_error


def coordinate_descent(result: QuantResult, weight: torch.Tensor, hessian: torch.Tensor, passes: int,
                       damp_percent: float | None = None, block_size: int = 128,
                       keep: torch.Tensor | None = None) -> dict:
    """Refine ``result``'s codes (and ``weight``) in place by ``passes`` coordinate-descent passes over the columns.

    weight: the ``[out, in]`` target the sweep aimed at; hessian: the undamped ``X^T X``; damp_percent: the damping
    (fraction of the mean diagonal; dead inputs count as 1, as in ``solve_columns``); by default the one the sweep
    finally used (``result.info["damp_percent"]``, raised there if the Cholesky factorisation failed; 0.01 if the
    result does not say), so descent lowers the objective the sweep minimised. keep: optional bool ``[out, in]``,
    entries held fixed. A pass that changes no code ends the descent early. ``rel_output_error`` is recomputed on the
    undamped Hessian. Returns a summary.
    """
    if damp_percent is None:
        damp_percent = float((result.info or {}).get("damp_percent", 0.01))
    w = weight.float()
    rows, cols = w.shape
    h = hessian.float().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp_percent * float(diag.mean()))
    g_idx = result.group_index()
    # the columns as contiguous rows ([in, out]): every step reads and writes one column
    scale = expand_groups(result.scale.float(), cols, g_idx).t().contiguous()
    zero = expand_groups(result.zero.float(), cols, g_idx).t().contiguous()
    maxq = result.spec.maxq
    codes = result.codes.t().contiguous()
    q = result.weight.float().t().contiguous()
    target = w.masked_fill(dead[None, :], 0.0)  # the sweep zeroes dead inputs' weights before solving
    grad = h @ (target.t() - q)  # G^T = Hd E^T (Hd symmetric)
    fixed = (dead[:, None].expand(cols, rows) if keep is None else keep.t() | dead[:, None]).contiguous()
    before = result.rel_output_error  # the sweep's error on the same target and Hessian
    if before is None:
        before = output_error(w, result.weight.float(), hessian.float())
    inverse_diag = 1.0 / h.diagonal()
    changed_total, done = 0, 0
    for _ in range(passes):
        changed = 0
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            moves = torch.zeros(b1 - b0, rows, dtype=torch.float32, device=w.device)
            h_block = h[b0:b1, b0:b1]
            for j in range(b0, b1):
                s, z = scale[j], zero[j]
                new_codes = torch.clamp(torch.round((q[j] + grad[j] * inverse_diag[j]) / s) + z, 0, maxq)
                new_codes = torch.where(fixed[j], codes[j].float(), new_codes)
                new_q = (new_codes - z) * s
                move = q[j] - new_q  # change of the error column e_j = w_j - q_j
                moved = int(torch.count_nonzero(move))
                if not moved:
                    continue
                changed += moved
                grad[b0:b1].addr_(h_block[j - b0], move)
                q[j] = new_q
                codes[j] = new_codes.to(codes.dtype)
                moves[j - b0] = move
            if b0 > 0:
                grad[:b0].addmm_(h[:b0, b0:b1], moves)
            if b1 < cols:
                grad[b1:].addmm_(h[b1:, b0:b1], moves)
        done += 1
        changed_total += changed
        if not changed:
            break
    codes, q = codes.t().contiguous(), q.t().contiguous()
    result.codes = codes
    result.weight = q
    result.rel_output_error = output_error(w, q, hessian.float())
    return {"cd_passes": done, "cd_changed_codes": changed_total, "cd_damp_percent": damp_percent,
            "rel_output_error_before_cd": before}
