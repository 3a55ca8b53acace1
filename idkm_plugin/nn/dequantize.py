"""Dense weight from packed codes + LUT, by table lookups of whole multi-code symbols.

A *symbol* is `u` consecutive codes (u * bits bits, u dividing 8, so symbols never straddle a
group of 8 codes). A table with one row per symbol value holds the u dequantized d-vectors that
value encodes, so one row copy decodes u codes at once and no code is unpacked on its own:
bits 1, 2, 4 read the symbols straight from the bytes, 8 from little-endian byte pairs (uint16), and
3, 5, 6, 7 from overlapping 4- or 8-byte little-endian windows, one per group of 8 codes (`bits` bytes).
Rows are copied as raw bytes (one int64 / complex128 element where they fit), so the result is
bit-exact. Widths above 8, and LUT groups that do not start on a symbol, unpack the codes and
gather LUT rows instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .packing import unpack_codes

__all__ = ["apply_packed_mask", "codes_per_symbol", "dequantize_packed"]

# Bytes of one table row -> the widest scalar dtype that copies it in one element (bit patterns kept).
_RAW_DTYPES = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_MAX_ROW_BYTES = 32  # larger rows copy slower than decoding fewer codes per symbol
_MAX_TABLE_BYTES = 512 * 1024  # building the table is part of every cold decode: keep it cheap


def codes_per_symbol(bits: int, dim: int, element_size: int) -> int:
    """u: the codes one table lookup decodes (1 means: no table, gather LUT rows)."""
    if bits > 8:
        return 1
    for u in (8, 4, 2):
        row = u * dim * element_size
        if u * bits <= 16 and row <= _MAX_ROW_BYTES and (1 << (u * bits)) * row <= _MAX_TABLE_BYTES:
            return u
    return 1


def dequantize_packed(packed: torch.Tensor, bits: int, count: int, lut: torch.Tensor,
                      dtype: torch.dtype, shape: Sequence[int] = (-1,)) -> torch.Tensor:
    """packed uint8 [packed_nbytes(count, bits)], lut [groups, 2**bits, d] -> dense weight of `shape`
    (count * d values) in `dtype`.

    Codes are laid out group by group (count / groups codes each), as `pack_codes` packed them.
    Differentiable w.r.t. a LUT that requires grad (it then gathers LUT rows: raw copies have no gradient).
    """
    groups, _, d = lut.shape
    lut = lut.to(dtype)
    u = codes_per_symbol(bits, d, lut.element_size())
    trains_lut = lut.requires_grad and torch.is_grad_enabled()
    if u > 1 and (count // groups) % u == 0 and not trains_lut:
        return _symbol_table_lookup(packed, bits, count, lut, u).view(shape)
    codes = unpack_codes(packed, bits, count).view(groups, -1)
    return _gather_rows(codes, lut).view(shape)


def apply_packed_mask(weight: torch.Tensor, packed_mask: torch.Tensor, count: int) -> torch.Tensor:
    """weight (count * d values, any shape), packed 1-bit mask uint8 [packed_nbytes(count, 1)] (1 = kept)
    -> the weight with every pruned d-vector exactly 0 (same shape and dtype)."""
    keep = unpack_codes(packed_mask, 1, count).bool()
    return weight.reshape(count, -1).masked_fill(~keep.unsqueeze(1), 0).view(weight.shape)


def _gather_rows(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """codes [groups, m] int, lut [groups, k, d] -> [groups * m * d]."""
    groups, k, d = lut.shape
    if groups > 1:
        codes = codes + torch.arange(groups, device=codes.device).unsqueeze(1) * k
    rows = lut.reshape(groups * k, d)
    return (rows.view(-1) if d == 1 else rows).index_select(0, codes.reshape(-1)).reshape(-1)


def symbol_table(lut: torch.Tensor, bits: int, u: int) -> torch.Tensor:
    """lut [groups, 2**bits, d] -> [groups, 2**(u*bits), u * d]: row s = the u vectors symbol s encodes."""
    symbols = torch.arange(1 << (u * bits), device=lut.device).unsqueeze(1)
    shifts = torch.arange(u, device=lut.device) * bits
    codes = (symbols >> shifts) & ((1 << bits) - 1)  # [S, u], little-endian: first code in the low bits
    return lut[:, codes].reshape(lut.shape[0], codes.shape[0], -1)


def read_symbols(packed: torch.Tensor, bits: int, count: int, u: int) -> torch.Tensor:
    """uint8 [packed_nbytes(count, bits)] -> symbol values [ceil(count / u)] (int32 or int64)."""
    n_symbols = -(-count // u)
    width = u * bits
    if width == 8:
        return packed.to(torch.int32)
    if width == 16:
        pairs = _pad_to(packed, 2 * n_symbols)
        if packed.device.type == "cpu":
            return pairs.view(torch.uint16).to(torch.int32)
        return pairs.view(torch.int16).to(torch.int32) & 0xFFFF  # uint16 casts are CPU-only in some builds
    n_groups = -(-count // 8)  # 8 codes = `bits` bytes (bits <= 8): read each group as one integer
    window, int_dtype = (4, torch.int32) if bits <= 4 else (8, torch.int64)
    stream = _pad_to(packed, (n_groups - 1) * bits + window)  # the last window may run past the stream
    # overlapping little-endian windows starting at every group (their extra bytes are masked off)
    windows = torch.empty(n_groups, window, dtype=torch.uint8, device=packed.device)
    windows.copy_(torch.as_strided(stream, (n_groups, window), (bits, 1)))
    words = windows.view(int_dtype).view(-1)
    per_group = 8 // u
    symbols = torch.empty(n_groups, per_group, dtype=int_dtype, device=packed.device)
    for j in range(per_group):
        torch.bitwise_and(words >> (j * width), (1 << width) - 1, out=symbols[:, j])
    return symbols.view(-1)[:n_symbols]


def _pad_to(packed: torch.Tensor, nbytes: int) -> torch.Tensor:
    extra = nbytes - packed.numel()
    return packed if extra == 0 else torch.cat([packed, packed.new_zeros(extra)])


def _symbol_table_lookup(packed: torch.Tensor, bits: int, count: int, lut: torch.Tensor, u: int) -> torch.Tensor:
    groups, _, d = lut.shape
    table = symbol_table(lut, bits, u)  # [groups, S, u * d]
    n_values = table.shape[1]
    row_bytes = table.shape[-1] * table.element_size()
    unit = next(size for size in _RAW_DTYPES if row_bytes % size == 0)
    raw = table.reshape(groups * n_values, -1).view(_RAW_DTYPES[unit])  # [groups * S, row_bytes / unit]
    index = read_symbols(packed, bits, count, u)
    if groups > 1:
        offsets = torch.arange(groups, dtype=index.dtype, device=index.device).unsqueeze(1) * n_values
        index = (index.view(groups, -1) + offsets).view(-1)
    if raw.shape[1] == 1:
        raw = raw.view(-1)
    return raw.index_select(0, index).view(lut.dtype).reshape(-1)[: count * d]
