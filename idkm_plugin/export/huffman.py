"""Canonical, length-limited Huffman coding of integer symbol streams, encoded and decoded natively or with torch ops.

A stream of N symbols from the alphabet [0, n_symbols) becomes one uint8 blob; integers marked
varint are LEB128 (7 bits per byte, low bits first):

    count      varint    N
    n_symbols  varint    alphabet size
    mode       u8        (block_log2 << 3) | width; width 0: stored, 1..5: Huffman
  stored (fixed width, when it is not larger than the Huffman form, as deflate's stored blocks):
    symbols    packed    `pack_codes(symbols, bit_length(n_symbols - 1))` (nothing for a 1-symbol alphabet)
  Huffman:
    lengths    packed    code length of every symbol (0 = absent), `pack_codes(lengths, width)`
    block_bits u24 [B]   payload bits of each block of 2**block_log2 symbols (BLOCK_LOG2 = 12: 4096),
                         little-endian, B = ceil(N / 2**block_log2), or B = 0 when a single symbol occurs
    payload    bytes     the codes, MSB first: bit j of the payload is bit 7 - j % 8 of byte j // 8

The code is canonical (codes of one length are consecutive integers in symbol order, shorter codes
first), so the lengths alone define it. A stream with a single distinct symbol stores no blocks and
no payload (its symbol has length 1 in the table, never written).

The payload is written and read by the native ops `huffman_encode` / `huffman_decode`
(idkm_plugin/csrc/huffman.cpp: table-driven, several codes per lookup; 50-270M codes/s on one thread in
benchmarks/results/entropy_coding.md) when the extension is built, else by torch ops (`_encode_payload`,
`_peek_decode`: every block at once, one symbol position at a time through a 2**L-entry peek table,
L = the longest code, at most 4096 vectorised steps whatever N is; 4-8M codes/s). Both write the same bytes and read the same symbols.
`decode_packed` returns the symbols packed as `pack_codes` does, which the native op does block by
block (load_palettized's path). Every length is checked on decode, and each block must end exactly
where the next one starts: a corrupted stream raises ValueError; a flipped payload bit that keeps
every block length consistent is caught by the file's CRC32, not here.
"""
from __future__ import annotations

import heapq

import torch

from .. import native
from ..nn.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["BLOCK_LOG2", "MAX_LENGTH", "canonical_codes", "code_lengths", "decode", "decode_packed", "encode",
           "encoded_nbytes"]

MAX_LENGTH = 16  # default limit on code lengths (raised to ceil(log2(alphabet)) when the alphabet needs it)
_HARD_MAX_LENGTH = 24  # a code of L <= 24 bits at any bit offset fits in the 32-bit peek window
BLOCK_LOG2 = 12
_BLOCK_FIELD = 3  # bytes per block length (u24: a block holds at most 4096 * 24 bits)
_CHUNK_BLOCKS = 64  # blocks encoded per vectorised chunk
_MAX_SYMBOLS = 1 << 20  # refuse headers claiming larger alphabets (a corrupted field, not a real stream)


def _huffman_lengths(counts: list[int]) -> list[int]:
    """Unlimited Huffman code lengths of the symbols with count > 0 (0 for the others)."""
    present = [s for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(present) == 1:
        lengths[present[0]] = 1
    if len(present) <= 1:
        return lengths
    heap = [(counts[s], s) for s in present]  # (weight, node id): leaves are symbols, inner nodes >= len
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    next_id = len(counts)
    while len(heap) > 1:
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (w1 + w2, next_id))
        next_id += 1
    depth = {heap[0][1]: 0}
    for node in range(next_id - 1, len(counts) - 1, -1):  # inner nodes, root first (parents have larger ids)
        if node in parent:
            depth[node] = depth[parent[node]] + 1
    for s in present:
        lengths[s] = depth[parent[s]] + 1
    return lengths


