"""The palettized weight's dense cache: same outputs, reused while valid, rebuilt whenever codes / LUT change."""
import copy

import pytest
import torch
from torch import nn

from idkm_plugin.nn import PalettizedTensor, pack_codes
from qat_helpers import palettized, palettized_linear


def make_linear(bits=4, cache_weight=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (1, 6 * 16), generator=gen)
    lut = torch.randn(1, 1 << bits, 1, generator=gen)
    return palettized_linear(16, 6, codes, lut, bits, torch.randn(6, generator=gen), cache_weight=cache_weight)


def test_cached_and_uncached_outputs_are_equal():
    x = torch.randn(3, 16)
    on, off = make_linear(), make_linear(cache_weight=False)
    assert torch.equal(on(x), off(x)) and torch.equal(on(x), off(x))
    assert torch.equal(on.weight.dense(), off.weight.dequantize())


def test_cache_is_reused_while_valid():
    m = make_linear()
    first = m.weight.dense()
    assert m.weight.dense() is first
    m(torch.randn(2, 16))
    assert m.weight.dense() is first


def test_cache_off_keeps_nothing():
    m = make_linear(cache_weight=False)
    m(torch.randn(2, 16))
    assert m.weight._cache is None and m.weight.dense() is not m.weight.dense()


def test_cache_is_in_no_state_dict_or_buffer_list():
    m = make_linear()
    m(torch.randn(2, 16))
    assert set(m.state_dict()) == {"weight", "bias"}
    assert set(m.weight.inner_tensors()) == {"codes", "lut"} and list(m.named_buffers()) == []


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
        m.weight.lut.mul_(2)
    assert torch.equal(m.weight.dense(), m.weight.dequantize())
    assert torch.equal(m(x), nn.functional.linear(x, m.weight.dequantize(), m.bias))
    m.weight.codes[0] ^= 0xFF
    assert torch.equal(m.weight.dense(), m.weight.dequantize())


def test_assigning_codes_or_lut_invalidates():
    m = make_linear()
    m(torch.randn(2, 16))
    m.weight.codes = pack_codes(torch.zeros(96, dtype=torch.long), 4)
    assert torch.equal(m.weight.dense(), m.weight.lut[0, 0, 0].expand(6, 16))
    m.weight.lut = torch.ones(1, 16, 1)
    assert torch.equal(m.weight.dense(), torch.ones(6, 16))


def test_to_invalidates():
    m = make_linear()
    before = m.weight.dense()
    m.to(torch.device("cpu"))
    assert torch.equal(m.weight.dense(), before)
    m.double()  # the weight now decodes to float64 (the LUT keeps its stored precision)
    assert m.weight._cache is None and m.weight.dense().dtype == torch.float64


def test_cache_built_in_inference_mode_works_with_autograd_later():
    m = make_linear()
    with torch.inference_mode():
        m(torch.randn(2, 16))
    x = torch.randn(2, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and not m.weight.dense().is_inference()


def test_deepcopy_and_all_kinds_cache():
    conv = palettized(nn.Conv2d(2, 4, 3, bias=False), torch.randint(0, 4, (1, 72)), torch.randn(1, 4, 1), 2)
    emb = palettized(nn.Embedding(10, 4), torch.randint(0, 8, (1, 40)), torch.randn(1, 8, 1), 3)
    for module, x in ((conv, (torch.randn(1, 2, 5, 5),)), (emb, (torch.tensor([1, 2]),))):
        out = module(*x)
        assert module.weight._cache is not None
        clone = copy.deepcopy(module)
        assert torch.equal(clone(*x), out)


def test_torch_export_keeps_the_lut_lookup_not_the_cache():
    m = make_linear()
    x = torch.randn(2, 16)
    m(x)  # cache populated
    ep = torch.export.export(m, (x,))
    dense_shaped = [t for t in list(ep.state_dict.values()) + list(ep.constants.values())
                    if isinstance(t, torch.Tensor) and tuple(t.shape) == (6, 16)]
    assert len(dense_shaped) == 1 and isinstance(dense_shaped[0], PalettizedTensor)  # codes + LUT, no dense copy
    assert torch.equal(ep.module()(x), m(x))


def test_lut_being_trained_is_not_cached():
    m = make_linear()
    m.weight.lut.requires_grad_(True)
    m(torch.randn(2, 16)).sum().backward()
    assert m.weight.lut.grad is not None and m.weight._cache is None
    m(torch.randn(2, 16)).sum().backward()  # a second backward through a fresh weight works


@pytest.mark.parametrize("bad", ["codes", "lut"])
def test_constructor_validates_codes_and_lut(bad):
    codes, lut = torch.randint(0, 4, (1, 12)), torch.randn(1, 4, 1)
    if bad == "codes":
        with pytest.raises(ValueError, match=r"codes torch.uint8 \[5\] do not hold the 12 codes"):
            palettized_linear(4, 3, torch.zeros(5, dtype=torch.uint8), lut, 2)
    else:
        with pytest.raises(ValueError, match="does not match bits=3"):
            palettized_linear(4, 3, codes, lut, 3)
