"""The optimal-brain-surgeon column sweep shared by GPTQ, SparseGPT and joint prune + quantize.

For a linear layer ``y = W x`` with calibration Hessian ``H = sum x x^T`` (scaled), the sweep visits the input
columns in order; a plugged-in ``ColumnRule`` decides each column's new value (round to a grid, set to zero, both),
and the rounding error is spread over the columns not yet visited through the upper Cholesky factor of ``H^-1``
(the GPTQ "Cholesky-inverse" formulation), with lazy updates in blocks of columns.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from lmshrink.core.errors import LmshrinkError

# blocks up to this many elements (e.g. 4096 rows x 128 columns) sweep faster on one thread
_SINGLE_THREAD_MAX = 1 << 19


class SolverError(LmshrinkError):
    """The layer's Hessian could not be factorised even with raised damping."""


def fp_target_weight(weight: torch.Tensor, correction: torch.Tensor, hessian: torch.Tensor,
                     damp_percent: float = 0.01, max_retries: int = 5) -> tuple[torch.Tensor, dict]:
    """The least-squares target of asymmetric calibration: ``W* = W (C + l I)(H~ + l I)^-1``, in float64.

    ``weight`` W: ``[out, in]``; ``correction``: ``W (C - H~)`` (``[out, in]``, float64: ``DriftStats.correction``)
    with C = ``X^T X~``; ``hessian`` H~ = ``X~^T X~`` (rows of X, X~ = tokens, the accumulators' convention and
    scale). ``l`` is the GPTQ damping (``damp_percent`` of the mean diagonal of H~, dead
    inputs counted as 1, as ``solve_columns`` does). W* minimises ``||W X^T - Q X~^T||^2 + l ||W - Q||^2`` over
    unconstrained Q, and for any Q that objective equals its value at W* plus ``tr((Q - W*)(H~ + l I)(Q - W*)^T)``,
    the damped objective the GPTQ/SparseGPT sweep minimises on W* with Hessian H~: the sweep on W* minimises the
    asymmetric objective exactly. When X~ = X (C = H~) W* = W. Returns ``(W* as float32, info)``; damping is raised
    10x if the factorisation fails, as in ``solve_columns``.
    """
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    mean_diag = float(diag.mean())
    w = weight.to(device=h.device, dtype=torch.float64)
    # W* = W + W (C - H~)(H~ + l I)^-1 : the correction is exactly 0 when C == H~
    rhs = correction.to(device=h.device, dtype=torch.float64).t()
    for retry in range(max_retries + 1):
        damp = damp_percent * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        if int(info) == 0:
            target = w + torch.cholesky_solve(rhs, lower).t()
            if bool(torch.isfinite(target).all()):
                return target.to(torch.float32), {"fp_target_damp_percent": damp_percent,
                                                  "fp_target_damp_retries": retry}
        damp_percent *= 10.0
    raise SolverError(
        f"the layer Hessian is not positive definite even with damping {damp_percent / 10:g} of its mean diagonal "
        "(asymmetric calibration target)", fix="use more calibration samples, or a larger damp_percent")


def asymmetric_error_terms(weight: torch.Tensor, solved: torch.Tensor, hessian: torch.Tensor,
                           weighted_cross: torch.Tensor) -> tuple[float, float]:
    """``||W X^T - Q X~^T||^2 - ||W X^T||^2`` = ``tr(Q H~ Q^T) - 2 <W C, Q>`` for Q = W (what the input drift
    alone costs) and Q = ``solved``: the asymmetric error less its first term, from H~ = ``X~^T X~`` and
    ``W C`` = ``W X^T X~``. Products in fp32 (as ``output_error``), sums in fp64."""
    w = weight.float()
    q = solved.to(device=w.device, dtype=torch.float32)
    wc = weighted_cross.to(w.device, torch.float32)
    h_t = hessian.to(w.device, torch.float32)

    def term(other: torch.Tensor) -> float:
        return -2.0 * float((wc * other).sum(dtype=torch.float64)) + float(
            ((other @ h_t) * other).sum(dtype=torch.float64))

    return term(w), term(q)


def relative_asymmetric_error(term: float, output_norm: float) -> float:
    """The relative asymmetric error ``||W X^T - Q X~^T||^2 / ||W X^T||^2`` from ``asymmetric_error_terms``' term
    and ``||W X^T||^2`` (clipped at 0: the difference of two rounded sums can dip below it)."""
    num = max(output_norm + term, 0.0)
    return num / output_norm if output_norm > 0 else num


