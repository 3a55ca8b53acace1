"""The dense-weight cache: same outputs, reused while valid, rebuilt whenever codes / LUT change."""
import copy

import pytest
import torch
from torch import nn

from idkm_plugin.nn import PalettizedConv2d, PalettizedEmbedding, PalettizedLinear, PalettizedWeight, pack_codes


def make_linear(bits=4, cache_weight=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (1, 6 * 16), generator=gen)
    lut = torch.randn(1, 1 << bits, 1, generator=gen)
    return PalettizedLinear(16, 6, codes, lut, bits, torch.randn(6, generator=gen), cache_weight=cache_weight)


def test_cached_and_uncached_outputs_are_equal():
    x = torch.randn(3, 16)
    on, off = make_linear(), make_linear(cache_weight=False)
    assert torch.equal(on(x), off(x)) and torch.equal(on(x), off(x))
    assert torch.equal(on.dense_weight(), off.dequantize_weight())


def test_cache_is_reused_while_valid():
    m = make_linear()
    first = m.dense_weight()
    assert m.dense_weight() is first
    m(torch.randn(2, 16))
    assert m.dense_weight() is first


def test_cache_off_keeps_nothing():
    m = make_linear(cache_weight=False)
    m(torch.randn(2, 16))
    assert m._cache is None and m.dense_weight() is not m.dense_weight()


def test_cache_is_in_no_state_dict_or_buffer_list():
    m = make_linear()
    m(torch.randn(2, 16))
    assert set(m.state_dict()) == {"codes", "lut", "bias"}
    assert [name for name, _ in m.named_buffers()] == ["codes", "lut"]


def test_load_state_dict_invalidates():
    m, other = make_linear(seed=0), make_linear(seed=1)
    x = torch.randn(2, 16)
    m(x)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), other(x))


def test_in_place_writes_to_lut_and_codes_invalidate():
    m = make_linear()
    x = torch.randn(2, 16)
    m(x)
    with torch.no_grad():
        m.lut.mul_(2)
    assert torch.equal(m.dense_weight(), m.dequantize_weight())
    assert torch.equal(m(x), nn.functional.linear(x, m.dequantize_weight(), m.bias))
    m.codes[0] ^= 0xFF
    assert torch.equal(m.dense_weight(), m.dequantize_weight())


def test_assigning_codes_or_lut_invalidates():
    m = make_linear()
    m(torch.randn(2, 16))
    m.codes = pack_codes(torch.zeros(96, dtype=torch.long), 4)
    assert torch.equal(m.dense_weight(), m.lut[0, 0, 0].expand(6, 16))
    m.lut = torch.ones(1, 16, 1)
    assert torch.equal(m.dense_weight(), torch.ones(6, 16))


def test_to_invalidates():
    m = make_linear()
    before = m.dense_weight()
    m.to(torch.device("cpu"))
    assert m._cache is None
    assert m.dense_weight() is not before and torch.equal(m.dense_weight(), before)
    m.double()  # the LUT becomes float64; the weight is rebuilt from it (in the layer's dtype)
    assert m._cache is None


def test_cache_built_in_inference_mode_works_with_autograd_later():
    m = make_linear()
    with torch.inference_mode():
        m(torch.randn(2, 16))
    x = torch.randn(2, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and not m.dense_weight().is_inference()


def test_deepcopy_and_all_kinds_cache():
    conv = PalettizedConv2d((4, 2, 3, 3), torch.randint(0, 4, (1, 72)), torch.randn(1, 4, 1), 2, None, 1, 1, 1, 1)
    emb = PalettizedEmbedding(10, 4, torch.randint(0, 8, (1, 40)), torch.randn(1, 8, 1), 3)
    weight = PalettizedWeight(torch.randint(0, 2, (1, 12)), torch.randn(1, 2, 1), 1, (3, 4), torch.float32)
    for module, x in ((conv, (torch.randn(1, 2, 5, 5),)), (emb, (torch.tensor([1, 2]),)), (weight, ())):
        out = module(*x)
        assert module._cache is not None
        clone = copy.deepcopy(module)
        assert torch.equal(clone(*x), out)


def test_torch_export_keeps_the_lut_lookup_not_the_cache():
    m = make_linear()
    x = torch.randn(2, 16)
    m(x)  # cache populated
    ep = torch.export.export(m, (x,))
    dense_shaped = [t for t in list(ep.state_dict.values()) + list(ep.constants.values())
                    if isinstance(t, torch.Tensor) and tuple(t.shape) == (6, 16)]
    assert dense_shaped == []
    assert torch.equal(ep.module()(x), m(x))


def test_lut_being_trained_is_not_cached():
    m = make_linear()
    m.lut.requires_grad_(True)
    m(torch.randn(2, 16)).sum().backward()
    assert m.lut.grad is not None and m._cache is None
    m(torch.randn(2, 16)).sum().backward()  # a second backward through a fresh weight works


@pytest.mark.parametrize("bad", ["codes", "lut"])
def test_constructor_validates_codes_and_lut(bad):
    codes, lut = torch.randint(0, 4, (1, 12)), torch.randn(1, 4, 1)
    if bad == "codes":
        with pytest.raises(ValueError, match="5 packed bytes do not hold the 12 codes"):
            PalettizedLinear(4, 3, torch.zeros(5, dtype=torch.uint8), lut, 2)
    else:
        with pytest.raises(ValueError, match="does not match bits=3"):
            PalettizedLinear(4, 3, codes, lut, 3)
