"""lmshrink's own CPU kernels (AVX2 + FMA), compiled on first use: 4-bit grouped weights with float32 (or int8)
activations, and W8A8 integer products (``quantize_rows_u8``, ``i8_linear``: ``csrc/int8_avx2.cpp``, used by
``runtime.int8.Int8Linear``).

``int4_linear(x, packed)`` computes ``x @ W.T`` in float32 for ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``,
codes ``q`` in 0..15 (2, 3 and 4-bit grids), contiguous groups of any multiple of 32 columns (or one group per row),
any ``K`` and ``N``, group scales in float16 (where exact) or float32. The C++ source is ``csrc/int4_avx2.cpp``
(layout and method described there): codes are widened and converted to float in registers, multiplied with float32
activations by FMA, each group's sum scaled once, and the zero points applied through per-group activation sums. No
activation rounding: it differs from a float32 matmul on the dequantized weight only in summation order
(``tests/test_cpu_kernel.py`` checks it against a float64 reference within the float32 summation bound). ``int4_linear_q8`` is the opt-in variant that rounds the activations
to int8 per block of 32 (llama.cpp's q8_0) and multiplies with integers; ``q8_linear`` runs a q8_0 weight.

Both sources are built as one extension with ``torch.utils.cpp_extension.load`` (needs ``ninja`` and a C++ compiler)
with ``-O3 -mavx2 -mfma -mf16c``, only when ``/proc/cpuinfo`` lists avx2 and fma, into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; a lock left by a killed build is cleared,
``runtime/extension.py``): the first build takes about a minute, later processes load it in well
under a second. ``LMSHRINK_CPU_KERNEL=0`` disables it. When it is disabled or cannot be built, ``available()`` is
False, ``kernel_status()`` says why, and QuantLinear uses torch's int4 kernel instead; nothing raises.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lmshrink.runtime.extension import load_extension

ENV_VAR = "LMSHRINK_CPU_KERNEL"
BLOCK = 32  # columns per packed block (16 bytes of codes)
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]
_SOURCE = Path(__file__).with_name("csrc") / "int4_avx2.cpp"
_SOURCES = [_SOURCE, Path(__file__).with_name("csrc") / "int8_avx2.cpp"]

_lock = threading.Lock()
_module = None
_status: str | None = None  # None: not tried yet


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _disabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off")


def _build() -> None:
    global _module, _status
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        _status = f"not built: the CPU (/proc/cpuinfo flags) lacks {', '.join(sorted(missing))}"
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _module = load_extension("lmshrink_cpu_kernels", [str(p) for p in _SOURCES], CFLAGS)
        _status = "ready"
    except Exception as exc:  # no compiler, no ninja, build error: record it and use torch's kernels
        text = " ".join(str(exc).split())
        _status = f"not built: {type(exc).__name__}: {text[:500]}"


def available() -> bool:
    """Whether the kernel can run here (builds or loads it on the first call; False when disabled)."""
    if _disabled():
        return False
    if _status is None:
        with _lock:
            if _status is None:
                _build()
    return _module is not None


def ready() -> bool:
    """Whether the compiled kernel is loaded in this process (building it if not tried yet), whatever the env var.

    QuantLinear reads ``LMSHRINK_CPU_KERNEL`` when it builds a layer (``available()``); a layer built for this kernel
    checks ``ready()`` per call and decodes its weight instead where the kernel cannot be loaded (e.g. unpickled on
    another machine).
    """
    if _status is None and _module is None:
        with _lock:
            if _status is None:
                _build()
    return _module is not None


def kernel_status() -> str:
    """Why the kernel is or is not used: 'ready', 'disabled by LMSHRINK_CPU_KERNEL=0', 'not built: ...'."""
    if _disabled():
        return f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    available()
    return _status or "not tried"


@dataclass
class PackedInt4:
    """Weights in the kernel's layout: codes int16 ``[N, ceil(K/32)*8]``, scales ``[N, G]`` (float16 where every
    scale is exactly a float16, as with the default ``scale_dtype: float16``; float32 otherwise), zeros uint8
    ``[N, G]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    in_features: int
    groups: int
    blocks_per_group: int


