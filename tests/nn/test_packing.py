"""Bit packing: exact round trip for 1..16 bits, and the little-endian bit layout."""
import pytest
import torch

from idkm_plugin.export import pack_codes as exported_pack_codes
from idkm_plugin.nn import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1000, 1003])
def test_pack_unpack_round_trip_is_exact(bits, count):
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits))
    codes[0] = (1 << bits) - 1  # the extreme value
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def bit_by_bit(codes: torch.Tensor, bits: int) -> bytes:
    """The layout spelled out: code i is stream bits [i*bits, (i+1)*bits), stream bit j is bit j%8 of byte j//8."""
    stream = [(int(c) >> b) & 1 for c in codes for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[8 * i + b] << b for b in range(8)) for i in range(len(stream) // 8))


@pytest.mark.parametrize("bits", range(1, 17))
def test_layout_is_little_endian_bit_stream(bits):
    codes = torch.randint(0, 1 << bits, (21,), generator=torch.Generator().manual_seed(100 + bits))
    assert bytes(pack_codes(codes, bits).tolist()) == bit_by_bit(codes, bits)


def test_examples_of_the_layout():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([0xF, 0x1]), 4).tolist() == [0x1F]
    assert pack_codes(torch.tensor([0x123]), 12).tolist() == [0x23, 0x01]


def test_export_re_exports_the_packing_functions():
    assert exported_pack_codes is pack_codes


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\) for bits=2; got range \[0, 4\]"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="bits=17 is not allowed"):
        pack_codes(torch.tensor([0]), 17)


def test_unpack_rejects_a_wrong_byte_count():
    with pytest.raises(ValueError, match="3 bytes do not hold 7 codes of 4 bits"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 7)
