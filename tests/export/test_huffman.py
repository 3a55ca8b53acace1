"""Canonical, length-limited Huffman coding: exact round trips, code properties, refused corrupt streams."""
import contextlib
import hashlib
from unittest import mock

import pytest
import torch

from idkm_plugin import native
from idkm_plugin.export import huffman
from idkm_plugin.nn.packing import pack_codes


def _round_trip(symbols, n_symbols, **kwargs):
    blob = huffman.encode(symbols, n_symbols, **kwargs)
    decoded, end = huffman.decode(blob, 0, symbols.numel(), n_symbols)
    assert end == blob.numel()
    assert decoded.dtype == torch.int64 and torch.equal(decoded, symbols.to(torch.int64))
    assert blob.numel() == huffman.encoded_nbytes(torch.bincount(symbols, minlength=n_symbols), **kwargs)
    return blob


def _geometric(n, n_symbols, ratio, seed=0):
    torch.manual_seed(seed)
    probs = torch.tensor([ratio ** i for i in range(n_symbols)], dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), n, replacement=True)


@pytest.mark.parametrize("n,n_symbols", [(1, 2), (7, 2), (4096, 16), (3 * 4096 + 17, 16), (20_000, 257),
                                         (5000, 65_537)])
def test_random_streams_round_trip(n, n_symbols):
    torch.manual_seed(n)
    _round_trip(torch.randint(0, n_symbols, (n,)), n_symbols)


def test_skewed_stream_is_close_to_its_entropy():
    symbols = _geometric(50_000, 16, 0.4)
    blob = _round_trip(symbols, 16)
    probs = torch.bincount(symbols, minlength=16).double() / symbols.numel()
    entropy_bytes = float(-(probs[probs > 0] * probs[probs > 0].log2()).sum()) * symbols.numel() / 8
    assert blob.numel() < 1.03 * entropy_bytes + 64  # Huffman: within 1 bit/symbol, here much closer
    assert blob.numel() < 0.5 * symbols.numel() * 4 / 8  # half of the 4-bit packed size


def test_one_symbol_stream_stores_no_payload():
    symbols = torch.full((100_000,), 5)
    blob = _round_trip(symbols, 16)
    assert blob.numel() == 3 + 1 + 1 + 2  # varints 100000 (3 bytes), 16 (1 byte), mode; 16 lengths of 1 bit


@pytest.mark.parametrize("n_symbols", [1, 4, 65_537])
def test_empty_stream(n_symbols):
    blob = _round_trip(torch.zeros(0, dtype=torch.int64), n_symbols)
    assert blob.numel() == 2 + len(huffman._varint(n_symbols))  # count, alphabet, mode


@pytest.mark.parametrize("n_symbols", [1, 2, 4, 256])
def test_near_uniform_streams_are_stored_at_fixed_width(n_symbols):
    torch.manual_seed(0)
    symbols = torch.randint(0, n_symbols, (1000,))
    blob = _round_trip(symbols, n_symbols)
    width = (n_symbols - 1).bit_length()
    mode_at = len(huffman._varint(1000)) + len(huffman._varint(n_symbols))
    assert blob[mode_at] & 7 == 0  # stored
    assert blob.numel() == mode_at + 1 + (1000 * width + 7) // 8


@pytest.mark.parametrize("max_length", [9, 12, 16])
def test_length_limit_is_respected_and_code_complete(max_length):
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = torch.tensor(fib)  # unlimited Huffman would give a 29-bit code
    lengths = huffman.code_lengths(counts, max_length)
    assert int(lengths.max()) == max_length and int(lengths.min()) >= 1
    assert float((2.0 ** -lengths.double()).sum()) == 1.0  # a complete prefix code
    assert torch.all(lengths[:-1] >= lengths[1:])  # more frequent symbols never get longer codes
    symbols = torch.repeat_interleave(torch.arange(30), torch.tensor(fib).clamp(max=500))
    _round_trip(symbols[torch.randperm(symbols.numel())], 30, max_length=max_length)


def test_unlimited_lengths_are_huffman_optimal():
    counts = torch.tensor([45, 13, 12, 16, 9, 5])  # the textbook example: a=1, b/c/d=3, e/f=4
    assert huffman.code_lengths(counts).tolist() == [1, 3, 3, 3, 4, 4]


