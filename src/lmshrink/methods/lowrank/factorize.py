"""Truncated SVD of a linear layer ``y = W x`` in a weighted space, and what follows from it.

Three weightings of the input columns, each ``W ~ left @ right`` at rank r:

* plain: the SVD of ``W``; the best rank-r approximation in weight space (Frobenius), blind to the inputs;
* ASVD (Yuan et al. 2023): the SVD of ``W D`` with ``D = diag(mean |x_j|)^alpha``, the right factor multiplied by
  ``D^-1`` afterwards, so columns that carry large activations are kept more faithfully;
* SVD-LLM (Wang et al. 2024): the SVD of ``W S`` with ``S`` the lower Cholesky factor of the input Hessian
  ``H = S S^T`` (``X^T X`` up to the engine's scale 2/n), the right factor ``V_r^T S^-1``. Because ``S^T`` whitens
  the inputs, ``||(W - left right) X^T||^2 = sum of the dropped squared singular values of W S`` (times n/2 for the
  engine's scale): truncating the smallest ones is the optimal rank-r approximation of the layer's output on the
  calibration inputs.

The singular values are split evenly between the factors (``left = U_r Sigma_r^1/2``, ``right = Sigma_r^1/2 V_r^T
W^-1``), as SVD-LLM does. All the algebra runs in float64; factors come back as float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmshrink.core.errors import LmshrinkError


def break_even_rank(out_features: int, in_features: int) -> float:
    """``m n / (m + n)``: a rank-r factorization stores ``r (m + n)`` numbers, fewer than ``m n`` only below this."""
    return out_features * in_features / (out_features + in_features)


def max_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose two factors hold fewer numbers than the dense layer."""
    return math.ceil(break_even_rank(out_features, in_features)) - 1


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The rank that removes at least ``ratio`` of an ``out x in`` layer's parameters (at least 1)."""
    return max(1, math.floor((1.0 - ratio) * break_even_rank(out_features, in_features) + 1e-9))


def check_rank(name: str, out_features: int, in_features: int, rank: int, shared_by: int = 1) -> None:
    """Refuse a rank that would not make the layer smaller (``rank (m + n) >= m n``; for a basis shared by ``n``
    layers: ``rank (in + n out) >= n out in``), or below 1."""
    stored = rank * (in_features + shared_by * out_features)
    dense = shared_by * out_features * in_features
    limit = dense / (in_features + shared_by * out_features)
    if rank < 1 or stored >= dense:
        what = f"{shared_by} layers sharing one basis" if shared_by > 1 else "the layer"
        raise LmshrinkError(
            f"layer {name} ({out_features} x {in_features}): rank {rank} stores {stored} numbers where {what} "
            f"holds {dense}: a factorization pays only for 1 <= rank < {limit:.1f}",
            fix=f"use a rank below {limit:.1f} (a larger ratio), or leave {name} out of the stage (ignore)")


def cholesky_whitening(hessian: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The lower Cholesky factor ``S`` of ``H`` (float64), with ``H = S S^T``.

    Where ``H`` is not positive definite (dead input channels, fewer tokens than inputs) its eigenvalues are shifted
    up until it is: by ``-lambda_min`` plus ``1e-6`` of the mean diagonal, raised tenfold while the factorization
    still fails. Returns ``(S, info)``; ``info["whitening_shift"]`` is the shift added (0.0 when none was needed).
    """
    h = hessian.to(torch.float64)
    lower, failed = torch.linalg.cholesky_ex(h)
    if int(failed) == 0:
        return lower, {"whitening_shift": 0.0}
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    smallest = float(torch.linalg.eigvalsh(h)[0])
    mean_diag = float(h.diagonal().abs().mean()) or 1.0
    eps = 1e-6
    for _ in range(8):
        shift = max(-smallest, 0.0) + eps * mean_diag
        lower, failed = torch.linalg.cholesky_ex(h + shift * eye)
        if int(failed) == 0:
            return lower, {"whitening_shift": shift}
        eps *= 10.0
    raise LmshrinkError("a layer's input Hessian could not be made positive definite for whitening",
                        fix="use more calibration samples (--nsamples), or whitening: asvd / none")


def activation_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's column scale ``mean|x_j|^alpha`` (float64), channels that never fire given the smallest positive
    scale so that the scaling stays invertible."""
    scale = abs_mean.to(torch.float64).clamp_min(0.0) ** alpha
    positive = scale[scale > 0]
    floor = float(positive.min()) if positive.numel() else 1.0
    return scale.clamp_min(floor)


def _weighted(weight: torch.Tensor, whitening: torch.Tensor | None) -> torch.Tensor:
    w = weight.to(torch.float64)
    if whitening is None:
        return w
    if whitening.dim() == 1:
        return w * whitening.to(w.device)[None, :]
    return w @ whitening.to(w.device)


def _unweight(rows: torch.Tensor, whitening: torch.Tensor | None) -> torch.Tensor:
    """``rows @ whitening^-1`` (rows of the weighted space back to the layer's input space)."""
    if whitening is None:
        return rows
    if whitening.dim() == 1:
        return rows / whitening.to(rows.device)[None, :]
    return torch.linalg.solve_triangular(whitening.to(rows.device), rows, upper=False, left=False)


@dataclass
class Truncation:
    """``left`` float32 ``[out, rank]``, ``right`` float32 ``[rank, in]``; ``singular_values`` of the weighted
    weight, all of them, float64."""

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor

    @property
    def dropped_energy(self) -> float:
        """The sum of the dropped squared singular values."""
        return float(self.singular_values[self.left.shape[1]:].square().sum())


def truncated_svd(weight: torch.Tensor, rank: int, whitening: torch.Tensor | None = None) -> Truncation:
    """``weight ~ left @ right`` at ``rank`` from the SVD of ``weight`` in the weighted space.

    ``whitening``: None (plain SVD), a 1-D column scale (ASVD: ``activation_scale``), or a lower-triangular
    ``S`` (SVD-LLM: ``cholesky_whitening``).
    """
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} is outside 1..{min(weight.shape)} for a {tuple(weight.shape)} weight")
    u, sigma, vh = torch.linalg.svd(_weighted(weight, whitening), full_matrices=False)
    root = sigma[:rank].sqrt()
    left = u[:, :rank] * root[None, :]
    right = _unweight(root[:, None] * vh[:rank], whitening)
    return Truncation(left=left.to(torch.float32), right=right.to(torch.float32), singular_values=sigma)


