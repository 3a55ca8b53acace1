"""Canonical, length-limited Huffman coding: exact round trips, code properties, refused corrupt streams."""
import pytest
import torch

from idkm_plugin.export import huffman


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
