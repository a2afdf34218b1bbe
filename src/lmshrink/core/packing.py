"""Pack unsigned integer codes of 1..8 bits into int32 words, and back.

Layout: a dense little-endian bit stream along the packed dimension. Element ``i`` occupies bits
``i*bits .. i*bits + bits - 1`` of the stream; word ``k`` holds stream bits ``32k .. 32k+31`` (bit 0 = least
significant). Codes never leave gaps, so with 3 bits an element may straddle two words; the stream is zero-padded
to whole words (``ceil(n * bits / 32)`` words).

This is bit-for-bit the compressed-tensors ``pack-quantized`` layout (``pack_to_int32`` of the signed value
``code - 2**(bits-1)``, which adds that offset back before packing): ``weight_packed`` is
``pack_int32(codes, bits, dim=1)`` and an asymmetric ``weight_zero_point`` is ``pack_int32(zero, bits, dim=0)``.
It is also the GPTQ v1 layout (AutoGPTQ / GPTQModel ``qweight`` and ``qzeros``, including their 3-bit scheme),
see ``pack_gptq_qweight`` / ``pack_gptq_qzeros``.
"""

from __future__ import annotations

import torch


def _bit_positions(bits: int, device):
    pos = torch.arange(32, dtype=torch.int64, device=device) * bits
    return pos // 32, pos % 32


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack a 2-D tensor of unsigned codes (values ``0 .. 2**bits - 1``, any integer dtype) along ``dim``.

    Returns int32 with ``packed_size(codes.shape[dim], bits)`` entries along ``dim``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if codes.ndim != 2 or dim not in (0, 1):
        raise ValueError("pack_int32 packs 2-D tensors along dim 0 or 1")
    values = codes.to(torch.int64) & ((1 << bits) - 1)
    if dim == 0:
        values = values.t()
    rows, cols = values.shape
    n_chunks = -(-cols // 32)
    # 32 codes of b bits fill exactly b words: pack chunk by chunk
    values = torch.nn.functional.pad(values, (0, n_chunks * 32 - cols)).reshape(rows, n_chunks, 32)
    word, offset = _bit_positions(bits, values.device)
    shifted = values << offset
    words = torch.zeros(rows, n_chunks, bits, dtype=torch.int64, device=values.device)
    index = word.expand(rows, n_chunks, 32)
    words.scatter_add_(2, index, shifted & 0xFFFFFFFF)
    # bits past the word end spill into the next word (only ever for the non-last element of a chunk)
    spill = shifted >> 32
    words.scatter_add_(2, (word + 1).clamp(max=bits - 1).expand(rows, n_chunks, 32), spill)
    words = words.reshape(rows, n_chunks * bits)[:, : packed_size(cols, bits)]
    # reinterpret the unsigned 32-bit values as two's-complement int32
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
    return (words.t() if dim == 0 else words).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of ``pack_int32``: the ``n`` codes along ``dim`` as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if packed.dtype != torch.int32 or packed.ndim != 2 or dim not in (0, 1):
        raise ValueError("unpack_int32 expects a 2-D int32 tensor packed along dim 0 or 1")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        words = words.t()
    rows, n_words = words.shape
    if n_words != packed_size(n, bits):
        raise ValueError(f"{n_words} words cannot hold exactly {n} codes of {bits} bits")
    n_chunks = -(-n // 32)
    words = torch.nn.functional.pad(words, (0, n_chunks * bits - n_words)).reshape(rows, n_chunks, bits)
    word, offset = _bit_positions(bits, words.device)
    low = torch.gather(words, 2, word.expand(rows, n_chunks, 32)) >> offset
    high = torch.gather(words, 2, (word + 1).clamp(max=bits - 1).expand(rows, n_chunks, 32)) << (32 - offset)
    straddles = (offset + bits > 32).expand(rows, n_chunks, 32)
    values = torch.where(straddles, low | high, low) & ((1 << bits) - 1)
    values = values.reshape(rows, n_chunks * 32)[:, :n].to(torch.uint8)
    return (values.t() if dim == 0 else values).contiguous()


def pack_gptq_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 ``qweight``: codes ``[out, in]`` -> int32 ``[in * bits / 32, out]`` packed along the input rows.

    GPTQ kernels need ``in * bits`` to be a multiple of 32; otherwise the last word is zero-padded.
    """
    return pack_int32(codes.t(), bits, dim=0)


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_gptq_qweight``: uint8 codes ``[out, in]``."""
    return unpack_int32(qweight, bits, in_features, dim=0).t().contiguous()


def pack_gptq_qzeros(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 ``qzeros``: zero points ``[out, n_groups]`` -> int32 ``[n_groups, out * bits / 32]``.

    v1 stores ``zero - 1`` (packed along the output columns); readers add 1 back. A zero point of 0 (possible for
    asymmetric grids of all-positive groups) is stored as ``2**bits - 1`` and a v1 reader decodes it as ``2**bits``,
    which is wrong: check ``zero.min() >= 1`` or use a symmetric grid before writing v1.
    """
    return pack_int32((zero.t().to(torch.int64) - 1) & ((1 << bits) - 1), bits, dim=1)


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of ``pack_gptq_qzeros`` (modulo 2**bits, so zero 0 round-trips): uint8 ``[out, n_groups]``."""
    stored = unpack_int32(qzeros, bits, out_features, dim=1).to(torch.int64)
    return ((stored + 1) & ((1 << bits) - 1)).t().to(torch.uint8).contiguous()
