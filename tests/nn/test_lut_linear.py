"""lut_linear (the LUT matmul on packed codes) against F.linear on the decoded weight, on every path:
the native op's AVX-512, AVX2 and portable kernels (each forced where the CPU has it) and the PyTorch fallback."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from idkm_plugin import native
from idkm_plugin.nn import lut_linear as lut_module
from idkm_plugin.nn.dequantize import apply_packed_mask, dequantize_packed
from idkm_plugin.nn.lut_linear import lut_linear, lut_linear_reference, prefers_lut_kernel
from idkm_plugin.nn.packing import pack_codes

HAS_OP = native.has_op("lut_linear")
needs_op = pytest.mark.skipif(not HAS_OP, reason="the native ops are not built")
OUT = 6  # LUT groups 1, 2 and 6 (one per row) divide it
M = 69  # codes per row: odd, so 3/5/7-bit rows start mid-byte, and 69 = 4 * 16 + 5 leaves a lane-masked tail
LUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


def isas() -> list[int]:
    """The kernels this CPU runs: 0 portable, 1 AVX2, 2 AVX-512."""
    return list(torch.ops.idkm_plugin.lut_linear_isas()) if HAS_OP else []


def make_layer(bits: int, dim: int, groups: int, lut_dtype: torch.dtype, scaled: bool, pruned: bool, seed: int = 0,
               in_features: int = 0):
    """A random palettized [OUT, in_features or M * dim] weight in the stored layout -> (kwargs for lut_linear,
    dense W float64)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = OUT, in_features or M * dim
    count = out * inp // dim
    codes = torch.randint(0, 1 << bits, (groups, count // groups), generator=gen)
    keep = torch.rand(groups, count // groups, generator=gen) > 0.3
    mask = None
    if pruned:
        codes = codes.masked_fill(~keep, 0)  # pruned codes are stored as 0; LUT row 0 is not 0
        mask = pack_codes(keep.long(), 1)
    lut_scale = None
    if lut_dtype == torch.int8:
        lut = torch.randint(-127, 128, (groups, 1 << bits, dim), generator=gen, dtype=torch.int8)
        lut_scale = torch.rand(groups, generator=gen) * 0.1 + 0.01
        decoded_lut = lut.double() * lut_scale.double().view(-1, 1, 1)
    else:
        lut = torch.randn(groups, 1 << bits, dim, generator=gen).to(lut_dtype)
        decoded_lut = lut.double()
    channel_scale = (torch.rand(out, generator=gen) + 0.5).to(torch.float16) if scaled else None
    packed = pack_codes(codes, bits)
    weight = dequantize_packed(packed, bits, count, decoded_lut, torch.float64, (out, inp))
    if mask is not None:
        weight = apply_packed_mask(weight, mask, count)
    if channel_scale is not None:
        weight = weight * channel_scale.double().view(-1, 1)
    kwargs = dict(codes=packed, lut=lut, bits=bits, out_features=out, in_features=inp,
                  channel_scale=channel_scale, lut_scale=lut_scale, mask=mask,
                  bias=torch.randn(out, generator=gen))
    return kwargs, weight


def dense_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), weight, bias.double())


def native_op(x: torch.Tensor, kw: dict, isa: int) -> torch.Tensor:
    return torch.ops.idkm_plugin.lut_linear(x, kw["codes"], kw["lut"], kw["bits"], kw["out_features"],
                                            kw["in_features"], kw["channel_scale"], kw["lut_scale"], kw["mask"],
                                            kw["bias"], isa)


def call(x: torch.Tensor, kw: dict) -> torch.Tensor:
    kw = dict(kw)
    return lut_linear(x, kw.pop("codes"), kw.pop("lut"), kw.pop("bits"), kw.pop("out_features"),
                      kw.pop("in_features"), **kw)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=2e-3, msg=lambda m: f"{what}: {m}")


@needs_op
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [1, 2, 4, 16, 3])  # 3: not a power of two (the portable kernel takes it)
def test_every_kernel_matches_the_dense_reference(bits, dim):
    """Every groups x LUT dtype x channel scale x mask combination, batch 1, 3 and 13 (8 + 4 + 1 blocks)."""
    for groups, lut_dtype, scaled, pruned in itertools.product((1, 2, OUT), LUT_DTYPES, (False, True), (False, True)):
        kw, weight = make_layer(bits, dim, groups, lut_dtype, scaled, pruned)
        for batch in (1, 3, 13):
            x = torch.randn(batch, kw["in_features"])
            expected = dense_reference(x, weight, kw["bias"])
            for isa in isas():
                what = f"isa={isa} bits={bits} dim={dim} groups={groups} lut={lut_dtype} scale={scaled} " \
                       f"mask={pruned} batch={batch}"
                close(native_op(x, kw, isa), expected, what)


