"""Dense weight from packed codes + LUT with Core ATen ops only, for `torch.export`ed programs.

The eager path (`dequantize.py`) reinterprets bytes (`view(dtype)`, complex128 rows), which
runtimes such as ExecuTorch do not run. Here the bytes are unpacked with integer arithmetic
(floor division by powers of two, remainder, multiply-add: all Core ATen, all in ExecuTorch's
portable kernels) and looked up with `embedding`, so a program keeps the packed codes + LUT as
its constants and decodes them when it runs. Same layout, same result, bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["apply_packed_mask_portable", "dequantize_portable", "unpack_codes_portable"]


def unpack_codes_portable(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [packed_nbytes(count, bits)] -> codes int64 [count] (same result as `unpack_codes`)."""
    k = 1 << bits
    raw = packed.to(torch.int64)  # the only conversion: embedding takes int64 indices
    if 8 % bits == 0:  # whole codes per byte: code j of a byte = (byte // 2**(j*bits)) % 2**bits
        divisors = torch.tensor([1 << s for s in range(0, 8, bits)])
        codes = torch.remainder(torch.div(raw.unsqueeze(1), divisors, rounding_mode="floor"), k).reshape(-1)
        return codes if codes.shape[0] == count else codes[:count]
    n_groups = -(-count // 8)  # 8 codes fill exactly `bits` bytes: one row per group
    pad = n_groups * bits - raw.shape[0]
    rows = (torch.cat([raw, raw.new_zeros(pad)]) if pad else raw).view(n_groups, bits)
    rows = torch.cat([rows, rows.new_zeros(n_groups, 2)], 1)  # a code spans at most 3 bytes of its row
    first_byte = torch.tensor([i * bits // 8 for i in range(8)])
    # window = the 3 bytes from each code's first byte on, as one little-endian integer: [n_groups, 8]
    window = (rows.index_select(1, first_byte) + rows.index_select(1, first_byte + 1) * 256
              + rows.index_select(1, first_byte + 2) * 65536)
    divisors = torch.tensor([1 << (i * bits % 8) for i in range(8)])
    codes = torch.remainder(torch.div(window, divisors, rounding_mode="floor"), k).reshape(-1)
    return codes if codes.shape[0] == count else codes[:count]


def dequantize_portable(packed: torch.Tensor, bits: int, count: int, lut: torch.Tensor,
                        dtype: torch.dtype, shape: Sequence[int] = (-1,)) -> torch.Tensor:
    """packed uint8, lut [groups, 2**bits, d] -> dense weight of `shape` (count * d values) in `dtype`,
    as `dequantize_packed`."""
    groups, k, d = lut.shape
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte and (count // groups) % per_byte == 0:  # each group's codes fill whole bytes
        return _dequantize_by_byte(packed, bits, groups, lut.to(dtype)).reshape(shape)
    codes = unpack_codes_portable(packed, bits, count)
    if groups > 1:
        codes = (codes.view(groups, -1) + torch.arange(groups).unsqueeze(1) * k).reshape(-1)
    return F.embedding(codes, lut.reshape(groups * k, d).to(dtype)).reshape(shape)


def _dequantize_by_byte(packed: torch.Tensor, bits: int, groups: int, lut: torch.Tensor) -> torch.Tensor:
    """packed uint8 [n] (groups of whole bytes), lut [groups, 2**bits, d] -> values [n, (8 // bits) * d]: one
    `embedding` of each byte into a table [groups * 256, (8 // bits) * d] of every byte's decoded codes, built from
    the LUT (a few KB). Decoding costs one int64 conversion and one gather per byte, not per code: the program
    decodes every weight on each call, so this is most of its time."""
    per_byte, k, d = 8 // bits, lut.shape[1], lut.shape[2]
    byte = torch.arange(256).unsqueeze(1)
    byte_codes = torch.remainder(torch.div(byte, torch.tensor([1 << s for s in range(0, 8, bits)]),
                                           rounding_mode="floor"), k)  # [256, per_byte], constant
    if groups > 1:
        byte_codes = byte_codes + (torch.arange(groups) * k).view(groups, 1, 1)  # [groups, 256, per_byte]
    table = F.embedding(byte_codes, lut.reshape(groups * k, d)).reshape(groups * 256, per_byte * d)
    raw = packed.to(torch.int64)
    if groups > 1:
        raw = (raw.view(groups, -1) + (torch.arange(groups) * 256).unsqueeze(1)).reshape(-1)
    return F.embedding(raw, table)


def apply_packed_mask_portable(weight: torch.Tensor, packed_mask: torch.Tensor, count: int) -> torch.Tensor:
    """As `apply_packed_mask` (pruned d-vectors exactly 0), with Core ATen ops only."""
    keep = torch.ne(unpack_codes_portable(packed_mask, 1, count), 0).unsqueeze(1)
    return torch.where(keep, weight.reshape(count, -1), torch.zeros((), dtype=weight.dtype)).reshape(weight.shape)
