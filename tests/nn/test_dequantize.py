"""The table-lookup dequantization equals the plain per-code LUT gather, bit for bit."""
import pytest
import torch

from idkm_plugin.nn import dequantize_packed, pack_codes
from idkm_plugin.nn.dequantize import codes_per_symbol


def reference(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """codes [g, m], lut [g, k, d] -> lut[codes] flattened [g * m * d]."""
    return torch.gather(lut, 1, codes.unsqueeze(-1).expand(-1, -1, lut.shape[-1])).reshape(-1)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_equals_the_per_code_gather(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    for d in (1, 2, 3, 4):
        for groups, m in ((1, 8), (1, 13), (3, 48), (2, 7), (4, 6)):
            if (1 << bits) * d * groups > 1 << 18:
                continue
            codes = torch.randint(0, 1 << bits, (groups, m), generator=gen)
            lut = torch.randn(groups, 1 << bits, d, generator=gen).to(dtype)
            out = dequantize_packed(pack_codes(codes, bits), bits, groups * m, lut, dtype)
            assert out.dtype == dtype
            assert torch.equal(out, reference(codes, lut)), (bits, d, groups, m)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_lut_bit_patterns_are_copied_exactly(bits):
    """-0.0, inf and NaN payloads survive: table rows are copied as raw bytes."""
    k = 1 << bits
    pattern = torch.tensor([0x80000000, 0x7F800000, 0x7FC00001, 0xFFC12345, 0x00000001], dtype=torch.int64)
    lut_bits = pattern.repeat(k // len(pattern) + 1)[:k].to(torch.int32)
    lut = lut_bits.view(torch.float32).view(1, k, 1)
    codes = torch.arange(k).repeat(5).view(1, -1)
    out = dequantize_packed(pack_codes(codes, bits), bits, codes.numel(), lut, torch.float32)
    assert torch.equal(out.view(torch.int32), lut_bits[codes.view(-1)])


def test_lut_dtype_converts_before_lookup():
    codes = torch.randint(0, 16, (1, 64))
    lut = torch.randn(1, 16, 1).to(torch.float16)
    out = dequantize_packed(pack_codes(codes, 4), 4, 64, lut, torch.float32)
    assert torch.equal(out, reference(codes, lut).float())


def test_symbol_width_choice():
    assert codes_per_symbol(4, 1, 4) == 2  # one byte = two codes
    assert codes_per_symbol(1, 1, 4) == 8
    assert codes_per_symbol(3, 1, 4) == 4  # 12-bit symbols
    assert codes_per_symbol(8, 1, 4) == 2  # byte pairs
    assert codes_per_symbol(12, 1, 4) == 1  # above 8 bits: gather LUT rows
    assert codes_per_symbol(4, 64, 4) == 1  # rows too wide for a table


@pytest.mark.parametrize("bits", range(1, 17))
def test_portable_decode_for_exported_programs_is_identical(bits):
    from idkm_plugin.nn.portable_dequantize import dequantize_portable, unpack_codes_portable

    gen = torch.Generator().manual_seed(200 + bits)
    for count in (1, 7, 8, 9, 1003):
        codes = torch.randint(0, 1 << bits, (count,), generator=gen)
        assert torch.equal(unpack_codes_portable(pack_codes(codes, bits), bits, count), codes)
    for groups, m, d in ((1, 24, 1), (3, 16, 2), (2, 7, 3)):
        codes = torch.randint(0, 1 << bits, (groups, m), generator=gen)
        lut = torch.randn(groups, 1 << bits, d, generator=gen)
        packed = pack_codes(codes, bits)
        assert torch.equal(dequantize_portable(packed, bits, groups * m, lut, torch.float32, (groups, m * d)),
                           dequantize_packed(packed, bits, groups * m, lut, torch.float32, (groups, m * d)))
