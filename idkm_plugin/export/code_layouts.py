"""How `save_palettized(..., codec="huffman")` stores one layer's codes (and pruning mask).

A layer holds N codes (one per d-vector, values in [0, K), K = 2**bits) and, when pruned, a mask
bool [N] (True = kept; a pruned vector's code is 0). Layouts, the smallest one is kept per layer:

    packed           the codes bit-packed at `bits` bits (+ the mask at 1 bit), as codec="raw" stores them
    huffman          one Huffman stream of the N codes (layers without a mask)
    huffman_reserved one Huffman stream of N symbols over K + 1: symbol K = pruned (layers with a mask)
    huffman_sparse   Deep Compression's relative index (layers with a mask): a stream of the survivors'
                     codes, then a stream of position gaps at index width w bits (alphabet 2**w, F = 2**w - 1):
                     a survivor whose skip s (pruned vectors since the previous survivor) is < F is the
                     symbol s; a larger skip first emits filler symbols F, each skipping F positions,
                     until the rest is < F (a filler stores no code, unlike the paper's zero entries).
                     The width is chosen per layer among 1..8 bits by the exact encoded size: a wider
                     index costs a larger code-length table (2**w entries), a narrower one more fillers
                     (w = 1 is a plain bitmap up to the last survivor); 8 bits is Deep Compression's width
                     for conv layers, and a 256-entry length table already costs ~130 bytes.

The blob of a huffman layout is the concatenation of its streams (`huffman.encode`: each Huffman-coded,
or stored at fixed width when that is not larger).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..nn.packing import pack_codes, packed_nbytes, unpack_codes
from . import huffman

__all__ = ["EncodedCodes", "LAYOUTS", "best_layout", "decode_codes", "decode_packed_codes", "encode_codes",
           "layer_codes", "layout_sizes", "sparse_fixed_width_nbytes"]

LAYOUTS = ("packed", "huffman", "huffman_reserved", "huffman_sparse")
INDEX_BITS = range(1, 9)


@dataclass
class EncodedCodes:
    """One layer's codes (+ mask) in `layout`: blob uint8 [nbytes] (None for "packed")."""
    layout: str
    nbytes: int  # bytes stored for codes + mask
    blob: Optional[torch.Tensor] = None
    index_bits: Optional[int] = None  # huffman_sparse only


