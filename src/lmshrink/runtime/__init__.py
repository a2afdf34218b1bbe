"""Modules that execute compressed weights for real: packed int4/int8 Linear layers on CPU."""

from .fastpath import FastDecoder
from .packed import load_packed, replace_linears
from .qlinear import DEFAULT_KERNEL_MAX_ROWS, QuantLinear, packed_bytes, unpack_int4pack

__all__ = ["FastDecoder", "QuantLinear", "load_packed", "replace_linears", "packed_bytes", "unpack_int4pack",
           "DEFAULT_KERNEL_MAX_ROWS"]
