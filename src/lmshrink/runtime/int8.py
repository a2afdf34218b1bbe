"""Int8Linear: a W8A8 linear layer executed with integer products on CPU.

Weights: int8 codes per output channel, symmetric (``W = q * t``, one scale ``t`` per row); activations:
symmetric int8 per token (dynamic) or per tensor (static, the stored ``input_scale``), rounded exactly as
``core.actquant.fake_quantize_activations`` rounds them, so the layer computes what the fake-quantized model computes
up to the float rounding of the final products (the integer sums are exact; tests/test_int8.py).

Two kernels, chosen per call by the number of rows:

* long inputs (a prompt: more than ``onednn_min_rows`` rows): oneDNN's ``onednn::qlinear_pointwise`` on a prepacked
  weight, activations as unsigned codes + 128. On CPUs without VNNI oneDNN multiplies unsigned by signed bytes with
  16-bit pair sums that saturate unless every ``|q| <= 64`` (7-bit weights): the layer uses oneDNN only where that
  holds or the CPU has VNNI (``avx512_vnni`` / ``avx_vnni``), else it multiplies the decoded operands in float;
* short inputs (decoding a token): lmshrink's own AVX2 kernel (``cpu_kernels.i8_linear``: exact for any int8
  weights, faster for 7-bit ones). Where it is not built, the decoded operands are multiplied in float.

The activations are quantized by ``cpu_kernels.quantize_rows_u8`` (one pass); layers reading the same input
tensor one after the other (q, k, v; gate, up) quantize it once (``_SharedInput``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.actquant import ActSpec, fake_quantize_activations
from lmshrink.core.errors import LmshrinkError
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.activations import SCALE

# rows from which oneDNN's GEMM beats lmshrink's row kernel (bench/int8_kernels.py measures the crossover)
ONEDNN_MIN_ROWS = 32


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") and \
        torch.backends.mkldnn.is_available()


def fits(codes: torch.Tensor, spec: ActSpec | None) -> str | None:
    """Why an int8 layer cannot run as Int8Linear (None: it can): 8-bit symmetric per-channel weight codes
    (signed int8 ``[N, K]``) and 8-bit symmetric activations per token (dynamic) or per tensor (static)."""
    if spec is None:
        return "its activations are not quantized"
    if spec.bits != 8 or not spec.symmetric:
        return f"its activations are {spec.describe()}, not symmetric int8"
    if spec.granularity in ("group", "cluster") or (spec.granularity == "tensor" and spec.dynamic):
        return f"its activations are {spec.describe()}; Int8Linear takes per token (dynamic) or per tensor (static)"
    if codes.dtype != torch.int8:
        return "its weight codes are not int8"
    return None


class _SharedInput:
    """The quantized form of the last input tensor (kept alive here, so its identity cannot be reused)."""

    x: torch.Tensor | None = None
    version = -1
    key = None
    value: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def get(cls, x: torch.Tensor, key, compute):
        # inference tensors have no version counter: there the same object is taken as the same values (model code
        # does not change a layer's input in place between the layers that read it)
        version = None if x.is_inference() else x._version
        if cls.x is x and cls.version == version and cls.key == key:
            return cls.value
        cls.value = compute()
        cls.x, cls.version, cls.key = x, version, key
        return cls.value

    @classmethod
    def clear(cls) -> None:
        cls.x = cls.value = cls.key = None


class Int8Linear(nn.Module):
    """``y = x^ @ (q * t).T + b`` with int8 codes ``q`` and int8 activations ``x^`` (see the module docstring).

    Build it with ``Int8Linear.from_codes(codes, scale, bias, spec, input_scale)``. ``kernel`` says how long inputs
    run: ``onednn`` or ``float`` (decoded operands); ``row_kernel`` how short ones run: ``avx2`` or ``float``.
    """

    input_spec = None
    input_transform = None

    def __init__(self, in_features: int, out_features: int, spec: ActSpec, *, onednn_min_rows: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_spec = spec
        self.onednn_min_rows = ONEDNN_MIN_ROWS if onednn_min_rows is None else onednn_min_rows
        self.kernel = "float"
        self.row_kernel = "float"
        self.seven = False
        self._packed = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, spec: ActSpec,
                   input_scale: torch.Tensor | None = None, *, kernels: bool = True,
                   onednn_min_rows: int | None = None) -> "Int8Linear":
        """``codes`` signed int8 ``[N, K]``, ``scale`` ``[N]`` or ``[N, 1]`` float, ``spec`` the activation spec
        (static: with ``input_scale``)."""
        why = fits(codes, spec)
        if why is not None:
            raise LmshrinkError(f"this layer cannot run as Int8Linear: {why}",
                                fix="run it as QuantLinear (lmshrink.runtime.QuantLinear) or dense")
        if not spec.dynamic and input_scale is None:
            raise LmshrinkError("a static Int8Linear needs its input_scale", fix="pass the calibrated input scale")
        n, k = codes.shape
        module = cls(k, n, spec, onednn_min_rows=onednn_min_rows)
        module.register_buffer("codes", codes.contiguous().clone())
        module.register_buffer("weight_scale", scale.reshape(n).float().contiguous().clone())
        module.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if not spec.dynamic:
            module.register_buffer(SCALE, input_scale.reshape(1).float().clone())
        module.seven = bool(codes.numel() == 0 or int(codes.abs().max()) <= 64)
        if kernels and cpu_kernels.available():
            padded = module.codes  # the kernel reads rows of a multiple of 32 columns: padded only where needed
            if k % 32:
                padded = torch.zeros(n, -(-k // 32) * 32, dtype=torch.int8)
                padded[:, :k] = codes
            module.register_buffer("row_codes", padded, persistent=False)
            module.register_buffer("row_sums", codes.to(torch.int32).sum(1).to(torch.int32), persistent=False)
            module.row_kernel = "avx2"
        if kernels and onednn_available() and (module.seven or has_vnni()):
            module._packed = torch.ops.onednn.qlinear_prepack(module.codes, None)
            module.kernel = "onednn"
        return module

    # -- the reference ------------------------------------------------------------------------------------------

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * self.weight_scale[:, None]).to(dtype)

    def _float(self, x2: torch.Tensor) -> torch.Tensor:
        """The decoded operands multiplied in float: the definition the kernels compute (``x2`` is already
        transformed)."""
        x2 = fake_quantize_activations(x2.float(), self.input_spec, getattr(self, SCALE, None))
        return F.linear(x2, self.dequantized_weight(), self.bias)

    # -- execution ------------------------------------------------------------------------------------------------

    def _quantize(self, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and scales of ``x2`` (``x`` as rows); ``x``, the tensor the caller passed, identifies the input
        that sibling layers share."""
        spec = self.input_spec
        static = 0.0 if spec.dynamic else float(getattr(self, SCALE))
        key = (static, spec.clip_ratio)
        return _SharedInput.get(x, key, lambda: cpu_kernels.quantize_rows_u8(x2, static, spec.clip_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.input_transform is not None:
            x = x2 = self.input_transform(x2)  # a new tensor: not shared with other layers
        if x2.dtype != torch.float32 or x2.device.type != "cpu" or not cpu_kernels.ready() \
                or (self.kernel == "float" and self.row_kernel == "float"):
            y = self._float(x2)
        elif x2.shape[0] >= self.onednn_min_rows and self.kernel == "onednn":
            codes, scales = self._quantize(x, x2)
            y = self._onednn(codes[:, : self.in_features], scales)
        elif self.row_kernel == "avx2":
            codes, scales = self._quantize(x, x2)
            y = cpu_kernels.i8_linear(codes, scales, self.row_codes, self.weight_scale, self.row_sums, self.bias,
                                      self.seven)
        else:
            y = self._float(x2)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _onednn(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        static = not self.input_spec.dynamic
        zeros = _zeros(self.out_features)
        codes = codes.contiguous() if not codes.is_contiguous() else codes
        if static:
            return torch.ops.onednn.qlinear_pointwise(codes, float(scales[0]), 128, self._packed, self.weight_scale,
                                                      zeros, self.bias, 1.0, 0, torch.float32, "none", [], "")
        y = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, self._packed, self.weight_scale, zeros, None, 1.0, 0,
                                               torch.float32, "none", [], "")
        y.mul_(scales[:, None])
        if self.bias is not None:
            y.add_(self.bias)
        return y

    def nbytes(self) -> int:
        """Bytes the layer holds: its buffers (shared storage once) and oneDNN's packed copy of the weight."""
        seen, total = set(), 0
        for tensor in self.buffers():
            key = (tensor.untyped_storage().data_ptr(), tensor.numel())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
        if self._packed is not None:
            total += self._packed.numel() * self._packed.element_size()
        return total

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, activations="
                f"{self.input_spec.describe()}, kernel={self.kernel}, row_kernel={self.row_kernel}, "
                f"seven_bit_weights={self.seven}, onednn_min_rows={self.onednn_min_rows}")


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


__all__ = ["Int8Linear", "fits", "has_vnni", "onednn_available", "ONEDNN_MIN_ROWS"]