def test_codes_are_canonical_and_prefix_free():
    counts = torch.bincount(_geometric(20_000, 40, 0.7), minlength=40)
    counts[7] = 0  # an absent symbol gets no code
    lengths = huffman.code_lengths(counts)
    codes = huffman.canonical_codes(lengths)
    assert lengths[7] == 0
    order = sorted((int(lengths[s]), s) for s in range(40) if lengths[s] > 0)
    for (len_a, a), (len_b, b) in zip(order, order[1:]):  # next code = (code + 1) << (length difference)
        assert int(codes[b]) == (int(codes[a]) + 1) << (len_b - len_a)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for _, s in order]
    assert not any(w2.startswith(w1) for i, w1 in enumerate(words) for w2 in words[i + 1:])


def test_too_many_symbols_for_the_limit_is_refused():
    with pytest.raises(ValueError, match="do not fit in codes of at most 4 bits"):
        huffman.code_lengths(torch.ones(17, dtype=torch.int64), 4)


def test_out_of_range_symbols_are_refused():
    with pytest.raises(ValueError, match=r"symbols must lie in \[0, 4\)"):
        huffman.encode(torch.tensor([0, 4]), 4)


def test_streams_concatenate():
    a, b = _geometric(5000, 8, 0.5), _geometric(300, 3, 0.2, seed=1)
    blob = torch.cat([huffman.encode(a, 8), huffman.encode(b, 3)])
    first, end = huffman.decode(blob)
    second, end = huffman.decode(blob, end)
    assert torch.equal(first, a) and torch.equal(second, b) and end == blob.numel()


def test_wrong_expectations_and_truncation_are_refused():
    symbols = _geometric(10_000, 16, 0.6)
    blob = huffman.encode(symbols, 16)
    with pytest.raises(ValueError, match="holds 10000 symbols, expected 9999"):
        huffman.decode(blob, 0, 9999)
    with pytest.raises(ValueError, match="alphabet has 16 symbols, expected 17"):
        huffman.decode(blob, 0, None, 17)
    with pytest.raises(ValueError, match="holds 10000 symbols, more than the 9000 possible"):
        huffman.decode(blob, 0, max_count=9000)
    for cut in (0, 5, 14, 20, 30, blob.numel() - 1):
        with pytest.raises(ValueError, match="corrupted Huffman stream"):
            huffman.decode(blob[:cut])


def test_corrupted_block_table_is_refused():
    symbols = _geometric(3 * 4096, 16, 0.6)
    blob = huffman.encode(symbols, 16).clone()
    table_end = len(huffman._header(3 * 4096, 16, 4)) + 8  # header + 16 lengths of 4 bits
    blob[table_end] ^= 0x01  # first block's bit count off by one: block 0 cannot end where block 1 starts
    with pytest.raises(ValueError, match="corrupted Huffman stream"):
        huffman.decode(blob)


# --- the native op (idkm_plugin/csrc/huffman.cpp) against the PyTorch path and against the format's history ---

native_built = pytest.mark.skipif(not native.has_op("huffman_decode"), reason="idkm_plugin._C is not built")


def _stream(n, n_symbols, skew, seed):
    """n symbols in [0, n_symbols), symbol s with probability proportional to skew**s, from integer arithmetic
    only (a hash of the position), so the stream and its encoding never change with torch's RNG."""
    i = torch.arange(n, dtype=torch.int64) + seed * 1_000_003
    x = i * 6364136223846793005 + 1442695040888963407  # int64 arithmetic wraps
    x = x ^ (x >> 33)
    x = x * -49064778989728563
    x = x ^ (x >> 29)
    u = ((x >> 11) & ((1 << 52) - 1)).double() / 2.0 ** 52
    cdf = torch.cumsum(torch.full((n_symbols,), skew, dtype=torch.float64) ** torch.arange(n_symbols), 0)
    return torch.searchsorted(cdf / cdf[-1], u, right=True).clamp_(max=n_symbols - 1)


@contextlib.contextmanager
def _torch_path():
    """Run huffman as if the native ops were not built (the fallback)."""
    with mock.patch.object(native, "has_op", lambda name: False):
        yield


