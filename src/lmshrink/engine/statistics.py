"""Statistics of the linear layers' calibration inputs that the engine collects for stages (``core.stage.Stat``).

``HessianAccumulator`` gives ``Stat.HESSIAN``, a ``CrossAccumulator`` with a reference ``HessianAccumulator`` give
``Stat.FP_TARGET``, ``ChannelAccumulator`` gives ``Stat.CHANNELS``. ``GroupStats`` bundles what one collection
pass gathered for one linear group (the layers of a group share their input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _flat_rows(x: torch.Tensor, width: int, device, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``[batch, seq, in]`` or ``[tokens, in]``) as fp32 ``[tokens, in]`` rows on ``device``, masked tokens
    dropped: the input rows both accumulators sum."""
    if x.shape[-1] != width:
        raise ValueError(f"input width {x.shape[-1]} != {width}")
    rows = x.reshape(-1, width).to(device=device, dtype=torch.float32)
    if mask is not None:
        rows = rows[mask.reshape(-1).to(rows.device)]
    return rows


def _advance(acc, total: torch.Tensor, x: torch.Tensor, tokens: int) -> float:
    """The running average's step: rescale ``total`` for the samples of ``x`` (the batch dimension of a 3-D input,
    else one), count them on ``acc`` and return the factor ``2 / nsamples`` the new products take."""
    batch = x.shape[0] if x.ndim == 3 else 1
    total.mul_(acc.nsamples / (acc.nsamples + batch))
    acc.nsamples += batch
    acc.tokens += tokens
    return 2.0 / acc.nsamples


class HessianAccumulator:
    """Accumulates ``H = (2 / nsamples) * sum_t x_t x_t^T`` over calibration inputs of one linear layer, in fp32.

    The scaling is the running average of the GPTQ reference (samples = sequences, not tokens); it does not change
    the solution, only keeps the numbers of a long calibration bounded. ``hessian`` is ``[in, in]``. Only the
    upper triangle is accumulated (in bands of rows, about 2/3 of the work of a full product); reading
    ``hessian`` mirrors it into the lower triangle, so the result is exactly symmetric.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._mirrored = True
        self.nsamples = 0
        self.tokens = 0
        # bands of about a quarter of the width, multiples of 64 columns (whole-matrix product below 256)
        band = -(-in_features // 4)
        self._band = in_features if in_features < 256 else -(-band // 64) * 64

    @property
    def hessian(self) -> torch.Tensor:
        if not self._mirrored:
            lower = torch.ones(self.in_features, self.in_features, dtype=torch.bool, device=self._h.device).tril_(-1)
            self._h[lower] = self._h.t()[lower]
            self._mirrored = True
        return self._h

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the layer inputs ``x``: ``[batch, seq, in]`` (``batch`` samples) or ``[tokens, in]`` (one sample).

        For ``nn.Linear`` and gpt2 ``Conv1D`` the input is what the forward pre-hook sees. ``mask`` (``[batch, seq]``
        or ``[tokens]``, bool) drops padding tokens.
        """
        rows = _flat_rows(x, self.in_features, self._h.device, mask)
        rows = rows * math.sqrt(_advance(self, self._h, x, rows.shape[0]))
        if self._band >= self.in_features:
            self._h.addmm_(rows.t(), rows)
            return
        for start in range(0, self.in_features, self._band):
            end = min(start + self._band, self.in_features)
            self._h[start:end, start:].addmm_(rows[:, start:end].t(), rows[:, start:])
        self._mirrored = False


class CrossAccumulator:
    """Accumulates ``C = (2 / nsamples) * sum_t x_t x~_t^T`` (``[in, in]``, fp32) over paired inputs of one layer.

    ``x`` are the layer's inputs in the uncompressed model, ``x~`` its inputs in the partly compressed model on the
    same calibration tokens, paired token by token (same shapes, same order). The scaling is the running average of
    ``HessianAccumulator``, so ``C`` and a Hessian accumulated over the same batches have the same scale.
    ``identical`` stays True while every pair was bitwise equal (then ``C`` equals ``X~^T X~`` up to rounding, and
    the asymmetric target is the layer's own weight: see ``fp_target_weight``).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.cross = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0
        self.tokens = 0
        self.identical = True

    def add_batch(self, x: torch.Tensor, x_tilde: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add paired inputs ``x`` (uncompressed model) and ``x_tilde`` (compressed): ``[batch, seq, in]`` or
        ``[tokens, in]``, as ``HessianAccumulator.add_batch``; ``mask`` drops the same (padding) tokens of both."""
        if x.shape != x_tilde.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(x.shape)} vs {tuple(x_tilde.shape)}")
        self.identical = self.identical and bool(torch.equal(x, x_tilde))
        rows = _flat_rows(x, self.in_features, self.cross.device, mask)
        rows_t = _flat_rows(x_tilde, self.in_features, self.cross.device, mask)
        self.cross.addmm_(rows.t(), rows_t, alpha=_advance(self, self.cross, x, rows.shape[0]))


class ChannelAccumulator:
    """Per input channel of one linear layer: running ``sum x`` (``sum``), ``sum x^2`` (``sq_sum``), ``sum |x|``
    (``abs_sum``), ``min`` and ``max`` over all calibration tokens, in fp32, and the token count. Means are these
    sums over ``tokens``; ``sq_sum`` is ``||X_j||^2``, the column norm Wanda and OWL score with; the variance of a
    channel is ``sq_sum / tokens - (sum / tokens)^2``."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.min = torch.full((in_features,), float("inf"), dtype=torch.float32, device=device)
        self.max = torch.full((in_features,), float("-inf"), dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[1] != self.in_features:
            raise ValueError(f"input width {rows.shape[1]} != {self.in_features}")
        self.sum += rows.float().sum(dim=0)
        self.sq_sum += rows.float().square().sum(dim=0)
        self.abs_sum += rows.float().abs().sum(dim=0)
        self.min = torch.minimum(self.min, rows.float().amin(dim=0))
        self.max = torch.maximum(self.max, rows.float().amax(dim=0))
        self.tokens += rows.shape[0]


@dataclass
class DriftStats:
    """``Stat.FP_TARGET`` for one linear group: ``cross`` C = ``X^T X~`` and ``reference`` H = ``X^T X`` (X: the
    group's inputs in the uncompressed model, X~: in the model being compressed, paired token by token)."""

    cross: CrossAccumulator
    reference: HessianAccumulator

    @property
    def identical(self) -> bool:
        """Every pair of inputs was bitwise equal (e.g. block 0's first group): the uncompressed target is the
        layer's own weight."""
        return self.cross.identical


@dataclass
class GroupStats:
    """What one collection pass gathered for one linear group; ``None`` where the stage did not ask."""

    hessian_accumulator: HessianAccumulator | None = None
    fp_target: DriftStats | None = None
    channels: ChannelAccumulator | None = None

    @property
    def hessian(self) -> torch.Tensor | None:
        return None if self.hessian_accumulator is None else self.hessian_accumulator.hessian

    @property
    def tokens(self) -> int | None:
        for source in (self.hessian_accumulator, self.channels):
            if source is not None:
                return source.tokens
        return None