def blocks_per_group(in_features: int, group_width: int) -> int | None:
    """Blocks of 32 columns per group for the kernel, or None where groups do not fall on block boundaries."""
    if group_width >= in_features:
        return -(-in_features // BLOCK)
    if group_width % BLOCK == 0:
        return group_width // BLOCK
    return None


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (0..15) -> int16 ``[N, B*8]``: word l of block b holds column 32b + 8i + l at bits 4i."""
    n, k = codes.shape
    blocks = -(-k // BLOCK)
    padded = torch.zeros(n, blocks * BLOCK, dtype=torch.int32)
    padded[:, :k] = codes.to(torch.int32)
    parts = padded.view(n, blocks, 4, 8)  # [n, b, i, l]
    words = parts[:, :, 0] | (parts[:, :, 1] << 4) | (parts[:, :, 2] << 8) | (parts[:, :, 3] << 12)
    return (words - ((words >> 15) << 16)).to(torch.int16).reshape(n, blocks * 8).contiguous()


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 codes ``[N, in_features]``."""
    n = packed.shape[0]
    words = packed.to(torch.int32).view(n, -1, 1, 8) & 0xFFFF
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=packed.device).view(1, 1, 4, 1)
    codes = (words >> shifts) & 15  # [n, b, i, l]
    return codes.reshape(n, -1)[:, :in_features].to(torch.uint8).contiguous()


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_width: int) -> PackedInt4:
    """The kernel's layout for contiguous groups of ``group_width`` columns (see ``blocks_per_group``)."""
    n, k = codes.shape
    bpg = blocks_per_group(k, group_width)
    if bpg is None:
        raise ValueError(f"group width {group_width} is not a multiple of {BLOCK} (in_features {k})")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes above 15 do not fit the 4-bit kernel")
    groups = scale.shape[1]
    if groups != -(-k // (bpg * BLOCK)):
        raise ValueError(f"{groups} groups of scales for {k} columns in groups of {bpg * BLOCK}")
    scales = scale.to(torch.float32).contiguous().clone()
    half = scales.to(torch.float16)
    if bool(torch.isfinite(half).all()) and torch.equal(half.to(torch.float32), scales):
        scales = half  # exactly representable (e.g. the default scale_dtype float16): 2 bytes per group, same values
    zeros = zero.to(torch.uint8).contiguous().clone()
    return PackedInt4(pack_codes(codes), scales, zeros, k, groups, bpg)


def dequantize_packed(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                      bpg: int) -> torch.Tensor:
    """float32 ``[N, K]`` ``(q - zero) * scale``, exactly as ``lmshrink.core.grids.dequantize`` computes it (torch
    operations only: any device)."""
    q = unpack_codes(codes, in_features).float()
    origin = torch.arange(in_features, device=codes.device) // (bpg * BLOCK)
    return (q - zeros.float()[:, origin]) * scales.float()[:, origin]


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, groups: int, bpg: int) -> torch.Tensor:
    """float32 ``x [..., K] @ W.T (+ bias)`` -> ``[..., N]`` through the compiled kernel (built on first use)."""
    if not ready():
        raise RuntimeError(f"the AVX2 int4 kernel is not available: {kernel_status()}")
    return _module.int4_linear(x, codes, scales, zeros, _EMPTY if bias is None else bias, groups, bpg)


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int, groups: int,
                    bpg: int) -> torch.Tensor:
    """float32 ``[N, K]`` weight through the compiled kernel: the same values as ``dequantize_packed``, faster."""
    if not ready():
        raise RuntimeError(f"the AVX2 int4 kernel is not available: {kernel_status()}")
    return _module.int4_dequantize(codes, scales, zeros, in_features, groups, bpg)


def int4_linear_q8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None, groups: int, bpg: int) -> torch.Tensor:
    """``int4_linear`` with ``x`` rounded to int8 per block of 32 columns first (llama.cpp's q8_0 activations).

    Each block of a row becomes ``d * xq`` with ``d = max|x| / 127`` and ``xq = round(x / d)`` (to nearest even);
    the result is ``x^ @ W.T (+ bias)`` for that rounded ``x^``, up to float32 summation order
    (``quantize_activations_q8`` computes ``x^``). Integer products (AVX2 ``maddubs``) instead of float ones.
    """
    if not ready():
        raise RuntimeError(f"the AVX2 int4 kernel is not available: {kernel_status()}")
    return _module.int4_linear_q8(x, codes, scales, zeros, _EMPTY if bias is None else bias, groups, bpg)