def _mode(blob, n, n_symbols):
    return int(blob[len(huffman._varint(n)) + len(huffman._varint(n_symbols))])


# (bits, N, skew, SHA-256 prefix of the blob) as the PyTorch-only implementation (before the native op) wrote them.
GOLDEN = [
    (1, 5000, 0.2, "cfa6f2f78b1d036799d3381062d584b5"),  # stored
    (2, 12305, 0.5, "f1c6e329817c1a37734f76f35201abca"),
    (3, 20000, 0.6, "64ea9d190ec3083d4995bc8a6ab47a41"),
    (4, 41083, 0.7, "5aa389be4775bbe5832daab7df34f8aa"),
    (5, 4096, 0.8, "562ba0a27ec3b1fc0989d504c4a91189"),
    (8, 50000, 0.97, "734f48f769c6ca01edd51a05580e581a"),  # codes up to 16 bits (past the 11-bit lookup)
    (12, 60000, 0.995, "d66a762a2d60a083e913348564d527b9"),
    (16, 200000, 0.997, "873e77c2ea306fc93e781b739b57885b"),
]


@pytest.mark.parametrize("bits,n,skew,digest", GOLDEN)
def test_blobs_are_byte_identical_to_the_format_history(bits, n, skew, digest):
    symbols = _stream(n, 1 << bits, skew, bits)
    blob = huffman.encode(symbols, 1 << bits)  # native where built
    assert hashlib.sha256(blob.numpy().tobytes()).hexdigest()[:32] == digest
    with _torch_path():
        assert torch.equal(huffman.encode(symbols, 1 << bits), blob)
        old, end_old = huffman.decode(blob)
    new, end = huffman.decode(blob)
    assert torch.equal(new, symbols) and torch.equal(old, symbols) and end == end_old == blob.numel()
    packed, end = huffman.decode_packed(blob, bits)
    assert torch.equal(packed, pack_codes(symbols, bits)) and end == blob.numel()


def _random_probs(n, n_symbols, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(n_symbols, generator=generator, dtype=torch.float64) ** 6  # a few frequent symbols
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def _kmeans_gaussian(n, n_symbols, seed):
    """Gaussian weights rounded to n_symbols evenly spaced centroids: the bell-shaped histogram of a layer."""
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.linspace(-3, 3, n_symbols)
    return torch.bucketize(torch.randn(n, generator=generator), (centroids[1:] + centroids[:-1]) / 2)


@native_built
@pytest.mark.parametrize("kind", ["random", "skewed", "gaussian"])
@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_native_equals_the_torch_path(bits, kind):
    n_symbols = 1 << bits
    n = 9 * 4096 + 1001 if bits <= 8 else 120_000  # 10 blocks: interleaved lanes, one by one, the padded tail
    symbols = {"random": lambda: _random_probs(n, n_symbols, bits),
               "skewed": lambda: _stream(n, n_symbols, 0.5 ** (1 / min(n_symbols / 16, 64)), bits),
               "gaussian": lambda: _kmeans_gaussian(n, n_symbols, bits)}[kind]()
    blob = huffman.encode(symbols, n_symbols)
    with _torch_path():
        assert torch.equal(huffman.encode(symbols, n_symbols), blob)
        old, _ = huffman.decode(blob)
    new, end = huffman.decode(blob)
    assert end == blob.numel() and torch.equal(new, symbols) and torch.equal(old, symbols)
    assert torch.equal(huffman.decode_packed(blob, bits)[0], pack_codes(symbols, bits))
    if bits >= 2 and kind == "skewed":
        assert _mode(blob, n, n_symbols) & 7  # Huffman-coded: the native op ran


@native_built
@pytest.mark.parametrize("max_length", [11, 12, 16, 24])
def test_native_decodes_codes_up_to_24_bits(max_length):
    fib = [1, 1]
    while len(fib) < 26:
        fib.append(fib[-1] + fib[-2])
    counts = torch.tensor(fib)  # Huffman lengths 1..25, limited to max_length
    symbols = torch.repeat_interleave(torch.arange(26), counts)
    symbols = symbols[torch.randperm(symbols.numel(), generator=torch.Generator().manual_seed(0))]
    blob = huffman.encode(symbols, 26, max_length=max_length)
    assert int(huffman.code_lengths(counts, max_length).max()) == max_length
    with _torch_path():
        assert torch.equal(huffman.encode(symbols, 26, max_length=max_length), blob)
        assert torch.equal(huffman.decode(blob)[0], symbols)
    assert torch.equal(huffman.decode(blob)[0], symbols)
    assert torch.equal(huffman.decode_packed(blob, 5)[0], pack_codes(symbols, 5))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 4095, 4096, 4097, 4 * 4096, 5 * 4096 + 3])