def layer_codes(module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(codes int64 [N], mask bool [N] or None) of a palettized layer (N = module.num_codes)."""
    codes = unpack_codes(module.codes.cpu(), module.bits, module.num_codes)
    packed_mask = module.mask
    if packed_mask is None:
        return codes, None
    return codes, unpack_codes(packed_mask.reshape(-1).cpu(), 1, module.num_codes).bool()


def _gaps(mask: torch.Tensor) -> torch.Tensor:
    """Skips before each survivor: int64 [survivors] (pruned positions since the previous survivor)."""
    positions = torch.nonzero(mask).reshape(-1)
    return torch.diff(positions, prepend=torch.tensor([-1])) - 1


def _gap_symbols(gaps: torch.Tensor, width: int) -> torch.Tensor:
    """The gap stream at index width `width`: int64 [survivors + fillers], filler F = 2**width - 1."""
    filler = (1 << width) - 1
    per_survivor = gaps // filler + 1
    symbols = torch.full((int(per_survivor.sum()),), filler, dtype=torch.int64)
    symbols[torch.cumsum(per_survivor, 0) - 1] = gaps % filler
    return symbols


def _gap_counts(gaps: torch.Tensor, width: int) -> torch.Tensor:
    """Symbol counts of `_gap_symbols(gaps, width)`: int64 [2**width], without building it."""
    filler = (1 << width) - 1
    counts = torch.bincount(gaps % filler, minlength=1 << width)
    counts[filler] = (gaps // filler).sum()
    return counts


def _sparse_choice(codes: torch.Tensor, mask: torch.Tensor, bits: int) -> tuple[int, int]:
    """(nbytes, index width) of the smallest huffman_sparse encoding."""
    code_bytes = huffman.encoded_nbytes(torch.bincount(codes[mask], minlength=1 << bits))
    gaps = _gaps(mask)
    return min((code_bytes + huffman.encoded_nbytes(_gap_counts(gaps, w)), w) for w in INDEX_BITS)


def _reserved_symbols(codes: torch.Tensor, mask: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.where(mask, codes, torch.full_like(codes, 1 << bits))


def layout_sizes(codes: torch.Tensor, mask: Optional[torch.Tensor], bits: int) -> dict[str, tuple[int, Optional[int]]]:
    """layout -> (bytes stored for codes + mask, index width or None), for every exact layout of the layer.

    codes int64 [N]; mask bool [N] or None. A mask whose pruned codes are not all 0 leaves only "packed".
    """
    n = codes.numel()
    sizes: dict[str, tuple[int, Optional[int]]] = {
        "packed": (packed_nbytes(n, bits) + (0 if mask is None else packed_nbytes(n, 1)), None)}
    if mask is None:
        sizes["huffman"] = (huffman.encoded_nbytes(torch.bincount(codes, minlength=1 << bits)), None)
    elif not bool(codes[~mask].any()):
        reserved = torch.bincount(_reserved_symbols(codes, mask, bits), minlength=(1 << bits) + 1)
        sizes["huffman_reserved"] = (huffman.encoded_nbytes(reserved), None)
        nbytes, width = _sparse_choice(codes, mask, bits)
        sizes["huffman_sparse"] = (nbytes, width)
    return sizes


def best_layout(codes: torch.Tensor, mask: Optional[torch.Tensor], bits: int) -> tuple[str, int, Optional[int]]:
    """(layout, bytes, index width or None) of the smallest layout; ties keep the earlier of LAYOUTS."""
    sizes = layout_sizes(codes, mask, bits)
    layout = min(sizes, key=lambda name: (sizes[name][0], LAYOUTS.index(name)))
    return layout, *sizes[layout]


def encode_codes(codes: torch.Tensor, mask: Optional[torch.Tensor], bits: int) -> EncodedCodes:
    """codes int64 [N] (+ mask bool [N]) in their smallest layout (`best_layout`)."""
    layout, nbytes, width = best_layout(codes, mask, bits)
    if layout == "packed":
        return EncodedCodes(layout, nbytes)
    if layout == "huffman":
        blob = huffman.encode(codes, 1 << bits)
    elif layout == "huffman_reserved":
        blob = huffman.encode(_reserved_symbols(codes, mask, bits), (1 << bits) + 1)
    else:
        blob = torch.cat([huffman.encode(codes[mask], 1 << bits),
                          huffman.encode(_gap_symbols(_gaps(mask), width), 1 << width)])
    if blob.numel() != nbytes:
        raise RuntimeError(f"encode_codes: {layout} wrote {blob.numel()} bytes, measured {nbytes}")
    return EncodedCodes(layout, nbytes, blob, width)


def decode_codes(layout: str, blob: torch.Tensor, count: int, bits: int,
                 index_bits: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inverse of `encode_codes` for the huffman layouts: (codes int64 [count], mask bool [count] or None).

    Raises ValueError when the blob does not hold exactly what the layout needs."""
    if layout == "huffman":
        codes, end = huffman.decode(blob, 0, count, 1 << bits)
        mask = None
    elif layout == "huffman_reserved":
        symbols, end = huffman.decode(blob, 0, count, (1 << bits) + 1)
        mask = symbols != 1 << bits
        codes = torch.where(mask, symbols, torch.zeros_like(symbols))
    elif layout == "huffman_sparse":
        if index_bits not in INDEX_BITS:
            raise ValueError(f"huffman_sparse: index width {index_bits!r} is not one of 1..8")
        survivors, end = huffman.decode(blob, 0, None, 1 << bits, max_count=count)
        gap_symbols, end = huffman.decode(blob, end, None, 1 << index_bits, max_count=count)
        codes, mask = _scatter_survivors(survivors, gap_symbols, index_bits, count)
    else:
        raise ValueError(f"unknown codes layout {layout!r}; known: {list(LAYOUTS)}")
    _check_end(layout, blob, end)
    return codes, mask


def decode_packed_codes(layout: str, blob: torch.Tensor, count: int, bits: int,
                        index_bits: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`decode_codes` packed as a layer stores them: (codes uint8 [packed_nbytes(count, bits)], mask uint8
    [packed_nbytes(count, 1)] or None), equal to pack_codes of decode_codes' tensors. The "huffman" layout
    decodes straight into packed codes (no int64 [count] tensor: the bulk of an unpruned model's load)."""
    if layout == "huffman":
        packed, end = huffman.decode_packed(blob, bits, 0, count, 1 << bits)
        _check_end(layout, blob, end)
        return packed, None
    codes, mask = decode_codes(layout, blob, count, bits, index_bits)
    return pack_codes(codes, bits), None if mask is None else pack_codes(mask, 1)


def _check_end(layout: str, blob: torch.Tensor, end: int) -> None:
    if end != blob.numel():
        raise ValueError(f"{layout}: the blob holds {blob.numel()} bytes, its streams end at byte {end}")


def _scatter_survivors(survivors: torch.Tensor, gap_symbols: torch.Tensor, width: int,
                       count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivors' codes [S] at the positions the gap stream gives -> (codes int64 [count], mask bool [count])."""
    filler = gap_symbols == (1 << width) - 1
    advance = torch.where(filler, gap_symbols, gap_symbols + 1)
    positions = (torch.cumsum(advance, 0) - 1)[~filler]
    if positions.numel() != survivors.numel():
        raise ValueError(f"huffman_sparse: {positions.numel()} positions for {survivors.numel()} survivors")
    if positions.numel() and int(positions[-1]) >= count:
        raise ValueError(f"huffman_sparse: a survivor at position {int(positions[-1])} of a {count}-code layer")
    codes = torch.zeros(count, dtype=torch.int64)
    mask = torch.zeros(count, dtype=torch.bool)
    codes[positions] = survivors
    mask[positions] = True
    return codes, mask


def sparse_fixed_width_nbytes(mask: torch.Tensor, bits: int) -> int:
    """Deep Compression's sparse form before Huffman coding: one (index, code) entry of w + bits bits
    per survivor and per filler (a stored pruned entry that advances 2**w positions), w in 1..8 the
    smallest; bytes, rounded up."""
    gaps = _gaps(mask)
    return min(packed_nbytes(gaps.numel() + int((gaps >> w).sum()), w + bits) for w in INDEX_BITS)
