"""Quantizers of activations (the inputs of linear layers) and of the key/value cache, shared by the methods that
calibrate them, the runtime that executes them and the evaluation that measures them.

Activations (``ActSpec``): integer grids of ``bits`` bits, one scale per tensor, per token (row) or per token and
group of ``group_size`` channels; ``dynamic`` (ranges measured on each input) or static (ranges calibrated once
and stored: per tensor, or per group of channels). Symmetric grids follow compressed-tensors: ``scale =
2 * max|x| / (2**bits - 1)``, codes ``clamp(round(x / scale), -2**(bits-1), 2**(bits-1) - 1)``; asymmetric grids
``scale = (max - min) / (2**bits - 1)``, integer ``zero = clamp(round(-min / scale), 0, 2**bits - 1)``, codes
``clamp(round(x / scale) + zero, 0, 2**bits - 1)`` (ranges always include 0). ``clip_ratio`` shrinks every range.
Rounding is to nearest, ties to even (``torch.round``).

Key/value cache (``KVSpec``, KIVI's layout): keys per channel over groups of ``group_size`` tokens, values per token
over groups of ``group_size`` channels, asymmetric ``x^ = q * s + m`` with ``s = (max - min) / (2**bits - 1)``
and ``m = min`` both rounded to float16 (what a cache stores), ``q = clamp(round((x - m) / s), 0, 2**bits - 1)``.
The most recent ``window`` positions stay unquantized: at a sequence length ``L`` the first
``kv_quantized_length(L)`` positions (whole groups of ``group_size`` tokens) are quantized, the rest are not. The
same rule serves a whole window of text at once (query ``t`` sees ``kv_quantized_length(t + 1)`` quantized
positions) and a decoder's cache, so both compute the same attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lmshrink.core.errors import LmshrinkError

GRANULARITIES = ("tensor", "token", "group", "cluster")
KV_BITS = (2, 4, 8)


@dataclass(frozen=True)
class ActSpec:
    """How a linear layer's input is quantized (see the module docstring)."""

    bits: int = 8
    granularity: str = "token"
    group_size: int = 128
    symmetric: bool = True
    dynamic: bool = True
    clip_ratio: float = 1.0
    clusters: int = 8

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LmshrinkError(f"activation bits={self.bits!r} is not supported", fix="use bits 2 to 8 (4 or 8)")
        if self.granularity not in GRANULARITIES:
            raise LmshrinkError(f"activation granularity {self.granularity!r} is not known",
                                fix=f"use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "token" and not self.dynamic:
            raise LmshrinkError("static activation scales per token do not exist (each token is new)",
                                fix="use granularity 'tensor' or 'group' for static scales, or dynamic: true")
        if self.granularity == "cluster" and (self.dynamic or self.clusters < 1):
            raise LmshrinkError("activation clusters (RPTQ) are calibrated ranges of groups of channels: they need "
                                "dynamic: false and clusters >= 1", fix="set dynamic: false, clusters: 8")
        if self.granularity == "group" and self.group_size < 1:
            raise LmshrinkError(f"activation group_size={self.group_size} must be positive",
                                fix="e.g. group_size: 128")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise LmshrinkError(f"activation clip_ratio={self.clip_ratio} must be in (0, 1]", fix="e.g. 1.0 or 0.9")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        kind = {"tensor": "per tensor", "token": "per token", "group": f"per group of {self.group_size}",
                "cluster": f"per cluster of channels ({self.clusters} clusters)"}
        return (f"int{self.bits} {kind[self.granularity]}, {'dynamic' if self.dynamic else 'static'}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}"
                + (f", clip {self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""))


def _grouped(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """``x [..., K]`` as ``[..., K / group_size, group_size]`` (group granularity; K must be a multiple)."""
    k = x.shape[-1]
    if k % spec.group_size:
        raise LmshrinkError(f"an input of {k} channels does not split into activation groups of {spec.group_size}",
                            fix="use a group_size that divides every targeted layer's input width")
    return x.unflatten(-1, (k // spec.group_size, spec.group_size))


def act_params(low: torch.Tensor, high: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` float32 for ranges ``[low, high]`` (any shape; ranges are widened to include 0 and shrunk by
    ``clip_ratio``). Symmetric grids have ``zero = 0`` (signed codes)."""
    low = torch.clamp(low.float(), max=0.0) * spec.clip_ratio
    high = torch.clamp(high.float(), min=0.0) * spec.clip_ratio
    if spec.symmetric:
        amax = torch.maximum(-low, high)
        scale = 2.0 * amax / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (high - low) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low / scale), 0, spec.qmax)
    return scale, zero


def code_range(spec: ActSpec) -> tuple[int, int]:
    """The smallest and largest code: signed for symmetric grids, unsigned for asymmetric ones."""
    if spec.symmetric:
        return -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    return 0, spec.qmax


def dynamic_params(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` measured on ``x`` for a dynamic spec, shaped to broadcast against ``x`` (per tensor:
    0-d; per token: ``[..., 1]``; per group: ``[..., K / g, 1]`` against the grouped view)."""
    xf = x.detach().float()
    if spec.granularity == "tensor":
        return act_params(xf.amin(), xf.amax(), spec)
    if spec.granularity == "token":
        return act_params(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), spec)
    grouped = _grouped(xf, spec)
    return act_params(grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True), spec)


def fake_quantize_activations(x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None,
                              zero: torch.Tensor | None = None, cluster: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded onto its grid and back, in ``x``'s dtype. Static specs take the stored ``scale`` (and ``zero``
    for asymmetric grids): per tensor a one-element tensor, per group one value per group of channels, per cluster
    one value per cluster with ``cluster`` naming each channel's cluster."""
    if spec.dynamic:
        scale, zero = dynamic_params(x, spec)
    elif scale is None:
        raise LmshrinkError("a static activation quantizer has no calibrated scale",
                            fix="calibrate it (the activations stage) or load the folder that stores it")
    else:
        scale = scale.float()
        zero = torch.zeros_like(scale) if zero is None else zero.float()
        if spec.granularity == "group":
            scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
        elif spec.granularity == "cluster":
            if cluster is None:
                raise LmshrinkError("a quantizer of channel clusters has no cluster index",
                                    fix="calibrate it (the activations stage) or load the folder that stores it")
            scale, zero = scale[cluster.long()], zero[cluster.long()]
        else:
            scale, zero = scale.reshape(()), zero.reshape(())
    low, high = code_range(spec)
    xf = x.float()
    view = _grouped(xf, spec) if spec.granularity == "group" else xf
    codes = torch.clamp(torch.round(view / scale) + zero, low, high)
    out = (codes - zero) * scale
    if spec.granularity == "group":
        out = out.flatten(-2)
    return out.to(x.dtype)


def static_params(low: torch.Tensor, high: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, zero)`` of a static spec from per-channel calibration ranges ``low``/``high`` ``[K]``: per
    tensor one value each (``[1]``), per group one per group of channels (``[K / group_size]``)."""
    if spec.dynamic:
        raise ValueError("a dynamic spec has no stored scale")
    if spec.granularity == "tensor":
        scale, zero = act_params(low.amin().reshape(1), high.amax().reshape(1), spec)
    elif spec.granularity == "cluster":
        raise ValueError("cluster granularity: use cluster_params")
    else:
        scale, zero = act_params(_grouped(low, spec).amin(-1), _grouped(high, spec).amax(-1), spec)
    return scale.contiguous(), zero.contiguous()


def cluster_channels(low: torch.Tensor, high: torch.Tensor, clusters: int, iterations: int = 50) -> torch.Tensor:
    """RPTQ's clustering: channels grouped by their calibration range, k-means on the points ``(min, max)`` (``[K]``
    each), started from the channels at evenly spaced quantiles of the range width (deterministic). Returns the
    cluster of each channel (int64 ``[K]``), clusters numbered by increasing width."""
    points = torch.stack([low.float(), high.float()], 1)
    k = min(clusters, points.shape[0])
    order = torch.argsort(high.float() - low.float())
    centres = points[order[torch.linspace(0, points.shape[0] - 1, k).round().long()]].clone()
    assign = torch.zeros(points.shape[0], dtype=torch.long)
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        moved = centres.clone()
        for c in range(k):
            members = points[assign == c]
            if members.numel():
                moved[c] = members.mean(0)
        if torch.equal(moved, centres):
            break
        centres = moved
    rank = torch.argsort(torch.argsort(centres[:, 1] - centres[:, 0]))  # by width
    return rank[assign].contiguous()


def cluster_params(low: torch.Tensor, high: torch.Tensor, cluster: torch.Tensor, spec: ActSpec
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, zero)`` per cluster (``[clusters]``) from per-channel ranges and their clusters."""
    count = int(cluster.max()) + 1
    lows = torch.stack([low[cluster == c].amin() if bool((cluster == c).any()) else torch.tensor(0.0)
                        for c in range(count)])
    highs = torch.stack([high[cluster == c].amax() if bool((cluster == c).any()) else torch.tensor(0.0)
                         for c in range(count)])
    scale, zero = act_params(lows, highs, spec)
    return scale.contiguous(), zero.contiguous()


# -- the key/value cache --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVSpec:
    """How the key/value cache is quantized (see the module docstring). ``rotate``: keys and queries are turned by
    a Hadamard transform per head after the rotary embedding (their dot products are unchanged), which spreads
    outlier channels before the keys are quantized."""

    bits: int = 8
    group_size: int = 32
    window: int = 32
    rotate: bool = False

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise LmshrinkError(f"kv-cache bits={self.bits!r} is not supported", fix="use 8, 4 or 2")
        if self.group_size < 1 or self.window < 0:
            raise LmshrinkError(f"kv-cache group_size={self.group_size}, window={self.window}: the group must be "
                                "positive and the window not negative", fix="e.g. group_size: 32, window: 32")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"int{self.bits} keys per channel (groups of {self.group_size} tokens), values per token (groups of "
                f"{self.group_size} channels), the last {self.window} positions unquantized"
                + (", Hadamard-rotated keys and queries" if self.rotate else ""))


def kv_quantized_length(length: int, spec: KVSpec) -> int:
    """How many of the first positions of a ``length``-long cache are quantized: whole groups older than the
    window."""
    return max(0, length - spec.window) // spec.group_size * spec.group_size


def _kv_round(low: torch.Tensor, high: torch.Tensor, spec: KVSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, minimum)`` as a cache stores them (float16 values, in float32)."""
    tiny = torch.finfo(torch.float16).tiny
    scale = ((high - low) / spec.qmax).clamp_min(tiny).to(torch.float16).float()
    return scale, low.to(torch.float16).float()


def kv_params_keys(k: torch.Tensor, spec: KVSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel and group of tokens: ``k [..., T, d]`` (T a multiple of the group) -> ``(scale, minimum)``
    ``[..., T / g, 1, d]``."""
    grouped = k.float().unflatten(-2, (k.shape[-2] // spec.group_size, spec.group_size))
    return _kv_round(grouped.amin(-2, keepdim=True), grouped.amax(-2, keepdim=True), spec)


def kv_params_values(v: torch.Tensor, spec: KVSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and group of channels: ``v [..., T, d]`` -> ``(scale, minimum)`` ``[..., T, d / g, 1]``."""
    group = min(spec.group_size, v.shape[-1])
    grouped = v.float().unflatten(-1, (v.shape[-1] // group, group))
    return _kv_round(grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True), spec)


def kv_codes(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """uint8 codes of ``x`` (already grouped like ``scale``)."""
    return torch.clamp(torch.round((x.float() - minimum) / scale), 0, spec.qmax).to(torch.uint8)


def check_kv_shape(head_dim: int, spec: KVSpec) -> None:
    group = min(spec.group_size, head_dim)
    if head_dim % group:
        raise LmshrinkError(f"head dimension {head_dim} does not split into value groups of {group} channels",
                            fix="use a kv-cache group_size that divides the head dimension")


def fake_quantize_keys(k: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """``k [..., T, d]`` (T a multiple of the group) rounded per channel and group of tokens, in ``k``'s dtype."""
    scale, minimum = kv_params_keys(k, spec)
    grouped = k.float().unflatten(-2, (k.shape[-2] // spec.group_size, spec.group_size))
    return (kv_codes(grouped, scale, minimum, spec).float() * scale + minimum).flatten(-3, -2).to(k.dtype)


def fake_quantize_values(v: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """``v [..., T, d]`` rounded per token and group of channels, in ``v``'s dtype."""
    scale, minimum = kv_params_values(v, spec)
    group = min(spec.group_size, v.shape[-1])
    grouped = v.float().unflatten(-1, (v.shape[-1] // group, group))
    return (kv_codes(grouped, scale, minimum, spec).float() * scale + minimum).flatten(-2).to(v.dtype)


__all__ = ["ActSpec", "KVSpec", "GRANULARITIES", "KV_BITS", "act_params", "code_range", "dynamic_params",
           "cluster_channels", "cluster_params",
           "fake_quantize_activations", "static_params", "kv_quantized_length", "kv_params_keys",
           "kv_params_values", "kv_codes", "fake_quantize_keys", "fake_quantize_values", "check_kv_shape"]