@pytest.mark.parametrize("use_native", [True, False])
def test_stream_lengths_around_block_and_group_edges(n, use_native):
    if use_native and not native.has_op("huffman_decode"):
        pytest.skip("idkm_plugin._C is not built")
    symbols = _stream(n, 8, 0.4, n)
    with contextlib.nullcontext() if use_native else _torch_path():
        blob = _round_trip(symbols, 8)
        for bits in (3, 16) if n > 4096 else (3, 4, 7, 16):
            packed, end = huffman.decode_packed(blob, bits)
            assert torch.equal(packed, pack_codes(symbols, bits)) and end == blob.numel()


@pytest.mark.parametrize("n,symbol,bits", [(1, 0, 1), (5, 1, 1), (3, 5, 3), (100_001, 13, 4), (17, 9, 16)])
def test_one_symbol_stream_packs_like_pack_codes(n, symbol, bits):
    symbols = torch.full((n,), symbol)
    blob = _round_trip(symbols, 1 << bits)
    packed, end = huffman.decode_packed(blob, bits)
    assert torch.equal(packed, pack_codes(symbols, bits)) and end == blob.numel()


def test_decode_packed_refuses_a_wider_alphabet():
    blob = huffman.encode(_stream(1000, 20, 0.5, 0), 20)
    with pytest.raises(ValueError, match="alphabet of 20 symbols does not fit in 4-bit codes"):
        huffman.decode_packed(blob, 4)
    with pytest.raises(ValueError, match="bits=17 is not allowed"):
        huffman.decode_packed(blob, 17)


def test_the_torch_path_is_taken_without_the_native_op():
    symbols = _stream(3 * 4096, 16, 0.7, 1)
    with _torch_path(), mock.patch.object(huffman, "_peek_decode", wraps=huffman._peek_decode) as peek, \
            mock.patch.object(huffman, "_encode_payload", wraps=huffman._encode_payload) as payload:
        _round_trip(symbols, 16)
    assert peek.call_count == 1 and payload.call_count == 1


def _with_lengths(blob, n, n_symbols, lengths):
    """The blob with its code-length table replaced (same width)."""
    start = len(huffman._header(n, n_symbols, 0))
    width = _mode(blob, n, n_symbols) & 7
    table = pack_codes(torch.tensor(lengths), width)
    return torch.cat([blob[:start], table, blob[start + table.numel():]])


@pytest.mark.parametrize("use_native", [True, False])
def test_an_incomplete_code_reading_a_missing_codeword_is_refused(use_native):
    if use_native and not native.has_op("huffman_decode"):
        pytest.skip("idkm_plugin._C is not built")
    symbols = _stream(5000, 3, 0.3, 2)
    blob = huffman.encode(symbols, 3)
    assert huffman.code_lengths(torch.bincount(symbols)).tolist() == [1, 2, 2]
    broken = _with_lengths(blob, 5000, 3, [1, 2, 3])  # code 111 is no codeword; 11 + a 1 bit now reads it
    with contextlib.nullcontext() if use_native else _torch_path():
        with pytest.raises(ValueError, match="corrupted Huffman stream"):
            huffman.decode(broken)
        with pytest.raises(ValueError, match="corrupted Huffman stream"):
            huffman.decode_packed(broken, 2)