def truncation_errors(weight: torch.Tensor, hessian: torch.Tensor, whitening: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Relative output error ``||(W - W_r) X^T||^2 / ||W X^T||^2`` of the truncation at every rank r = 0..k
    (float64 ``[k + 1]``, k = min(out, in)), for the given weighting, from one SVD.

    With ``W S = sum_i sigma_i u_i v_i^T`` and ``w_i = S^-T v_i``, the error of dropping the components ``i > r`` is
    ``sum_{i>r} sigma_i^2 w_i^T H w_i`` (the ``u_i`` are orthonormal); under SVD-LLM whitening ``w_i^T H w_i = 1``.
    """
    w = weight.to(torch.float64)
    h = hessian.to(device=w.device, dtype=torch.float64)
    _, sigma, vh = torch.linalg.svd(_weighted(w, whitening), full_matrices=False)
    rows = _unweight(vh, whitening)
    energy = sigma.square() * ((rows @ h) * rows).sum(dim=1)
    total = float(((w @ h) * w).sum())
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return tail / total if total > 0 else tail


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """``rhs @ matrix^-1`` for a symmetric positive semi-definite ``matrix`` (float64), damped by 1e-8 of its mean
    diagonal, raised tenfold while the factorization fails."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    mean_diag = float(matrix.diagonal().mean()) or 1.0
    damp = 1e-8
    for _ in range(8):
        lower, failed = torch.linalg.cholesky_ex(matrix + damp * mean_diag * eye)
        if int(failed) == 0:
            return torch.cholesky_solve(rhs.t(), lower).t()
        damp *= 10.0
    raise LmshrinkError(f"{what}: the least-squares system is singular",
                        fix="use more calibration samples (--nsamples) or a lower rank")


def refit_left(weight: torch.Tensor, right: torch.Tensor, hessian: torch.Tensor,
               cross: torch.Tensor | None = None) -> torch.Tensor:
    """The left factor that minimises ``sum_t ||W x_t - A right x~_t||^2`` for a fixed ``right``:
    ``A = W C right^T (right H~ right^T)^-1``.

    ``hessian`` H~ = ``X~^T X~`` (the inputs the factorized layer receives); ``cross`` C = ``X^T X~`` pairs them
    with the inputs ``X`` of the uncompressed layer (``Stat.FP_TARGET``); None means X = X~ (C = H~). Both in the
    same scale. Returns float32 ``[out, rank]``.
    """
    w = weight.to(torch.float64)
    b = right.to(device=w.device, dtype=torch.float64)
    h = hessian.to(device=w.device, dtype=torch.float64)
    c = h if cross is None else cross.to(device=w.device, dtype=torch.float64)
    return _solve_spd(b @ h @ b.t(), w @ c @ b.t(), "refitting the left factor").to(torch.float32)


def shared_basis(weights: list[torch.Tensor], hessian: torch.Tensor, rank: int) -> tuple[list[torch.Tensor],
                                                                                        torch.Tensor, dict]:
    """Basis Sharing (Wang et al. 2024) for layers that read inputs of the same width: one right factor for all.

    The weights ``W_1..W_n`` (``[out_i, in]``) are stacked into ``[sum out_i, in]``, whitened with the Cholesky
    factor of ``hessian`` (the sum of the layers' input Hessians), and truncated to ``rank`` by one SVD: the shared
    right factor ("basis") is ``Sigma_r^1/2 V_r^T S^-1``, each layer's left factor ("coefficients") its rows of
    ``U_r Sigma_r^1/2``. Returns ``(lefts, right, info)``.
    """
    lower, info = cholesky_whitening(hessian)
    stacked = torch.cat([w.to(torch.float64) for w in weights], dim=0)
    truncation = truncated_svd(stacked, rank, lower)
    lefts = list(truncation.left.split([w.shape[0] for w in weights], dim=0))
    total = float(truncation.singular_values.square().sum())
    info = {**info, "group_rel_error_whitened": truncation.dropped_energy / total if total > 0 else 0.0}
    return [left.contiguous() for left in lefts], truncation.right, info