def asymmetric_output_error(weight: torch.Tensor, solved: torch.Tensor, hessian: torch.Tensor,
                            weighted_cross: torch.Tensor, output_norm: float) -> tuple[float, float]:
    """``||W X^T - Q X~^T||^2 / ||W X^T||^2`` from H~ = ``X~^T X~``, ``W C`` = ``W X^T X~`` and ``||W X^T||^2``.

    The relative error of the compressed layer (``solved`` Q) on the compressed model's inputs against the
    uncompressed layer on the uncompressed model's inputs (``weighted_cross`` and ``output_norm``: the
    ``DriftStats`` terms of W). Returns ``(drift only, with Q)``: the first is the same error with Q = W (what the
    input drift alone costs).
    """
    drift_only, after = asymmetric_error_terms(weight, solved, hessian, weighted_cross)
    return relative_asymmetric_error(drift_only, output_norm), relative_asymmetric_error(after, output_norm)


class Sweep:
    """What a ``ColumnRule`` may look at during the sweep (all in sweep order, i.e. after any permutation).

    weight: ``[out, in]`` working weights; columns before the current block hold their final values, columns after
    it have received the updates of all finished blocks. block: the current block's up-to-date weights
    (``[out, block_end - block_start]``). hinv: upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``).
    hessian_diag: the undamped Hessian diagonal (dead inputs set to 1). perm: sweep position -> original column,
    or None. col: the column being decided.
    """

    def __init__(self, weight, hinv, hessian_diag, perm):
        self.weight = weight
        self.hinv = hinv
        self.hessian_diag = hessian_diag
        self.perm = perm
        self.block_start = 0
        self.block_end = 0
        self.block = None
        self.block_err = None
        self.col = 0

    @property
    def columns(self) -> int:
        return self.weight.shape[1]

    def current(self, start: int, end: int) -> torch.Tensor:
        """Up-to-date weights of sweep columns ``[start, end)`` (``start >= col``), including pending updates."""
        if start < self.col:
            raise ValueError("current() only sees columns not yet decided")
        parts = []
        if start < self.block_end:
            parts.append(self.block[:, start - self.block_start: min(end, self.block_end) - self.block_start])
        if end > self.block_end:
            lo = max(start, self.block_end)
            done = self.col - self.block_start
            pending = self.block_err[:, :done] @ self.hinv[self.block_start: self.col, lo:end]
            parts.append(self.weight[:, lo:end] - pending)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()


class ColumnRule:
    """The per-column decision plugged into ``solve_columns``; subclass and override ``decide``."""

    def start(self, sweep: Sweep) -> None:
        """Called once before the sweep (after dead-input handling and the act-order permutation)."""

    def start_block(self, sweep: Sweep) -> None:
        """Called at the start of each block of columns (``sweep.block`` holds its weights): adaptive masks go here."""

    def decide(self, sweep: Sweep, col: int, w: torch.Tensor) -> torch.Tensor:
        """The new value of sweep column ``col`` given its up-to-date weights ``w`` (``[out]`` fp32)."""
        raise NotImplementedError


@dataclass
class SolveResult:
    """The solved layer and how the solve went.

    weight: ``[out, in]`` fp32 solved weights in the original column order. perm: the sweep order (act-order) or
    None. loss: the GPTQ reference's reported error ``sum (w - q)^2 / d^2 / 2`` over columns (d = diag of U).
    rel_output_error: ``||(W - Q) X||^2 / ||W X||^2`` computed as ``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` with the
    undamped Hessian. damp_percent: the damping finally used (percent of the mean diagonal, as a fraction);
    damp: its absolute value; damp_retries: how many times damping was raised 10x after a failed factorisation.
    """

    weight: torch.Tensor
    perm: torch.Tensor | None
    loss: float
    rel_output_error: float
    damp_percent: float
    damp: float
    damp_retries: int
    dead_columns: int
    seconds: float

    def info(self) -> dict:
        """JSON-friendly summary for reports."""
        return {
            "loss": self.loss, "rel_output_error": self.rel_output_error, "damp_percent": self.damp_percent,
            "damp": self.damp, "damp_retries": self.damp_retries, "dead_columns": self.dead_columns,
            "act_order": self.perm is not None, "seconds": round(self.seconds, 4),
        }


