"""Quantization grids and bit packing, shared by methods, formats and runtime."""

from lmshrink.quant.grids import (
    SUPPORTED_BITS, GridSpec, QuantResult, dequantize, fake_quantize, fit_grid, fit_groups, from_signed,
    group_index, quantize, to_signed,
)
from lmshrink.quant.packing import (
    pack_gptq_qweight, pack_gptq_qzeros, pack_int32, packed_size, unpack_gptq_qweight, unpack_gptq_qzeros,
    unpack_int32,
)

__all__ = [
    "SUPPORTED_BITS", "GridSpec", "QuantResult", "dequantize", "fake_quantize", "fit_grid", "fit_groups",
    "from_signed", "group_index", "quantize", "to_signed", "pack_gptq_qweight", "pack_gptq_qzeros", "pack_int32",
    "packed_size", "unpack_gptq_qweight", "unpack_gptq_qzeros", "unpack_int32",
]
