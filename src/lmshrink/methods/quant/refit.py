"""Least-squares grid scales for fixed codes: after the sweep has chosen every code, choose each row's group
scales to minimise the layer's output error ``(w - q)^T H (w - q)`` exactly.

With the codes ``c`` and zero points ``z`` fixed, a row's quantized weights are linear in its group scales:
``q = A s`` where column ``g`` of ``A`` holds ``c_j - z_g`` on the columns ``j`` of group ``g`` and zeros
elsewhere. The optimum solves the small normal equations ``(A^T H A) s = A^T H w`` (one ``G x G`` system per row,
``G`` = groups per row). The sweep picked the codes against the grid fitted before it (clip search on the original
weights); this moves the grid to the weights the codes actually ended up representing, with the full Hessian,
cross-group terms included. Codes and zero points do not change, so the stored layout does not either.

The scales are then rounded to their storage dtype, and a row keeps its old scales unless the new ones lower its
output error (computed with the same Hessian), so the layer's error never rises.
"""

from __future__ import annotations

import torch

from lmshrink.core.grids import dequantize, round_scale
from lmshrink.core.results import QuantResult


def _row_errors(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    diff = weight - quantized
    return ((diff @ hessian) * diff).sum(dim=1, dtype=torch.float64)


def refit_scales(result: QuantResult, weight: torch.Tensor, hessian: torch.Tensor, ridge: float = 1e-6) -> dict:
    """Replace ``result``'s scales (and ``weight``) by the least-squares ones, row by row where they help.

    weight: the original ``[out, in]`` weights; hessian: the undamped ``X^T X`` ``[in, in]``. ``ridge``: added to
    each system's diagonal, relative to its mean, against singular systems (a group whose codes all equal its
    zero point). Returns a summary: rows changed and the relative output error before the refit (the one after is
    ``result.rel_output_error``).
    """
    w = weight.float()
    h = hessian.float()
    rows = w.shape[0]
    g_idx = result.group_index().long()
    groups = result.scale.shape[1]
    codes = result.codes.float()
    zero = result.zero.float()
    d = codes - zero[:, g_idx]  # [rows, cols]
    one_hot = torch.nn.functional.one_hot(g_idx, groups).to(w.dtype)  # [cols, groups]
    system = torch.empty(rows, groups, groups, dtype=torch.float32, device=w.device)
    for g in range(groups):
        members = (g_idx == g).nonzero().squeeze(1)
        e = d[:, members] @ h[members, :]  # [rows, cols]: (H A_g) for every row, transposed
        system[:, :, g] = (d * e) @ one_hot
    wh = w @ h
    rhs = (d * wh) @ one_hot  # [rows, groups]
    system = 0.5 * (system + system.transpose(1, 2))
    diag = system.diagonal(dim1=1, dim2=2)
    scale_of_row = diag.mean(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    system = system + torch.diag_embed(ridge * scale_of_row[:, None].expand(rows, groups))
    solution = torch.linalg.solve(system.double(), rhs.double()[:, :, None]).squeeze(2).float()
    stored = torch.where(solution > 0, round_scale(solution.clamp_min(0), result.spec), solution)
    old_scale = result.scale.float()
    candidate = torch.where(diag > 0, stored, old_scale)  # a group with no non-zero code keeps its scale
    usable = torch.isfinite(candidate).all(dim=1) & (candidate > 0).all(dim=1)
    candidate = torch.where(usable[:, None], candidate, old_scale)
    new_weight = dequantize(result.codes, candidate, result.zero, g_idx)
    before = _row_errors(w, result.weight.float(), h)
    after = _row_errors(w, new_weight, h)
    better = usable & (after < before)
    result.scale = torch.where(better[:, None], candidate, old_scale)
    result.weight = torch.where(better[:, None], new_weight, result.weight.float())
    total = float((wh * w).sum(dtype=torch.float64))
    err_before = float(before.sum()) / total if total > 0 else float(before.sum())
    err_after = float(torch.where(better, after, before).sum()) / total if total > 0 else float(after.sum())
    result.rel_output_error = err_after
    return {"refit_rows": int(better.sum()), "rel_output_error_before_refit": err_before}