def output_error(weight: torch.Tensor, solved: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` = ``||(W-Q)X||^2 / ||WX||^2`` for ``H = X^T X``."""
    weight = weight.float()
    diff = weight - solved.float()
    num = ((diff @ hessian) * diff).sum(dtype=torch.float64)
    den = ((weight @ hessian) * weight).sum(dtype=torch.float64)
    return float(num / den) if den > 0 else float(num)


@contextlib.contextmanager
def _few_threads(block: torch.Tensor):
    """Run the per-column loop single-threaded on CPU for small blocks: thread hand-offs cost more than the work."""
    small = block.device.type == "cpu" and block.numel() <= _SINGLE_THREAD_MAX
    previous = torch.get_num_threads()
    if small and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _factorise(hessian: torch.Tensor, damp_percent: float, max_retries: int, dtype: torch.dtype):
    """Damp ``hessian`` in place and return ``(U, damp_percent, damp, retries)`` with ``H^-1 = U^T U``."""
    diag = hessian.diagonal()
    mean_diag = float(diag.mean())
    added = 0.0
    for retry in range(max_retries + 1):
        damp = damp_percent * mean_diag
        diag.add_(damp - added)
        added = damp
        work = hessian.to(dtype)
        lower, info = torch.linalg.cholesky_ex(work)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.to(torch.float32), damp_percent, damp, retry
        damp_percent *= 10.0
    raise SolverError(
        f"the layer Hessian is not positive definite even with damping {damp_percent / 10:g} of its mean diagonal",
        fix="use more calibration samples, or a larger damp_percent")


def solve_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    rule: ColumnRule,
    *,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    max_retries: int = 5,
    cholesky_dtype: torch.dtype = torch.float32,
    overwrite_hessian: bool = False,
    order: torch.Tensor | None = None,
) -> SolveResult:
    """Sweep the columns of ``weight`` (``[out, in]``) with ``rule`` deciding each, compensating with ``hessian``.

    damp_percent: added to the diagonal as a fraction of its mean (0.01 = 1%); if the Cholesky factorisation fails
    it is raised 10x, up to ``max_retries`` times (then ``SolverError``). Dead inputs (``H_ii == 0``) get
    ``H_ii = 1`` and zero weights. act_order: visit columns by decreasing ``H_ii``. order: visit columns in this
    order instead (a permutation of ``0 .. in-1``, e.g. OWQ's kept columns last). The Hessian is copied unless
    ``overwrite_hessian`` (then it is left damped and permuted: do not reuse it).
    """
    started = time.perf_counter()
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight width {columns}")
    device = hessian.device
    work = weight.to(device=device, dtype=torch.float32, copy=True)
    hessian = hessian.float()
    permuted = act_order or order is not None
    if not overwrite_hessian and not permuted:  # the permutation copies anyway
        hessian = hessian.clone()

    original_diag = hessian.diagonal().clone()
    dead = original_diag == 0
    if permuted and not overwrite_hessian and bool(dead.any()):
        hessian = hessian.clone()
    if bool(dead.any()):
        # an input that is always 0 carries no information: its weight cannot matter, so drop it
        hessian.diagonal()[dead] = 1.0
        work[:, dead] = 0.0

    perm = None
    if order is not None:
        if tuple(order.shape) != (columns,) or not torch.equal(torch.sort(order.cpu().long()).values, torch.arange(columns)):
            raise ValueError(f"order must be a permutation of the {columns} columns")
        perm = order.to(device=device, dtype=torch.long)
    elif act_order:
        perm = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    if perm is not None:
        work = work[:, perm]
        hessian = hessian[perm][:, perm]
        original_diag = original_diag[perm]
    hessian_diag = hessian.diagonal().clone()

    hinv, damp_final, damp, retries = _factorise(hessian, damp_percent, max_retries, cholesky_dtype)

    sweep = Sweep(work, hinv, hessian_diag, perm)
    rule.start(sweep)
    losses = torch.zeros(columns, dtype=torch.float32, device=device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = work[:, i1:i2].clone()
        block_err = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        sweep.block_start, sweep.block_end, sweep.block, sweep.block_err, sweep.col = i1, i2, block, block_err, i1
        rule.start_block(sweep)
        with _few_threads(block):
            for i in range(i2 - i1):
                sweep.col = i1 + i
                w = block[:, i]
                q = rule.decide(sweep, i1 + i, w)
                err = (w - q) / hinv_block[i, i]
                losses[i1 + i] = err.square().sum()
                block[:, i + 1:].addr_(err, hinv_block[i, i + 1:], alpha=-1.0)
                block[:, i] = q
                block_err[:, i] = err
        # the block's columns are final: store them in place, then push its error to the later columns
        work[:, i1:i2] = block
        if i2 < columns:
            work[:, i2:].sub_(block_err @ hinv[i1:i2, i2:])

    hessian.diagonal().copy_(original_diag)  # undamped, dead inputs back to 0: the true X^T X
    original = weight.to(device=device, dtype=torch.float32)
    rel = output_error(original if perm is None else original[:, perm], work, hessian)
    if perm is not None:
        work = work[:, torch.argsort(perm)]
    return SolveResult(
        weight=work, perm=perm, loss=float(losses.sum(dtype=torch.float64)) / 2.0, rel_output_error=rel,
        damp_percent=damp_final, damp=damp, damp_retries=retries, dead_columns=int(dead.sum()),
        seconds=time.perf_counter() - started)
