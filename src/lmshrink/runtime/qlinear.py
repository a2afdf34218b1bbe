"""QuantLinear: a Linear layer that executes its quantized codes (packed int4 / int8 CPU kernels, or dequantize).

Kernels (``tests/test_runtime.py`` and ``tests/test_cpu_kernel.py`` cover them):

* ``int4_avx2``: lmshrink's own AVX2 + FMA kernel (``cpu_kernels.py``, C++ in ``csrc/int4_avx2.cpp``, compiled on
  first use and cached; ``LMSHRINK_CPU_KERNEL=0`` turns it off, ``cpu_kernels.kernel_status()`` says why it is not
  used). Chosen first for 2/3/4-bit grids whose contiguous groups are a multiple of 32 columns (or one per row), any
  ``N`` and ``K``. It keeps the codes (32 per 16 bytes), a scale and a uint8 zero point per group: the scale in
  float16 where all of a layer's scales are exactly float16 values (the default ``scale_dtype: float16``; 4.75 bits
  per weight at group 32), else float32 (5.25 bits), and computes ``x @ ((q - zero) * scale).T`` in float32 with
  FMA: float32 activations in and out, no bf16 rounding, so it differs from ``F.linear`` on ``dequantized_weight()``
  (the grid's weight bit for bit) only in summation order. Chosen first where it fits: faster than ``int4`` for a
  few rows (docs/decisions.md).

The private ATen ops of torch 2.13, which lmshrink pins, where the AVX2 kernel is not available or does not fit:

* ``int4``: ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`` computes
  ``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + offset[g, n]`` for codes ``q`` in 0..15 packed by
  ``aten._convert_weight_to_int4pack_for_cpu``; ``scales_and_zeros`` is ``[K / group, N, 2]`` in the activation
  dtype (bfloat16 here). Our grids decode ``(q - zero) * scale``, so ``offset = (8 - zero) * scale``; codes of 2 and
  3 bits are codes in 0..15 too. The kernel needs ``N % 16 == 0`` and a group of 32, 64, 128 or 256 dividing K:
  a grid whose group does not divide K (SmolLM2's 576 columns with g128) runs with the group ``gcd(group, K)``
  and each scale repeated (exact), and per-channel grids likewise.
* ``int8``: ``torch._weight_int8pack_mm(x, q, scale)`` computes ``x @ (q * scale[:, None]).T`` for int8 ``q`` and
  one scale per output row: per-channel grids of up to 8 bits, with ``q = code - 2**(bits-1)``; an asymmetric zero
  adds ``sum(x) * (2**(bits-1) - zero) * scale`` per row.
* ``dequantize``: everything else (grouped 8-bit, act-order ``g_idx`` that is not contiguous, widths the kernels
  refuse) keeps the uint8 codes and decodes the weight for each call.

Off the CPU (CUDA) none of these kernels runs: every kind decodes its weight with torch operations on the layer's
device and uses ``F.linear`` (``cache_dense=True`` keeps the decoded weight). lmshrink ships no GPU kernel of its own
and this path has been checked on the meta device only (``tests/test_runtime.py``), not on a GPU.

The kernels pay off for few rows (decoding one token); for long prompts a dense matmul on the decoded weight is
faster, so ``forward`` switches on the number of rows (``kernel_max_rows``, by default the crossover of each kind
measured by ``bench/runtime_kernels.py``: 16 rows for ``int4_avx2``, 64 for torch's kernels).
The decoded weight is computed per call unless ``cache_dense=True`` (faster prefill, but it keeps a dense copy).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.grids import dequantize
from lmshrink.core.results import QuantResult
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.activations import prepare_input

INT4_GROUPS = (256, 128, 64, 32)
KERNEL_DTYPE = torch.bfloat16
# rows up to which each packed kernel beats decoding the weight + a dense matmul (bench/runtime_kernels.py measures
# the crossover; docs/decisions.md)
DEFAULT_KERNEL_MAX_ROWS = 64
AVX2_KERNEL_MAX_ROWS = 16
KERNEL_MAX_ROWS = {"int4_avx2": AVX2_KERNEL_MAX_ROWS, "int4": DEFAULT_KERNEL_MAX_ROWS, "int8": DEFAULT_KERNEL_MAX_ROWS,
                   "dequantize": DEFAULT_KERNEL_MAX_ROWS}


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def int4_group(in_features: int, group_width: int) -> int | None:
    """The group the int4 kernel runs a grid of ``group_width`` columns with (a divisor of both), or None."""
    for group in INT4_GROUPS:
        if in_features % group == 0 and group_width % group == 0:
            return group
    return None


def _unpack_int4pack_rows(flat: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Codes ``[n, k]`` from the kernel layout with ``block`` rows per full block (see ``unpack_int4pack``)."""
    blocks, half = n // block, block // 2
    main = flat[: blocks * k * half].reshape(blocks, k, half)
    rows = torch.stack([main & 15, main >> 4], dim=1).permute(0, 1, 3, 2).reshape(blocks * block, k)
    tail = n - blocks * block
    if tail:
        last = flat[blocks * k * half:].reshape(k, tail // 2)
        rows = torch.cat([rows, torch.stack([last & 15, last >> 4], dim=2).reshape(k, tail).t()], dim=0)
    return rows.contiguous()


@functools.lru_cache(maxsize=1)
def _int4pack_block_rows() -> int | None:
    """The rows per block of this machine's ``_convert_weight_to_int4pack_for_cpu`` (32 where torch's kernel uses
    AVX2, 64 with AVX-512), found once by packing a known matrix; None for a layout neither reads back."""
    n, k = 64, 16
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except (RuntimeError, AttributeError):
        return None
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k:
        return None
    for block in (32, 64):
        if torch.equal(_unpack_int4pack_rows(packed.reshape(-1), n, k, block), codes.to(torch.uint8)):
            return block
    return None


def unpack_int4pack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor | None:
    """Codes uint8 ``[N, K]`` from ``_convert_weight_to_int4pack_for_cpu``'s output, or None for other layouts.

    The layout (torch 2.13, read off the op): rows in blocks of B (32 where the kernel uses AVX2, 64 with AVX-512;
    probed once, ``_int4pack_block_rows``); within a block, byte ``k*B/2 + r`` holds row ``r`` in its low nibble and
    row ``r + B/2`` in its high one; the last ``T = N mod B`` rows store rows ``2i, 2i+1`` in byte ``k*T/2 + i``.
    Callers check the round trip once, so a different layout only costs the kernel's dequantized path.
    """
    n, k = out_features, in_features
    block = _int4pack_block_rows()
    if block is None or packed.dtype != torch.uint8 or packed.numel() * 2 != n * k or n % 16:
        return None
    return _unpack_int4pack_rows(packed.reshape(-1), n, k, block)


def _avx2_fits(result: QuantResult) -> bool:
    """Whether lmshrink's AVX2 kernel (cpu_kernels) takes this grid: groups of a multiple of 32 columns or per row."""
    in_features = result.codes.shape[1]
    width = result.spec.group_width(in_features)
    bpg = cpu_kernels.blocks_per_group(in_features, width)
    return bpg is not None and result.scale.shape[1] == -(-in_features // (bpg * cpu_kernels.BLOCK))


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` where ``W`` is held as quantized codes (see the module docstring for the kernels).

    Build it with ``QuantLinear.from_result(result, bias)``. ``kind`` says which kernel it runs: ``int4_avx2``,
    ``int4``, ``int8`` or ``dequantize``. Outputs are in the input's dtype. An online input transform and an
    activation quantizer (``runtime.activations``) apply to the input first when the layer has them.
    """

    input_spec = None
    input_transform = None

    def __init__(self, in_features: int, out_features: int, kind: str, *, bias: torch.Tensor | None = None,
                 kernel_max_rows: int | None = None, cache_dense: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.kernel_max_rows = KERNEL_MAX_ROWS.get(kind, DEFAULT_KERNEL_MAX_ROWS) if kernel_max_rows is None \
            else kernel_max_rows
        self.cache_dense = cache_dense
        self.group = 0
        self.bits = 0
        self._dense: torch.Tensor | None = None
        self._int4_codes_layout_known = False
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None = None, *, kernels: bool = True,
                    kernel_max_rows: int | None = None, cache_dense: bool = False) -> "QuantLinear":
        """A QuantLinear for ``result`` (codes, scale, zero, g_idx, spec); ``kernels=False`` forces ``dequantize``.

        ``kernel_max_rows``: calls with more rows decode the weight and use ``F.linear``; None takes the measured
        crossover of the chosen kind (``KERNEL_MAX_ROWS``).
        """
        out_features, in_features = (int(v) for v in result.codes.shape)
        spec = result.spec
        group_width = spec.group_width(in_features)
        kind = "dequantize"
        if kernels and result.contiguous_groups():
            group = int4_group(in_features, group_width)
            if spec.bits <= 4 and _avx2_fits(result) and cpu_kernels.available():
                kind = "int4_avx2"
            elif (spec.bits <= 4 and group is not None and out_features % 16 == 0
                    and _has_op("_weight_int4pack_mm_for_cpu")):
                kind = "int4"
            elif result.scale.shape[1] == 1 and in_features % 8 == 0 and _has_op("_weight_int8pack_mm"):
                # torch's CPU int8 kernel reads K in steps of 8: other widths give wrong rows (or a crash)
                kind = "int8"
        module = cls(in_features, out_features, kind, bias=bias, kernel_max_rows=kernel_max_rows,
                     cache_dense=cache_dense)
        module.bits = spec.bits
        getattr(module, f"_init_{kind}")(result)
        return module

    def _init_int4(self, result: QuantResult) -> None:
        group = int4_group(self.in_features, result.spec.group_width(self.in_features))
        # each stored group covers group_width // group kernel groups: repeat its parameters (exact)
        origin = torch.arange(self.in_features // group) * group // result.spec.group_width(self.in_features)
        scale = result.scale.float()[:, origin]
        # 2/3-bit codes move to the middle of 0..15 so that the bf16 offset (8 - zero) * scale stays small
        shift = 8 - (1 << (result.spec.bits - 1))
        offset = (8.0 - shift - result.zero.float()[:, origin]) * scale
        codes = (result.codes.to(torch.int32) + shift).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale.t(), offset.t()], dim=-1).to(KERNEL_DTYPE).contiguous())
        unpacked = unpack_int4pack(packed, self.out_features, self.in_features)
        self._int4_codes_layout_known = unpacked is not None and torch.equal(unpacked, codes.to(torch.uint8))
        if not self._int4_codes_layout_known:
            # an unknown kernel layout: keep our own copy of the codes for the dequantized path
            self.register_buffer("codes", codes.to(torch.uint8))

    def _init_int4_avx2(self, result: QuantResult) -> None:
        packed = cpu_kernels.pack(result.codes, result.scale, result.zero,
                                  result.spec.group_width(self.in_features))
        self.group = packed.blocks_per_group * cpu_kernels.BLOCK
        self._groups = packed.groups
        self._blocks_per_group = packed.blocks_per_group
        self.register_buffer("packed", packed.codes)
        self.register_buffer("group_scale", packed.scales)
        self.register_buffer("group_zero", packed.zeros)

    def _init_int8(self, result: QuantResult) -> None:
        half = 1 << (result.spec.bits - 1)
        scale = result.scale.float()[:, 0]
        self.register_buffer("qweight", (result.codes.to(torch.int16) - half).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        row_offset = (half - result.zero.float()[:, 0]) * scale.to(KERNEL_DTYPE).float()
        self.register_buffer("row_offset", None if bool((row_offset == 0).all()) else row_offset)

    def _init_dequantize(self, result: QuantResult) -> None:
        self.register_buffer("codes", result.codes.clone())
        self.register_buffer("scale", result.scale.float().clone())
        self.register_buffer("zero", result.zero.clone())
        self.register_buffer("g_idx", result.group_index().to(torch.int32).clone())

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.cuda()`` and the like: the kernel buffers (codes, scales, offsets) follow
        the device only and keep their dtype, which the kernels require; the bias follows as in ``nn.Linear``."""
        buffers = {name: buf for name, buf in self._buffers.items() if buf is not None and name != "bias"}
        for name in buffers:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in buffers.items():
                self._buffers[name] = buf.to(device=fn(buf[..., :0] if buf.dim() else buf).device)
        return self

    # -- execution ---------------------------------------------------------------------------------------------

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this module computes with, decoded to ``dtype`` ``[out, in]``."""
        if self.kind == "int4_avx2":
            bpg = self.group // cpu_kernels.BLOCK
            if self.packed.device.type == "cpu" and cpu_kernels.ready():
                weight = cpu_kernels.int4_dequantize(self.packed, self.group_scale, self.group_zero, self.in_features,
                                                     self._groups, bpg)
            else:
                weight = cpu_kernels.dequantize_packed(self.packed, self.group_scale, self.group_zero,
                                                       self.in_features, bpg)
            return weight.to(dtype)
        if self.kind == "int4":
            codes = self.codes if not self._int4_codes_layout_known else unpack_int4pack(
                self.packed, self.out_features, self.in_features)
            groups = self.in_features // self.group
            params = self.scales_and_zeros.float()  # [groups, N, 2]
            scale = params[..., 0].t().unsqueeze(-1)
            offset = params[..., 1].t().unsqueeze(-1)
            weight = (codes.view(self.out_features, groups, self.group).float() - 8.0) * scale + offset
            return weight.reshape(self.out_features, self.in_features).to(dtype)
        if self.kind == "int8":
            weight = self.qweight.float() * self.scale.float()[:, None]
            if self.row_offset is not None:
                weight += self.row_offset[:, None]
            return weight.to(dtype)
        return dequantize(self.codes, self.scale, self.zero, self.g_idx).to(dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4_avx2":
            bias = self.bias if self.bias is not None and self.bias.dtype == torch.float32 else None
            y = cpu_kernels.int4_linear(x.to(torch.float32), self.packed, self.group_scale, self.group_zero, bias,
                                        self._groups, self._blocks_per_group)
            if self.bias is not None and bias is None:
                y = y + self.bias.float()
            return y.to(x.dtype)
        xk = x.to(KERNEL_DTYPE).contiguous()  # the kernels read rows densely
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch._weight_int8pack_mm(xk, self.qweight, self.scale)
            if self.row_offset is not None:
                y = y.float() + x.float().sum(dim=-1, keepdim=True) * self.row_offset
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_spec is not None or self.input_transform is not None:
            x = prepare_input(self, x)
        if (self.kind == "int4_avx2" and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.numel() <= self.kernel_max_rows * self.in_features and x.shape[-1] == self.in_features
                and (self.bias is None or self.bias.dtype == torch.float32) and cpu_kernels.ready()):
            # the decode fast path: one call, [..., K] -> [..., N], bias added by the kernel
            return cpu_kernels.int4_linear(x, self.packed, self.group_scale, self.group_zero, self.bias,
                                           self._groups, self._blocks_per_group)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if (self.kind != "dequantize" and x2.device.type == "cpu" and x2.shape[0] <= self.kernel_max_rows
                and (self.kind != "int4_avx2" or cpu_kernels.ready())):
            y = self._kernel(x2)
            if self.bias is not None and self.kind != "int4_avx2":
                y = y + self.bias.to(y.dtype)
        else:
            weight = self._dense
            if weight is None or weight.dtype != x.dtype or weight.device != x.device:
                weight = self.dequantized_weight(x.dtype).to(x.device)
                if self.cache_dense:
                    self._dense = weight
            y = F.linear(x2, weight, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.kind in ("int4", "int4_avx2") else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"kind={self.kind}{group}, bias={self.bias is not None}, kernel_max_rows={self.kernel_max_rows}")


class OutlierLinear(nn.Module):
    """A ``QuantLinear`` whose grid leaves a few input columns at 0, plus those columns in 16 bits (OWQ):
    ``y = base(x) + x[..., columns] @ values.T``, a small dense matmul on the gathered columns beside the quantized
    one. ``base`` carries the bias and the kernel kind."""

    def __init__(self, base: QuantLinear, columns: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("columns", columns.detach().to(torch.int64).clone())
        self.register_buffer("values", values.detach().clone())

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None, **kwargs) -> "OutlierLinear":
        """From an ``OutlierQuantResult``: its grid as a QuantLinear (``kwargs`` as ``QuantLinear.from_result``)
        and its kept columns."""
        return cls(QuantLinear.from_result(result, bias, **kwargs), result.columns, result.values)

    @property
    def kind(self) -> str:
        return f"{self.base.kind}+columns"

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _apply(self, fn, recurse=True):
        """Device moves reach the buffers; dtype casts leave the 16-bit values as stored (see QuantLinear)."""
        values = self._buffers["values"]
        self._buffers["values"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["values"] = values.to(device=fn(values[..., :0]).device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = self.base.dequantized_weight(torch.float32)
        weight[:, self.columns] = self.values.float()
        return weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = x.index_select(-1, self.columns)
        return self.base(x) + F.linear(gathered, self.values.to(x.dtype))

    def extra_repr(self) -> str:
        return f"kept_columns={self.columns.numel()}, values={str(self.values.dtype).replace('torch.', '')}"


def packed_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a module holds (parameters and buffers, tied ones once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


__all__ = ["QuantLinear", "OutlierLinear", "unpack_int4pack", "int4_group", "packed_bytes", "DEFAULT_KERNEL_MAX_ROWS",
           "AVX2_KERNEL_MAX_ROWS", "KERNEL_MAX_ROWS", "INT4_GROUPS", "KERNEL_DTYPE"]
