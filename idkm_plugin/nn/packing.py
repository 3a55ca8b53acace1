"""Exact bit packing of n-bit codes (1..16 bits) into uint8, little-endian bit order.

Code i occupies bits [i * bits, (i + 1) * bits) of the stream; stream bit j is bit (j % 8) of byte
j // 8 (the order Core ML and most n-bit formats use). Every operation works on whole bytes or
words: 8 codes of `bits` bits fill exactly `bits` bytes, so a group of 8 codes is one little-endian
integer of `bits` bytes (one int64 for bits <= 8, two for 9..16), shifted and masked per position.
"""
from __future__ import annotations

import torch

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def _check_bits(bits: int, caller: str) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"{caller}: bits={bits} is not allowed; expected 1..16")


def _offsets(bits: int) -> list[int]:
    """Bit offset of each of the 8 codes of a group inside its `bits`-byte little-endian integer."""
    return [i * bits for i in range(8)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (any shape, integer values in [0, 2**bits)) -> uint8 [packed_nbytes(numel, bits)]."""
    _check_bits(bits, "pack_codes")
    flat = codes.reshape(-1).to(torch.int64)
    count = flat.numel()
    if count and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"pack_codes: codes must lie in [0, {1 << bits}) for bits={bits}; "
                         f"got range [{int(flat.min())}, {int(flat.max())}]")
    groups = torch.nn.functional.pad(flat, (0, (-count) % 8)).view(-1, 8)  # [G, 8]
    words = torch.zeros(groups.shape[0], 2, dtype=torch.int64, device=flat.device)  # 16 bytes per group
    for i, offset in enumerate(_offsets(bits)):
        word, shift = divmod(offset, 64)
        words[:, word] |= groups[:, i] << shift  # int64 wraps: the bit pattern is what counts
        if shift + bits > 64:  # the code straddles the two words
            words[:, 1] |= groups[:, i] >> (64 - shift)
    packed = words.view(torch.uint8).view(-1, 16)[:, :bits]  # little-endian: the first `bits` bytes
    return packed.reshape(-1)[: packed_nbytes(count, bits)].clone()


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [packed_nbytes(count, bits)] -> codes int64 [count]; exact inverse of pack_codes."""
    _check_bits(bits, "unpack_codes")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(f"unpack_codes: {packed.numel()} bytes do not hold {count} codes of {bits} bits "
                         f"(expected {packed_nbytes(count, bits)})")
    n_groups = -(-count // 8)
    raw = torch.nn.functional.pad(packed.reshape(-1), (0, n_groups * bits - packed.numel())).view(n_groups, bits)
    words = torch.nn.functional.pad(raw, (0, 16 - bits)).view(torch.int64)  # [G, 2] little-endian
    mask = (1 << bits) - 1
    if bits <= 8:  # the whole group is one int64: one broadcast shift
        shifts = torch.tensor(_offsets(bits), dtype=torch.int64, device=packed.device)
        return ((words[:, :1] >> shifts) & mask).view(-1)[:count]
    codes = torch.empty(n_groups, 8, dtype=torch.int64, device=packed.device)
    for i, offset in enumerate(_offsets(bits)):
        word, shift = divmod(offset, 64)
        value = words[:, word] >> shift
        if shift + bits > 64:  # low part from word 0 (sign-extended, so mask it), high part from word 1
            value = (value & ((1 << (64 - shift)) - 1)) | (words[:, 1] << (64 - shift))
        codes[:, i] = value & mask
    return codes.view(-1)[:count]