def _limit(lengths: list[int], counts: list[int], max_length: int) -> list[int]:
    """Lengths of a complete prefix code no longer than `max_length`, by moving leaves up the tree as in
    JPEG (ITU T.81, Annex K.3 "adjust_BITS"); the most frequent symbols keep the shortest codes."""
    longest = max(lengths)
    if longest <= max_length:
        return lengths
    per_length = [0] * (longest + 1)
    for length in lengths:
        if length:
            per_length[length] += 1
    for i in range(longest, max_length, -1):
        while per_length[i] > 0:  # two leaves at depth i: one moves up to i - 1, a leaf at j splits in two
            j = i - 2
            while per_length[j] == 0:
                j -= 1
            per_length[i] -= 2
            per_length[i - 1] += 1
            per_length[j + 1] += 2
            per_length[j] -= 1
    order = sorted((s for s, c in enumerate(counts) if c > 0), key=lambda s: (-counts[s], s))
    limited, k = [0] * len(counts), 0
    for length in range(1, max_length + 1):
        for _ in range(per_length[length]):
            limited[order[k]] = length
            k += 1
    return limited


def code_lengths(counts: torch.Tensor, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """counts int [n] (occurrences of each symbol) -> code lengths int64 [n], 0 for absent symbols.

    Huffman lengths, limited to `max_length` bits (JPEG's method: optimal when no code exceeds the
    limit, near-optimal otherwise). One present symbol gets length 1. Raises ValueError when the
    present symbols cannot fit (more than 2**max_length of them) or max_length is outside 1..24.
    """
    if not 1 <= max_length <= _HARD_MAX_LENGTH:
        raise ValueError(f"code_lengths: max_length={max_length} is outside 1..{_HARD_MAX_LENGTH}")
    values = [int(c) for c in counts.reshape(-1).tolist()]
    if any(c < 0 for c in values):
        raise ValueError("code_lengths: counts must be >= 0")
    present = sum(1 for c in values if c > 0)
    if present > 1 << max_length:
        raise ValueError(f"code_lengths: {present} symbols do not fit in codes of at most {max_length} bits")
    lengths = _limit(_huffman_lengths(values), values, max_length)
    return torch.tensor(lengths, dtype=torch.int64)


def canonical_codes(lengths: torch.Tensor) -> torch.Tensor:
    """lengths int [n] -> canonical codes int64 [n] (0 where the length is 0).

    Symbols sorted by (length, symbol) get consecutive codes; moving to a longer length appends zeros.
    """
    lengths = lengths.to(torch.int64)
    n = lengths.numel()
    codes = torch.zeros(n, dtype=torch.int64)
    present = torch.nonzero(lengths > 0).reshape(-1)
    if present.numel() == 0:
        return codes
    order = present[torch.argsort(lengths[present] * (n + 1) + present)]  # by (length, symbol)
    sorted_lengths = lengths[order]
    per_length = torch.bincount(sorted_lengths, minlength=int(sorted_lengths.max()) + 1)
    first_code = [0] * per_length.numel()  # first_code[1] = 0
    for length in range(2, per_length.numel()):
        first_code[length] = (first_code[length - 1] + int(per_length[length - 1])) << 1
    first_index = torch.cumsum(per_length, 0) - per_length  # position of each length's first symbol in order
    rank = torch.arange(order.numel()) - first_index[sorted_lengths]
    codes[order] = torch.tensor(first_code, dtype=torch.int64)[sorted_lengths] + rank
    return codes


def _lengths_for(counts: torch.Tensor, max_length: int) -> torch.Tensor:
    present = int((counts > 0).sum())
    return code_lengths(counts, max(max_length, (present - 1).bit_length()))


def _table_nbytes(n_symbols: int, width: int) -> int:
    return packed_nbytes(n_symbols, width) if width else 0


def _stored_width(n_symbols: int) -> int:
    """Bits per symbol of the stored form (0 for a one-symbol alphabet)."""
    return (n_symbols - 1).bit_length()


def _varint(value: int) -> list[int]:
    """LEB128 bytes of value >= 0."""
    out = []
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return out


def _header(count: int, n_symbols: int, width: int) -> list[int]:
    return _varint(count) + _varint(n_symbols) + [(BLOCK_LOG2 << 3) | width]


def _huffman_nbytes(counts: torch.Tensor, lengths: torch.Tensor) -> int:
    """Bytes of the Huffman form after the header: table, block table, payload."""
    size = _table_nbytes(counts.numel(), int(lengths.max()).bit_length())
    if int((counts > 0).sum()) >= 2:
        n_blocks = -(-int(counts.sum()) // (1 << BLOCK_LOG2))
        size += _BLOCK_FIELD * n_blocks + (int((counts * lengths).sum()) + 7) // 8
    return size


def _stored_nbytes(count: int, n_symbols: int) -> int | None:
    width = _stored_width(n_symbols)
    return None if width > 16 else packed_nbytes(count, width)


def encoded_nbytes(counts: torch.Tensor, max_length: int = MAX_LENGTH) -> int:
    """Bytes `encode` writes for a stream with these symbol counts int [n_symbols], without encoding it."""
    counts = counts.reshape(-1).to(torch.int64)
    n, n_symbols = int(counts.sum()), counts.numel()
    if n == 0:
        return len(_header(0, n_symbols, 0))
    stored = _stored_nbytes(n, n_symbols)
    huffman = _huffman_nbytes(counts, _lengths_for(counts, max_length))
    return len(_header(n, n_symbols, 0)) + (huffman if stored is None else min(stored, huffman))


def encode(symbols: torch.Tensor, n_symbols: int, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """symbols int [N] (values in [0, n_symbols)) -> the stream's blob uint8 [*]: Huffman-coded, or
    stored at fixed width when that is not larger."""
    symbols = symbols.reshape(-1).to(torch.int64).cpu()
    if not 1 <= n_symbols <= _MAX_SYMBOLS:
        raise ValueError(f"huffman.encode: n_symbols={n_symbols} is outside 1..{_MAX_SYMBOLS}")
    if symbols.numel() and (int(symbols.min()) < 0 or int(symbols.max()) >= n_symbols):
        raise ValueError(f"huffman.encode: symbols must lie in [0, {n_symbols}); got "
                         f"[{int(symbols.min())}, {int(symbols.max())}]")
    n = symbols.numel()
    counts = torch.bincount(symbols, minlength=n_symbols)
    lengths = _lengths_for(counts, max_length)
    stored = _stored_nbytes(n, n_symbols)
    if not n or (stored is not None and stored <= _huffman_nbytes(counts, lengths)):
        width = _stored_width(n_symbols)
        body = [pack_codes(symbols, width)] if width and n else []
        return torch.cat([_bytes(_header(n, n_symbols, 0)), *body])
    width = int(lengths.max()).bit_length()
    parts = [_bytes(_header(n, n_symbols, width)), pack_codes(lengths, width)]
    if int((counts > 0).sum()) >= 2:
        block_bits, payload = _encode_blocks(symbols, lengths)
        fields = block_bits.view(-1, 1).bitwise_right_shift(torch.tensor([0, 8, 16])) & 0xFF
        parts += [fields.reshape(-1).to(torch.uint8), payload]
    return torch.cat(parts)


def _encode_blocks(symbols: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """symbols int64 [N], lengths int64 [n_symbols] -> (payload bits of each block int64 [B], payload uint8 [*]).

    The native op when it is built (one pass per output, ~10x faster), else torch ops; both write the same bytes."""
    if native.has_op("huffman_encode"):
        return torch.ops.idkm_plugin.huffman_encode(symbols.contiguous(), lengths, 1 << BLOCK_LOG2)
    block_bits = _block_sums(symbols, lengths, 1 << BLOCK_LOG2)
    return block_bits, _encode_payload(symbols, lengths, canonical_codes(lengths), int(block_bits.sum()))


def _bytes(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _encode_payload(symbols: torch.Tensor, lengths: torch.Tensor, codes: torch.Tensor, total: int) -> torch.Tensor:
    """The payload uint8 [ceil(total / 8)]: every code OR-ed into the <= 4 bytes it touches.

    Works through the stream in chunks of _CHUNK_BLOCKS blocks, so its temporaries stay small."""
    nbytes = (total + 7) // 8
    buffer = torch.zeros(nbytes + 4, dtype=torch.int64)
    chunk, base = (1 << BLOCK_LOG2) * _CHUNK_BLOCKS, 0
    for i in range(0, symbols.numel(), chunk):
        part = symbols[i:i + chunk]
        sym_lengths, sym_codes = lengths.index_select(0, part), codes.index_select(0, part)
        starts = torch.cumsum(sym_lengths, 0).sub_(sym_lengths).add_(base)
        base += int(sym_lengths.sum())
        shift = (starts & 7).add_(sym_lengths).neg_().add_(32)
        window = sym_codes.bitwise_left_shift_(shift)  # the code in a 32-bit big-endian window
        first_byte = starts.bitwise_right_shift_(3)
        for k in range(4):  # codes touch disjoint bits, so adding the bytes is OR-ing them
            buffer.index_add_(0, first_byte + k, (window >> (24 - 8 * k)) & 0xFF)
    return buffer[:nbytes].to(torch.uint8)


def _block_sums(symbols: torch.Tensor, lengths: torch.Tensor, block: int) -> torch.Tensor:
    """Payload bits of each block of `block` symbols: int64 [ceil(N / block)]."""
    sums = []
    chunk = block * _CHUNK_BLOCKS
    for i in range(0, symbols.numel(), chunk):
        part = lengths.index_select(0, symbols[i:i + chunk])
        full = part.numel() // block * block
        sums.append(part[:full].view(-1, block).sum(1))
        if full < part.numel():
            sums.append(part[full:].sum().view(1))
    return torch.cat(sums)


def _corrupt(message: str) -> ValueError:
    return ValueError(f"corrupted Huffman stream: {message}")


def _read_varints(blob: torch.Tensor, pos: int, count: int) -> tuple[list[int], int]:
    """`count` LEB128 integers from byte `pos` of blob -> (values, end position)."""
    window = blob[pos:pos + 4 * count + 8].tolist()  # values here need at most 4 bytes each (< 2**28)
    values, value, shift, i = [], 0, 0, 0
    while len(values) < count:
        if i >= len(window) or shift > 28:
            raise _corrupt("truncated or malformed integer field")
        byte = window[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            values.append(value)
            value, shift = 0, 0
    return values, pos + i


def decode(blob: torch.Tensor, offset: int = 0, count: int | None = None, n_symbols: int | None = None,
           max_count: int | None = None) -> tuple[torch.Tensor, int]:
    """Decode the stream starting at byte `offset` of `blob` uint8 [*] -> (symbols int64 [N], end offset).

    `count` / `n_symbols`, when given, must match the stream's header, and N must not exceed
    `max_count`. Raises ValueError on any inconsistency (lengths, table, block ends).
    """
    return _decode(blob, offset, count, n_symbols, max_count, 0)


def decode_packed(blob: torch.Tensor, bits: int, offset: int = 0, count: int | None = None,
                  n_symbols: int | None = None) -> tuple[torch.Tensor, int]:
    """`decode`, with the symbols packed at `bits` bits each -> (uint8 [packed_nbytes(N, bits)], end offset).

    Equal to `pack_codes(decode(...)[0], bits)`; the native op packs each block as it decodes it, so no
    int64 [N] tensor is made. The stream's alphabet must fit in `bits` bits (1..16)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"huffman.decode_packed: bits={bits} is not allowed; expected 1..16")
    return _decode(blob, offset, count, n_symbols, None, bits)


def _decode(blob: torch.Tensor, offset: int, count: int | None, n_symbols: int | None, max_count: int | None,
            pack_bits: int) -> tuple[torch.Tensor, int]:
    """`decode` (pack_bits 0) or `decode_packed` (pack_bits 1..16)."""
    blob = blob.reshape(-1)
    if blob.dtype != torch.uint8:
        raise ValueError(f"huffman.decode: expected a uint8 blob, got {blob.dtype}")
    (n, alphabet), pos = _read_varints(blob, offset, 2)
    if pos >= blob.numel():
        raise _corrupt("truncated inside its header")
    mode = int(blob[pos])
    pos += 1
    block_log2, width = mode >> 3, mode & 7
    if count is not None and n != count:
        raise _corrupt(f"it holds {n} symbols, expected {count}")
    if n_symbols is not None and alphabet != n_symbols:
        raise _corrupt(f"its alphabet has {alphabet} symbols, expected {n_symbols}")
    if max_count is not None and n > max_count:
        raise _corrupt(f"it holds {n} symbols, more than the {max_count} possible")
    if not 1 <= alphabet <= _MAX_SYMBOLS or block_log2 != BLOCK_LOG2 or width > 5:
        raise _corrupt(f"impossible header (n_symbols={alphabet}, mode={mode})")
    if pack_bits and alphabet > 1 << pack_bits:
        raise _corrupt(f"its alphabet of {alphabet} symbols does not fit in {pack_bits}-bit codes")
    if width == 0:
        symbols, end = _decode_stored(blob, pos, n, alphabet)
        return (pack_codes(symbols, pack_bits) if pack_bits else symbols), end
    table_end = pos + _table_nbytes(alphabet, width)
    if blob.numel() < table_end:
        raise _corrupt("truncated inside its code-length table")
    lengths = unpack_codes(blob[pos:table_end], width, alphabet)
    present = torch.nonzero(lengths).reshape(-1)
    if n == 0 or present.numel() == 0:
        raise _corrupt(f"{n} symbols and {present.numel()} codes in a Huffman stream")
    if int(lengths.max()) > _HARD_MAX_LENGTH or float(torch.sum(2.0 ** -lengths[present].double())) > 1.0:
        raise _corrupt("its code lengths do not form a prefix code")
    if present.numel() == 1:
        symbol = int(present[0])
        return (_constant_packed(symbol, n, pack_bits) if pack_bits
                else torch.full((n,), symbol, dtype=torch.int64)), table_end
    return _decode_blocks(blob, table_end, n, lengths, 1 << block_log2, pack_bits)


def _constant_packed(symbol: int, n: int, bits: int) -> torch.Tensor:
    """pack_codes(torch.full((n,), symbol), bits) without the int64 [n] tensor: one 8-code group repeated."""
    group = pack_codes(torch.full((8,), symbol, dtype=torch.int64), bits)  # 8 codes = `bits` bytes
    packed = group.repeat(-(-n // 8))[:packed_nbytes(n, bits)]
    if (n * bits) % 8:  # pack_codes leaves the bits past the last code 0
        packed[-1] &= (1 << (n * bits) % 8) - 1
    return packed


def _decode_stored(blob: torch.Tensor, pos: int, n: int, alphabet: int) -> tuple[torch.Tensor, int]:
    width = _stored_width(alphabet)
    if width == 0 or n == 0:
        return torch.zeros(n, dtype=torch.int64), pos
    if width > 16:
        raise _corrupt(f"a stored stream of a {alphabet}-symbol alphabet")
    end = pos + packed_nbytes(n, width)
    if blob.numel() < end:
        raise _corrupt(f"truncated: {end - pos} stored bytes expected, {blob.numel() - pos} left")
    symbols = unpack_codes(blob[pos:end], width, n)
    if n and int(symbols.max()) >= alphabet:
        raise _corrupt(f"a stored symbol {int(symbols.max())} outside its alphabet of {alphabet}")
    return symbols, end


def _decode_blocks(blob: torch.Tensor, pos: int, n: int, lengths: torch.Tensor, block: int,
                   pack_bits: int) -> tuple[torch.Tensor, int]:
    n_blocks = -(-n // block)
    end = pos + _BLOCK_FIELD * n_blocks
    if blob.numel() < end:
        raise _corrupt("truncated inside its block table")
    fields = blob[pos:end].to(torch.int64).view(n_blocks, _BLOCK_FIELD)
    block_bits = fields[:, 0] | (fields[:, 1] << 8) | (fields[:, 2] << 16)
    pos = end
    total = int(block_bits.sum())
    per_block = torch.full((n_blocks,), block, dtype=torch.int64)
    per_block[-1] = n - (n_blocks - 1) * block
    if bool((block_bits < per_block).any()):  # every code is at least 1 bit long
        raise _corrupt("a block shorter than one bit per symbol")
    nbytes = (total + 7) // 8
    if blob.numel() < pos + nbytes:
        raise _corrupt(f"truncated: {nbytes} payload bytes expected, {blob.numel() - pos} left")
    payload = blob[pos:pos + nbytes]
    if native.has_op("huffman_decode"):  # table-driven C++ (~20x faster); the same symbols, the same errors
        result = torch.ops.idkm_plugin.huffman_decode(payload, block_bits, lengths, n, block, pack_bits)
    else:
        result = _peek_decode(payload.to(torch.int64), lengths, block_bits, n, block)
        if pack_bits:
            result = pack_codes(result, pack_bits)
    return result, pos + nbytes


def _peek_table(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(symbol [2**L], length [2**L], L): the entry at the next L stream bits gives the symbol there.

    Entries no code starts with (an incomplete code) advance by 2**40 bits, so a block that reads one
    cannot end where it should."""
    n = lengths.numel()
    present = torch.nonzero(lengths).reshape(-1)
    order = present[torch.argsort(lengths[present] * (n + 1) + present)]  # canonical order
    longest = int(lengths.max())
    spans = torch.pow(2, longest - lengths[order])
    table_symbol = torch.repeat_interleave(order, spans)
    table_length = torch.repeat_interleave(lengths[order], spans)
    missing = (1 << longest) - table_symbol.numel()
    table_symbol = torch.cat([table_symbol, torch.zeros(missing, dtype=torch.int64)])
    table_length = torch.cat([table_length, torch.full((missing,), 1 << 40, dtype=torch.int64)])
    return table_symbol, table_length, longest


def _peek_decode(payload: torch.Tensor, lengths: torch.Tensor, block_bits: torch.Tensor, n: int,
                 block: int) -> torch.Tensor:
    """All blocks decoded in parallel, one symbol position per step; returns symbols int64 [n]."""
    table_symbol, table_length, longest = _peek_table(lengths)
    nbytes = payload.numel()
    padded = torch.cat([payload, torch.zeros(3, dtype=torch.int64)])
    words = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]  # [nbytes]
    words = torch.cat([words, torch.zeros(1, dtype=torch.int64)])  # index nbytes: reads past the end
    starts = torch.cumsum(block_bits, 0) - block_bits
    n_blocks = block_bits.numel()
    steps = min(block, n)
    last_count = n - (n_blocks - 1) * block
    out = torch.empty(n_blocks, steps, dtype=torch.int64)
    position = starts.clone()
    mask = (1 << longest) - 1
    last_end = None
    for t in range(steps):
        if t == last_count:
            last_end = int(position[-1])
        index = torch.clamp(position >> 3, max=nbytes)
        peek = (words[index] >> (32 - longest - (position & 7))) & mask
        out[:, t] = table_symbol[peek]
        position += table_length[peek]
    if last_end is None:
        last_end = int(position[-1])
    ends = starts + block_bits
    if n_blocks > 1 and not torch.equal(position[:-1], ends[:-1]):
        bad = int(torch.nonzero(position[:-1] != ends[:-1])[0])
        raise _corrupt(f"block {bad} ends at bit {int(position[bad])}, expected {int(ends[bad])}")
    if last_end != int(ends[-1]):
        raise _corrupt(f"its last block ends at bit {last_end}, expected {int(ends[-1])}")
    return out.reshape(-1)[:n]
