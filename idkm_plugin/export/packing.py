"""Exact bit packing of n-bit codes (1..16 bits) into uint8, little-endian bit order."""
from __future__ import annotations

import torch


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (any shape, integer values in [0, 2**bits)) -> uint8 [packed_nbytes(numel, bits)]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"pack_codes: bits={bits} is not allowed; expected 1..16")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"pack_codes: codes must lie in [0, {1 << bits}) for bits={bits}; "
                         f"got range [{int(flat.min())}, {int(flat.max())}]")
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    bit_stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bit_stream.numel()) % 8
    bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(pad)]).view(-1, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=flat.device)
    return (bit_stream * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [packed_nbytes(count, bits)] -> codes int64 [count]; exact inverse of pack_codes."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bit_stream = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (bit_stream.view(count, bits) * weights).sum(1).to(torch.long)