def _corrupted(blob, generator, cuts, flips):
    """`cuts` truncations, one extension by 9 zero bytes, `flips` copies with 3 bytes XOR-ed."""
    cases = [blob[:cut] for cut in torch.randint(0, blob.numel(), (cuts,), generator=generator).tolist()]
    cases.append(torch.cat([blob, torch.zeros(9, dtype=torch.uint8)]))
    for _ in range(flips):
        bad = blob.clone()
        at = torch.randint(0, blob.numel(), (3,), generator=generator)
        bad[at] ^= torch.randint(1, 256, (3,), generator=generator).to(torch.uint8)
        cases.append(bad)
    return cases


def _outcome(blob):
    try:
        return huffman.decode(blob)
    except ValueError as error:
        assert "corrupted Huffman stream" in str(error)
        return None


@native_built
def test_random_corruption_is_refused_or_decoded_as_the_torch_path_does():
    """Flipped bytes, cut or extended blobs: both paths refuse the same streams and decode the rest the same."""
    generator = torch.Generator().manual_seed(0)
    for bits, n, cases in ((2, 4 * 4096 + 9, 8), (8, 1500, 15), (12, 900, 15)):  # the torch path: 1 step per symbol
        symbols = _kmeans_gaussian(n, 1 << bits, bits)
        for bad in _corrupted(huffman.encode(symbols, 1 << bits), generator, cases // 3, cases - cases // 3):
            mine = _outcome(bad)
            with _torch_path():
                theirs = _outcome(bad)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert torch.equal(mine[0], theirs[0]) and mine[1] == theirs[1]


@native_built
def test_the_native_decoder_survives_heavy_corruption():
    """Many corrupted large streams through the native op alone: ValueError, or symbols of the right count."""
    generator = torch.Generator().manual_seed(1)
    for bits, n in ((2, 40 * 4096 + 5), (4, 9 * 4096), (8, 30_000), (16, 60_000)):
        symbols = _stream(n, 1 << bits, 0.5 ** (1 / min((1 << bits) / 16, 64)), bits)
        blob = huffman.encode(symbols, 1 << bits)
        assert _mode(blob, n, 1 << bits) & 7
        for bad in _corrupted(blob, generator, 40, 160):
            result = _outcome(bad)
            assert result is None or (result[0].numel() == n and int(result[0].max()) < 1 << bits)


@native_built
def test_the_native_op_checks_every_length():
    decode, encode = torch.ops.idkm_plugin.huffman_decode, torch.ops.idkm_plugin.huffman_encode
    lengths = torch.tensor([1, 2, 2])
    block_bits, payload = encode(torch.tensor([0, 1, 2, 2]), lengths, 4096)
    assert block_bits.tolist() == [7] and payload.tolist() == [0b01011110]
    assert decode(payload, block_bits, lengths, 4, 4096, 0).tolist() == [0, 1, 2, 2]
    assert decode(payload, block_bits, lengths, 4, 4096, 2).tolist() == [0b10100100]
    refused = [
        (lambda: decode(payload, block_bits, torch.tensor([1, 1, 1]), 4, 4096, 0), "prefix code"),
        (lambda: decode(payload, block_bits, torch.tensor([1, 25, 2]), 4, 4096, 0), "code length 25"),
        (lambda: decode(payload, block_bits, torch.tensor([0, 0, 0]), 4, 4096, 0), "no symbol has a code"),
        (lambda: decode(payload[:0], block_bits, lengths, 4, 4096, 0), "hold 7 bits, the payload 0 bytes"),
        (lambda: decode(payload, torch.tensor([3]), lengths, 4, 4096, 0), "block 0 holds 3 bits for 4 symbols"),
        (lambda: decode(payload, torch.tensor([6]), lengths, 4, 4096, 0), "block 0 ends at bit 7, expected 6"),
        (lambda: decode(payload, torch.tensor([7, 1]), lengths, 4, 4096, 0), "2 block lengths for 4 symbols"),
        (lambda: decode(payload, block_bits, lengths, 4, 4096, 1), "3 symbols do not fit in codes of 1 bits"),
        (lambda: encode(torch.tensor([0, 3]), lengths, 4096), "symbol 3 at position 1 has no code"),
        (lambda: encode(torch.tensor([0, 1]), torch.tensor([1, 0, 1]), 4096), "symbol 1 at position 1 has no code"),
    ]
    for call, message in refused:
        with pytest.raises(ValueError, match=message):
            call()