def _q8_blocks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t [..., K]`` zero-padded to blocks of 32 columns ``[..., B, 32]``, with each block's ``max|t|`` and
    ``127 / max|t|`` (0 for an all-zero block), ``[..., B, 1]``: the q8_0 rounding's pieces."""
    k = t.shape[-1]
    blocks = -(-k // BLOCK)
    padded = torch.zeros(*t.shape[:-1], blocks * BLOCK, dtype=torch.float32)
    padded[..., :k] = t.detach().float()
    view = padded.view(*t.shape[:-1], blocks, BLOCK)
    amax = view.abs().amax(dim=-1, keepdim=True)
    return view, amax, torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """The float32 ``x^`` that ``int4_linear_q8`` multiplies with: each block of 32 columns of each row rounded to
    ``d * round(x / d)``, ``d = max|x| / 127`` (a reference for tests and error estimates)."""
    view, amax, inverse = _q8_blocks(x)
    rounded = torch.round(view * inverse) * (amax / 127.0)
    return rounded.flatten(-2)[..., :x.shape[-1]]


def quantize_q8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[N, K]`` as q8_0 blocks for ``q8_linear``: int8 codes ``[N, B*32]`` (zero past K) and float32 scales
    ``[N, B]``, ``d = max|w| / 127`` per row and block of 32 columns, codes ``round(w / d)``."""
    view, amax, inverse = _q8_blocks(weight)
    codes = torch.round(view * inverse).to(torch.int8).flatten(-2).contiguous()
    return codes, (amax[..., 0] / 127.0).contiguous()


def q8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``x^ @ W^.T`` for q8_0 weight blocks (``quantize_q8_rows``) and ``x`` rounded to int8 per block of 32
    as ``quantize_activations_q8`` computes it: llama.cpp's q8_0 x q8_0 product, 1.125 bytes per weight."""
    if not ready():
        raise RuntimeError(f"the AVX2 int4 kernel is not available: {kernel_status()}")
    return _module.q8_linear(x, codes, scales)


def quantize_rows_u8(x: torch.Tensor, static_scale: float = 0.0, clip_ratio: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 activation codes of float32 ``x [..., K]`` plus 128 (uint8 ``[M, ceil(K/32)*32]``, padding
    128) and their scales ``[M]``: one per row measured on it (``static_scale`` 0), or ``static_scale`` for every row;
    exactly ``core.actquant.fake_quantize_activations``' rounding (see ``csrc/int8_avx2.cpp``)."""
    if not ready():
        raise RuntimeError(f"the AVX2 kernel is not available: {kernel_status()}")
    codes, scales = _module.quantize_rows_u8(x, float(static_scale), float(clip_ratio))
    return codes, scales


def i8_linear(codes: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              weight_sums: torch.Tensor, bias: torch.Tensor | None, seven: bool) -> torch.Tensor:
    """float32 ``[M, N]``: int8 activation codes (``quantize_rows_u8``) times int8 weight codes ``[N, Kp]`` (zero past
    K, row sums ``weight_sums``), scaled per row of each; integer sums (``seven``: every ``|weight| <= 64``)."""
    if not ready():
        raise RuntimeError(f"the AVX2 kernel is not available: {kernel_status()}")
    return _module.i8_linear(codes, scales, weight, weight_scale, weight_sums, _EMPTY if bias is None else bias,
                             bool(seven))


_EMPTY = torch.empty(0)

__all__ = ["available", "ready", "kernel_status", "pack", "pack_codes", "unpack_codes", "dequantize_packed",
           "int4_linear", "int4_linear_q8", "quantize_activations_q8", "quantize_q8_rows", "q8_linear",
           "int4_dequantize", "blocks_per_group", "PackedInt4", "ENV_VAR", "quantize_rows_u8", "i8_linear"]
