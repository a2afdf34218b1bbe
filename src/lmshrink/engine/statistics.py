"""Statistics of the linear layers' calibration inputs that the engine collects for stages (``core.stage.Stat``).

``HessianAccumulator`` gives ``Stat.HESSIAN``, a ``CrossAccumulator`` with a reference ``HessianAccumulator`` give
``Stat.FP_TARGET`` (or per layer a ``ProjectedCross``, or the reference as an ``OutputNorm`` per layer),
``ChannelAccumulator`` gives ``Stat.CHANNELS``.
``GroupStats`` bundles what one collection pass gathered for one linear group (the layers of a group share their
input).

Sums do not depend on how the calibration batches are split among ranks: each ``add_batch`` computes its batch's
product (or column sums) in float32, a computation that is the same whichever process runs that batch, and adds
it into a float64 total. Float64 sums of a few float32 terms are exact, or at worst off by far less than a float32
rounding step, so the float32 statistic read at the end is the same for any order of batches and any number of
ranks (``reduce`` sums the totals of a data-parallel group, in float64).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Reducer(Protocol):
    """What ``reduce`` needs of a data-parallel group (``engine.distributed.Group``)."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None: ...


def _flat_rows(x: torch.Tensor, width: int, device, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``[batch, seq, in]`` or ``[tokens, in]``) as fp32 ``[tokens, in]`` rows on ``device``, masked tokens
    dropped: the input rows both accumulators sum."""
    if x.shape[-1] != width:
        raise ValueError(f"input width {x.shape[-1]} != {width}")
    rows = x.reshape(-1, width).to(device=device, dtype=torch.float32)
    if mask is not None:
        rows = rows[mask.reshape(-1).to(rows.device)]
    return rows


def _samples(x: torch.Tensor) -> int:
    """The samples one ``add_batch`` counts: the batch dimension of a 3-D input, else one."""
    return x.shape[0] if x.ndim == 3 else 1


def _reduce_counts(group: Reducer, acc) -> None:
    counts = torch.tensor([acc.nsamples, acc.tokens], dtype=torch.int64)
    group.all_reduce(counts)
    acc.nsamples, acc.tokens = (int(v) for v in counts)


def _pair(acc, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
    """Check that paired inputs line up and keep ``acc.identical`` while every pair is bitwise equal."""
    if x.shape != x_tilde.shape:
        raise ValueError(f"paired inputs differ in shape: {tuple(x.shape)} vs {tuple(x_tilde.shape)}")
    acc.identical = acc.identical and bool(torch.equal(x, x_tilde))


def _reduce_identical(group: Reducer, acc) -> None:
    """``acc.identical`` only if it holds on every rank of ``group``."""
    flag = torch.tensor([int(acc.identical)], dtype=torch.int64)
    group.all_reduce(flag, op="min")
    acc.identical = bool(flag.item())


class _Finalised(RuntimeError):
    pass


def _check_open(total: torch.Tensor | None, what: str) -> None:
    if total is None:
        raise _Finalised(f"{what} was read already: its float64 total is released, so no batch can be added")


class HessianAccumulator:
    """Accumulates ``H = (2 / nsamples) * sum_t x_t x_t^T`` over calibration inputs of one linear layer.

    The scaling is the GPTQ reference's average over samples (sequences, not tokens); it does not change the
    solution, only keeps the numbers of a long calibration bounded. ``hessian`` is ``[in, in]`` float32. Only the
    upper triangle is accumulated (in bands of rows, about 2/3 of the work of a full product); reading ``hessian``
    mirrors it into the lower triangle, so the result is exactly symmetric. Each batch's product is computed in
    float32 and added into a float64 total (see the module docstring); the first read of ``hessian`` makes the
    float32 matrix and releases the total.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self._total: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self._h: torch.Tensor | None = None
        self.nsamples = 0
        self.tokens = 0
        # bands of about a quarter of the width, multiples of 64 columns (whole-matrix product below 256)
        band = -(-in_features // 4)
        self._band = in_features if in_features < 256 else -(-band // 64) * 64

    @property
    def device(self) -> torch.device:
        return (self._total if self._total is not None else self._h).device

    @property
    def hessian(self) -> torch.Tensor:
        if self._h is None:
            total = self._total
            if self._band < self.in_features:
                lower = torch.ones(self.in_features, self.in_features, dtype=torch.bool,
                                   device=total.device).tril_(-1)
                total[lower] = total.t()[lower]
            scale = 2.0 / self.nsamples if self.nsamples else 0.0
            self._h = total.mul_(scale).to(torch.float32)
            self._total = None
        return self._h

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the layer inputs ``x``: ``[batch, seq, in]`` (``batch`` samples) or ``[tokens, in]`` (one sample).

        For ``nn.Linear`` and gpt2 ``Conv1D`` the input is what the forward pre-hook sees. ``mask`` (``[batch, seq]``
        or ``[tokens]``, bool) drops padding tokens.
        """
        _check_open(self._total, "this Hessian")
        rows = _flat_rows(x, self.in_features, self._total.device, mask)
        self.nsamples += _samples(x)
        self.tokens += rows.shape[0]
        if self._band >= self.in_features:
            self._total += rows.t() @ rows
            return
        for start in range(0, self.in_features, self._band):
            end = min(start + self._band, self.in_features)
            self._total[start:end, start:] += rows[:, start:end].t() @ rows[:, start:]

    def reduce(self, group: Reducer) -> None:
        """Sum the totals and counts of every rank of ``group`` (before the first read)."""
        _check_open(self._total, "this Hessian")
        group.all_reduce(self._total)
        _reduce_counts(group, self)


class CrossAccumulator:
    """Accumulates ``C = (2 / nsamples) * sum_t x_t x~_t^T`` (``[in, in]``, float32) over paired inputs of one layer.

    ``x`` are the layer's inputs in the uncompressed model, ``x~`` its inputs in the partly compressed model on the
    same calibration tokens, paired token by token (same shapes, same order). The scaling is the average of
    ``HessianAccumulator``, so ``C`` and a Hessian accumulated over the same batches have the same scale.
    ``identical`` stays True while every pair was bitwise equal (then ``C`` equals ``X~^T X~`` up to rounding, and
    the asymmetric target is the layer's own weight: see ``fp_target_weight``). Summed in float64 like the Hessian.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self._total: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self._cross: torch.Tensor | None = None
        self.nsamples = 0
        self.tokens = 0
        self.identical = True

    @property
    def cross(self) -> torch.Tensor:
        if self._cross is None:
            scale = 2.0 / self.nsamples if self.nsamples else 0.0
            self._cross = self._total.mul_(scale).to(torch.float32)
            self._total = None
        return self._cross

    def add_batch(self, x: torch.Tensor, x_tilde: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add paired inputs ``x`` (uncompressed model) and ``x_tilde`` (compressed): ``[batch, seq, in]`` or
        ``[tokens, in]``, as ``HessianAccumulator.add_batch``; ``mask`` drops the same (padding) tokens of both."""
        _check_open(self._total, "this cross term")
        _pair(self, x, x_tilde)
        rows = _flat_rows(x, self.in_features, self._total.device, mask)
        rows_t = _flat_rows(x_tilde, self.in_features, self._total.device, mask)
        self.nsamples += _samples(x)
        self.tokens += rows.shape[0]
        self._total += rows.t() @ rows_t

    def reduce(self, group: Reducer) -> None:
        """Sum the totals and counts of every rank of ``group``; ``identical`` only if it holds on every rank."""
        _check_open(self._total, "this cross term")
        group.all_reduce(self._total)
        _reduce_counts(group, self)
        _reduce_identical(group, self)


class ChannelAccumulator:
    """Per input channel of one linear layer: running ``sum x`` (``sum``), ``sum x^2`` (``sq_sum``), ``sum |x|``
    (``abs_sum``), ``min`` and ``max`` over all calibration tokens (float32 results; the sums are kept in float64
    like the Hessian's), and the token count. Means are these sums over ``tokens``; ``sq_sum`` is ``||X_j||^2``, the
    column norm Wanda and OWL score with; the variance of a channel is ``sq_sum / tokens - (sum / tokens)^2``."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self._sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self._sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self._abs = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.min = torch.full((in_features,), float("inf"), dtype=torch.float32, device=device)
        self.max = torch.full((in_features,), float("-inf"), dtype=torch.float32, device=device)
        self.tokens = 0

    @property
    def sum(self) -> torch.Tensor:
        return self._sum.to(torch.float32)

    @property
    def sq_sum(self) -> torch.Tensor:
        return self._sq.to(torch.float32)

    @property
    def abs_sum(self) -> torch.Tensor:
        return self._abs.to(torch.float32)

    def add_batch(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[1] != self.in_features:
            raise ValueError(f"input width {rows.shape[1]} != {self.in_features}")
        rows = rows.to(device=self._sq.device, dtype=torch.float32)
        self._sum += rows.sum(dim=0)
        self._sq += rows.square().sum(dim=0)
        self._abs += rows.abs().sum(dim=0)
        if rows.shape[0]:
            self.min = torch.minimum(self.min, rows.amin(dim=0))
            self.max = torch.maximum(self.max, rows.amax(dim=0))
        self.tokens += rows.shape[0]

    def reduce(self, group: Reducer) -> None:
        """Sums, minima, maxima and the token count over every rank of ``group``."""
        group.all_reduce(self._sum)
        group.all_reduce(self._sq)
        group.all_reduce(self._abs)
        group.all_reduce(self.min, op="min")
        group.all_reduce(self.max, op="max")
        counts = torch.tensor([self.tokens], dtype=torch.int64)
        group.all_reduce(counts)
        self.tokens = int(counts.item())


class ProjectedCross:
    """One layer's share of ``Stat.FP_TARGET`` when the uncompressed layer's outputs are at hand: ``W C`` =
    ``(2 / nsamples) * sum_t y_t x~_t^T`` (``[out, in]``) and ``||W X||^2`` = ``(2 / nsamples) * sum_t ||y_t||^2``,
    with ``y_t = W x_t`` the uncompressed layer's output (bias removed) on the uncompressed input, paired token by
    token with the compressed model's input ``x~_t``.

    A layer solve reads the cross term and the reference Hessian only through these two products with its own
    uncompressed weight W, so it can take them instead: ``out * in`` multiply-adds per token, against ``in * in``
    for the cross term and about ``5/8 * in * in`` for the reference Hessian (a down projection: 576 x 1536 against
    2.6 x 1536 x 1536). Summed in float64 like the Hessian; ``identical`` as ``CrossAccumulator``'s.
    """

    def __init__(self, out_features: int, in_features: int, device: torch.device | str | None = None):
        self.out_features, self.in_features = out_features, in_features
        self._total = torch.zeros(out_features, in_features, dtype=torch.float64, device=device)
        self._norm = torch.zeros((), dtype=torch.float64, device=device)
        self.nsamples = 0
        self.tokens = 0
        self.identical = True

    def add_batch(self, y: torch.Tensor, x: torch.Tensor, x_tilde: torch.Tensor,
                  mask: torch.Tensor | None = None) -> None:
        """Add the uncompressed layer's outputs ``y`` (``[..., out]``, bias removed) with the inputs they came from
        ``x`` (only compared with ``x_tilde``) and the compressed model's inputs ``x_tilde`` (``[..., in]``)."""
        _pair(self, x, x_tilde)
        outputs = _flat_rows(y, self.out_features, self._total.device, mask)
        rows = _flat_rows(x_tilde, self.in_features, self._total.device, mask)
        self.nsamples += _samples(x_tilde)
        self.tokens += rows.shape[0]
        self._total += outputs.t() @ rows
        self._norm += outputs.square().sum()  # a float32 batch sum, added into float64 as the products are

    def _scale(self) -> float:
        return 2.0 / self.nsamples if self.nsamples else 0.0

    @property
    def weighted_cross(self) -> torch.Tensor:
        """``W C`` in float64."""
        return self._total * self._scale()

    @property
    def output_norm(self) -> float:
        return float(self._norm) * self._scale()

    def reduce(self, group: Reducer) -> None:
        group.all_reduce(self._total)
        group.all_reduce(self._norm)
        _reduce_counts(group, self)
        _reduce_identical(group, self)


class OutputNorm:
    """``||W X||^2`` = ``(2 / nsamples) * sum_t ||y_t||^2`` of one uncompressed layer on the uncompressed inputs,
    summed from its outputs ``y_t`` (bias removed) in the block copy: the only use a layer stage that records its
    asymmetric error has for the reference Hessian ``X^T X`` (``StageBase.fp_target_projected``), at ``out``
    instead of about ``5/8 * in * in`` multiply-adds per token. The copy may run through the layer in a later pass
    than the layer's own (the last fp_target pass runs it to the block's end), so the engine completes such layers'
    records then. The engine keeps one pass's sum, the first that ran the layer on every batch, and sets ``ready``.
    """

    def __init__(self, out_features: int, device: torch.device | str | None = None):
        self.out_features = out_features
        self._norm = torch.zeros((), dtype=torch.float64, device=device)
        self.nsamples = 0
        self.tokens = 0
        self.batches = 0
        self.ready = False

    def add_batch(self, y: torch.Tensor) -> None:
        """Add the layer's outputs ``y`` on one calibration batch (``[batch, seq, out]`` or ``[tokens, out]``, bias
        removed)."""
        if self.ready:
            raise _Finalised("this output norm is sealed: a second pass through the layer would count it twice")
        rows = _flat_rows(y, self.out_features, self._norm.device, None)
        self.nsamples += _samples(y)
        self.tokens += rows.shape[0]
        self.batches += 1
        self._norm += rows.square().sum()  # a float32 batch sum, added into float64 as the Hessian's products are

    def covers(self, batches: int) -> tuple[bool, bool]:
        """Whether this pass added each of this rank's ``batches`` calibration batches once, and whether it added
        any."""
        return self.batches == batches, self.batches > 0

    def reset(self) -> None:
        """Forget a pass that ran the layer on only some batches (or none): a later pass sums it again."""
        self._norm.zero_()
        self.nsamples = self.tokens = self.batches = 0

    @property
    def value(self) -> float:
        return float(self._norm) * (2.0 / self.nsamples if self.nsamples else 0.0)

    def reduce(self, group: Reducer) -> None:
        group.all_reduce(self._norm)
        _reduce_counts(group, self)


@dataclass
class DriftStats:
    """``Stat.FP_TARGET`` for one linear group: ``cross`` C = ``X^T X~`` and ``reference`` H = ``X^T X`` (X: the
    group's inputs in the uncompressed model, X~: in the model being compressed, paired token by token); or, when
    the engine had the uncompressed layers' outputs at hand and the stage reads no more than their products with
    each layer's own weight (``StageBase.fp_target_projected``), ``projected``: per layer (relative name) its
    ``ProjectedCross`` instead of the two matrices. A layer solve reads either form through ``correction``,
    ``weighted_cross`` and ``output_norm`` of its own layer's view (``for_layer``). Without ``reference`` (a stage
    that uses ``||W X||^2`` only for its record, ``StageBase.fp_target_projected``), ``norms`` holds each member's
    ``OutputNorm``, filled when the copy runs through the layer; ``output_norm`` is None until then."""

    cross: CrossAccumulator | None = None
    reference: HessianAccumulator | None = None
    projected: dict[str, ProjectedCross] = field(default_factory=dict)
    norms: dict[str, OutputNorm] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """Every pair of inputs was bitwise equal (e.g. block 0's first group): the uncompressed target is the
        layer's own weight."""
        if self.cross is not None:
            return self.cross.identical
        return all(p.identical for p in self.projected.values())

    def for_layer(self, name: str) -> DriftStats:
        """The view one layer's solve reads: its own projected terms, or the group's matrices."""
        if self.projected:
            return DriftStats(projected={name: self.projected[name]})
        if self.norms:
            return DriftStats(self.cross, self.reference, norms={name: self.norms[name]})
        return self

    def _own(self) -> ProjectedCross | None:
        if not self.projected:
            return None
        if len(self.projected) != 1:
            raise ValueError("a group's projected fp_target terms: read one layer's view (for_layer)")
        return next(iter(self.projected.values()))

    def correction(self, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """``W (C - H~)`` in float64 (``[out, in]``, on ``hessian``'s device): what asymmetric calibration adds to
        the layer's target (``methods.solver.fp_target_weight``); exactly 0 when the inputs did not drift."""
        w = weight.to(device=hessian.device, dtype=torch.float64)
        own = self._own()
        if own is not None:
            return own.weighted_cross.to(hessian.device) - w @ hessian.to(torch.float64)
        return w @ (self.cross.cross.to(hessian.device, torch.float64) - hessian.to(torch.float64))

    def weighted_cross(self, weight: torch.Tensor) -> torch.Tensor:
        """``W C`` in float32 (``[out, in]``, on ``weight``'s device)."""
        own = self._own()
        w = weight.float()
        if own is not None:
            return own.weighted_cross.to(w.device, torch.float32)
        return w @ self.cross.cross.to(w.device, torch.float32)

    def output_norm(self, weight: torch.Tensor) -> float | None:
        """``||W X||^2`` = ``tr(W H W^T)``: the uncompressed layer's output energy on the uncompressed inputs; None
        while it is to come from a later pass (no ``reference``, the layer's ``OutputNorm`` not yet filled)."""
        own = self._own()
        if own is not None:
            return own.output_norm
        if self.reference is None:
            if len(self.norms) > 1:
                raise ValueError("a group's output norms: read one layer's view (for_layer)")
            norm = next(iter(self.norms.values()), None)
            return norm.value if norm is not None and norm.ready else None
        w = weight.float()
        return float(((w @ self.reference.hessian.to(w.device, torch.float32)) * w).sum(dtype=torch.float64))

    def accumulators(self) -> list:
        # norms are not summed here: the engine reduces them once, after the pass that fills them
        return [a for a in (self.cross, self.reference) if a is not None] + list(self.projected.values())


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

    def for_layer(self, name: str) -> GroupStats:
        """What the solve of layer ``name`` (relative to its block) reads: the group's statistics, with the
        fp_target terms of that layer alone when they are per layer (``DriftStats.projected``)."""
        if self.fp_target is None or not (self.fp_target.projected or self.fp_target.norms):
            return self
        return dataclasses.replace(self, fp_target=self.fp_target.for_layer(name))

    def reduce(self, group: Reducer) -> None:
        """Every statistic summed (or min/max-ed) over the ranks of a data-parallel ``group``."""
        for source in (self.hessian_accumulator, self.channels,
                       *(self.fp_target.accumulators() if self.fp_target else ())):
            if source is not None:
                source.reduce(group)