@needs_op
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [1, 2, 4, 3])
@pytest.mark.parametrize("block", [96, 32, 16, 12, 8])  # 12 (and d = 3) is not a whole vector: the portable kernel
def test_block_scales_match_the_dense_reference_on_every_kernel(bits, dim, block):
    """channel_scale [out, blocks]: each block of `block` weights of a row times its own scale."""
    gen = torch.Generator().manual_seed(bits * 100 + dim * 10 + block)
    inp = 192 * dim  # 192: divisible by every block above
    for groups, lut_dtype, pruned in itertools.product((1, OUT), (torch.float32, torch.int8), (False, True)):
        kw, weight = make_layer(bits, dim, groups, lut_dtype, False, pruned, seed=bits + dim, in_features=inp)
        scale = (torch.rand(OUT, inp // block, generator=gen) + 0.5).to(torch.float16)
        kw["channel_scale"] = scale
        weight = weight * scale.double().repeat_interleave(block, 1)
        for batch in (1, 3, 13):
            x = torch.randn(batch, inp, generator=gen)
            expected = dense_reference(x, weight, kw["bias"])
            for isa in isas():
                close(native_op(x, kw, isa), expected, f"isa={isa} groups={groups} lut={lut_dtype} mask={pruned} "
                                                       f"batch={batch}")
            close(call(x, kw), expected, "lut_linear")


@needs_op
def test_block_scales_of_another_layout_are_refused():
    kw, _ = make_layer(4, 1, 1, torch.float32, False, False)
    kw["channel_scale"] = torch.ones(OUT, 4)  # 4 does not divide in_features = 69
    with pytest.raises(RuntimeError, match="blocks dividing in_features=69"):
        native_op(torch.randn(1, M), kw, -1)


@pytest.mark.parametrize("bits,dim,groups", [(1, 1, 1), (3, 1, OUT), (4, 2, 2), (5, 4, 1), (8, 1, 2), (7, 3, OUT)])
def test_fallback_matches_the_dense_reference_and_the_native_op(bits, dim, groups, monkeypatch):
    kw, weight = make_layer(bits, dim, groups, torch.int8, True, True)
    x = torch.randn(2, 5, kw["in_features"])  # leading dims are kept
    native_y = call(x, kw) if HAS_OP else None
    monkeypatch.setattr(lut_module, "_native_op", lambda: None)
    fallback_y = call(x, kw)
    assert fallback_y.shape == (2, 5, OUT)
    close(fallback_y, dense_reference(x, weight, kw["bias"]), "fallback")
    if native_y is not None:
        torch.testing.assert_close(native_y, fallback_y, rtol=1e-5, atol=1e-4)


@needs_op
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bfloat16_activations(bits):
    kw, _ = make_layer(bits, 1, OUT, torch.float16, True, True)
    x = torch.randn(4, kw["in_features"]).to(torch.bfloat16)
    y = call(x, kw)
    assert y.dtype == torch.bfloat16
    expected = lut_linear_reference(x.float(), **kw).to(torch.bfloat16)  # decode + F.linear in float32, rounded
    torch.testing.assert_close(y, expected, rtol=1.6e-2, atol=1e-2)


@needs_op
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim,inp", [(1, 4096), (1, 384), (2, 512), (4, 1024)])
def test_wide_rows_take_the_fast_loops(bits, dim, inp):
    """Rows of whole bytes and whole unrolled blocks (the benchmark's layout, few rows): the tight AVX-512 loops
    (byte-wise for 1/2/4 bits, x read in permuted order) and the lane-masked ones agree with the reference."""
    gen = torch.Generator().manual_seed(bits)
    out = 5
    codes = torch.randint(0, 1 << bits, (out, inp // dim), generator=gen)
    lut = torch.randn(out, 1 << bits, dim, generator=gen)
    packed = pack_codes(codes, bits)
    weight = dequantize_packed(packed, bits, out * inp // dim, lut.double(), torch.float64, (out, inp))
    for batch in (1, 2, 3, 4, 8, 9):
        x = torch.randn(batch, inp, generator=gen)
        for isa in isas():
            y = torch.ops.idkm_plugin.lut_linear(x, packed, lut, bits, out, inp, None, None, None, None, isa)
            close(y, F.linear(x.double(), weight), f"isa={isa} batch={batch}")


@needs_op
def test_empty_batch_and_meta_shapes():
    kw, _ = make_layer(4, 1, 1, torch.float32, False, False)
    assert call(torch.randn(0, kw["in_features"]), kw).shape == (0, OUT)
    meta = torch.empty(3, kw["in_features"], device="meta")
    y = torch.ops.idkm_plugin.lut_linear(meta, kw["codes"].to("meta"), kw["lut"].to("meta"), 4, OUT,
                                         kw["in_features"])
    assert y.shape == (3, OUT) and y.device.type == "meta"


def test_clear_errors():
    kw, _ = make_layer(3, 1, 1, torch.float32, False, False)
    x = torch.randn(1, kw["in_features"])
    with pytest.raises(ValueError, match="packed uint8"):
        call(x, {**kw, "codes": kw["codes"][:-1]})
    with pytest.raises(ValueError, match="in_features"):
        call(torch.randn(1, 7), kw)
    with pytest.raises(ValueError, match="bits=9"):
        call(x, {**kw, "bits": 9})
    with pytest.raises(ValueError, match="does not match bits"):
        call(x, {**kw, "bits": 2})


def test_prefers_the_kernel_only_at_small_batch(monkeypatch):
    x1, x512 = torch.randn(1, 4096), torch.randn(512, 4096)
    if HAS_OP:
        assert prefers_lut_kernel(x1, 4096, 4096, 4)
        assert prefers_lut_kernel(torch.randn(2, 9, 4096), 4096, 4096, 4)  # 18 rows: a short prompt
    assert not prefers_lut_kernel(x512, 4096, 4096, 4)
    assert not prefers_lut_kernel(x1, 4096, 4096, 9)  # the kernel's bits are 1..8
    monkeypatch.setattr(lut_module, "_native_op", lambda: None)
    assert not prefers_lut_kernel(x1, 4096, 4096, 4)
