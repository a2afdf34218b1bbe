"""Least-squares refit of a pruned layer's kept weights, for its final mask.

Once a pruning method has chosen the mask M of a layer ``y = W x`` (Hessian ``H = X^T X``), the kept weights that
minimise the layer's calibration error ``tr((Q - W) H (Q - W)^T)`` subject to ``Q_M = 0`` solve, for each output
row r with kept columns K_r, the linear system ``H_KK q_K = (H w)_K``. SparseGPT's column sweep approaches this
solution greedily (an entry's error is spread only over the columns after it, and the mask is chosen while
sweeping); Wanda and magnitude pruning do not update the weights at all. Solving the system exactly per row needs
one factorisation of ``H_KK`` per row (every row has its own mask), so this module runs a few iterations of
Jacobi-preconditioned conjugate gradients for all rows at once instead: each iteration is one product of the
``[out, in]`` weights with ``H``, and each one lowers the (damped) objective.
"""

from __future__ import annotations

import time

import torch

from lmshrink.methods.solver import output_error


def damped_hessian(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of ``H`` with dead inputs (``H_ii == 0``) given ``H_ii = 1`` and ``damp_percent`` of the mean
    diagonal added, as the column sweep damps it; and the dead-input mask. The refit solves its systems with it."""
    damped = hessian.float().clone()
    diag = damped.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp_percent * float(diag.mean()))
    return damped, dead


def _objective(q: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ``(q - w) H (q - w)^T`` in float64 (``hessian`` float64), so that comparing two weights is exact up
    to the rounding of one float64 product, far below the float32 iterations' own."""
    diff = q.double() - w.double()
    return ((diff @ hessian) * diff).sum(dim=1)


def refit_kept_weights(weight: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                       iterations: int, damp_percent: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Refit the kept weights of a pruned layer by least squares on its calibration Hessian.

    weight: ``[out, in]`` the layer's weight before pruning (the target). pruned: ``[out, in]`` the pruning
    method's result (zeros where ``mask``), the starting point. mask: bool ``[out, in]``, True where pruned; it does
    not change. hessian: ``X^T X`` (``[in, in]``), damped by ``damp_percent`` of its mean diagonal as in the sweep.
    iterations: conjugate-gradient steps (each one product with ``H``). A row whose damped objective would grow
    (rounding) keeps its starting weights, so no row ends worse than it started. Returns ``(weights, info)``:
    float32 weights with exact zeros where ``mask`` (and on dead inputs), and the steps run, the rows kept at their
    start, the relative output error (undamped ``H``) before and after the refit, and the time.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if pruned.shape != weight.shape or mask.shape != weight.shape or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"shapes do not match: weight {tuple(weight.shape)}, pruned {tuple(pruned.shape)}, mask "
                         f"{tuple(mask.shape)}, hessian {tuple(hessian.shape)}")
    started = time.perf_counter()
    device = hessian.device
    h, dead = damped_hessian(hessian, damp_percent)
    target = weight.to(device=device, dtype=torch.float32).clone()
    target[:, dead] = 0.0  # an input that is always 0 carries no information (as the sweep treats it)
    # the kept entries of each row; a weight on a dead input is 0 (its value cannot matter), as in the sweep
    keep = (~mask.to(device) & ~dead).to(torch.float32)
    start = pruned.to(device=device, dtype=torch.float32) * keep
    x = start.clone()
    # residual of H_KK x_K = (H w)_K, restricted to the kept entries of each row
    r = ((target - x) @ h) * keep
    precondition = keep / h.diagonal()
    z = r * precondition
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    done = 0
    for _ in range(iterations):
        if not bool((rz > 0).any()):
            break
        hp = (p @ h) * keep
        curvature = (p * hp).sum(dim=1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(torch.float32).tiny),
                            torch.zeros_like(rz))
        x.add_(alpha * p)
        r.sub_(alpha * hp)
        z = r * precondition
        rz_next = (r * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
        done += 1
    h64 = h.double()
    before, after = _objective(start, target, h64), _objective(x, target, h64)
    worse = after > before
    if bool(worse.any()):
        x[worse] = start[worse]
    x.mul_(keep)  # exact zeros where pruned (and on dead inputs)
    undamped = hessian.to(device=device, dtype=torch.float32)
    info = {"refit_iterations": done, "refit_rows_kept": int(worse.sum()),
            "rel_output_error_before_refit": output_error(target, start, undamped),
            "rel_output_error": output_error(target, x, undamped),
            "refit_seconds": round(time.perf_counter() - started, 4)}
    return x, info
