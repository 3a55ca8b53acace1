"""A converted layer keeps its float class and equals the dense layer with the hard-assigned weight, exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.layers import palettize_module
from idkm_plugin.nn import PalettizedTensor

CASES = [
    (lambda: nn.Linear(40, 12), lambda: torch.randn(5, 40)),
    (lambda: nn.Linear(40, 12, bias=False), lambda: torch.randn(5, 40)),
    (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), lambda: torch.randn(2, 6, 17)),
    (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2), lambda: torch.randn(2, 4, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 3, groups=8, stride=2), lambda: torch.randn(2, 8, 9, 9)),  # depthwise
    (lambda: nn.Conv2d(4, 8, (3, 1), groups=2, padding="same"), lambda: torch.randn(2, 4, 7, 7)),
    (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(2, 4, 7, 7)),
    (lambda: nn.Embedding(48, 16, padding_idx=0), lambda: torch.randint(0, 48, (3, 7))),
]


@pytest.mark.parametrize("make,inputs", CASES)
@pytest.mark.parametrize("cfg", [ClusterConfig(bits=2), ClusterConfig(bits=4, dim=2, lut_dtype="float16"),
                                 ClusterConfig(bits=3, granularity="per_grouped_channel", group_size=4)])
def test_palettized_output_equals_dense_with_hard_weight(make, inputs, cfg):
    torch.manual_seed(0)
    module = make()
    clusterer = WeightClusterer(cfg)
    clusterer.train()(module.weight).sum().backward()  # one training step sets the centroids
    hard_weight = clusterer.eval()(module.weight)
    pal = palettize_module(module, clusterer)
    assert type(pal) is type(module) and pal is not module and isinstance(pal.weight, PalettizedTensor)
    assert not isinstance(module.weight, PalettizedTensor)  # the source layer is left as it was
    assert torch.equal(pal.weight.dequantize(), hard_weight)
    x = inputs()
    with torch.no_grad():
        saved = module.weight.data.clone()
        module.weight.data.copy_(hard_weight)
        expected = module(x)
        module.weight.data.copy_(saved)
    assert torch.equal(pal(x), expected)
    vectors = clusterer.vectors(hard_weight)
    for group in vectors:
        assert torch.unique(group, dim=0).shape[0] <= cfg.k


def test_state_dict_round_trip_of_palettized_module():
    module = nn.Conv2d(3, 4, 3)
    clusterer = WeightClusterer(ClusterConfig(bits=5))
    clusterer(module.weight)
    pal = palettize_module(module, clusterer)
    other = palettize_module(nn.Conv2d(3, 4, 3), clusterer)
    other.load_state_dict(pal.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(other(x), pal(x))


def test_bn_folded_weight_override():
    module = nn.Linear(8, 4)
    clusterer = WeightClusterer(ClusterConfig(bits=2))
    folded_w, folded_b = module.weight * 2, torch.ones(4)
    clusterer.eval()
    clusterer.initialize(folded_w)
    pal = palettize_module(module, clusterer, weight=folded_w, bias=folded_b)
    x = torch.randn(3, 8)
    assert torch.equal(pal(x), F.linear(x, clusterer(folded_w), folded_b))


def test_embedding_with_max_norm_is_refused():
    module = nn.Embedding(10, 4, max_norm=1.0)
    clusterer = WeightClusterer(ClusterConfig(bits=2))
    clusterer(module.weight)
    with pytest.raises(ValueError, match="max_norm"):
        palettize_module(module, clusterer)


def test_unsupported_module_is_named():
    with pytest.raises(ValueError, match="LSTM cannot be palettized"):
        palettize_module(nn.LSTM(4, 4), WeightClusterer(ClusterConfig()), weight=torch.randn(4, 4))


def test_palettized_weight_is_read_only_and_decodes_for_any_op():
    module = nn.Linear(6, 4)
    clusterer = WeightClusterer(ClusterConfig(bits=2))
    clusterer(module.weight)
    pal = palettize_module(module, clusterer)
    dense = pal.weight.dequantize()
    assert torch.equal(pal.weight * 2, dense * 2) and torch.equal(pal.weight.t(), dense.t())
    assert isinstance(pal.weight, nn.Parameter) and not pal.weight.requires_grad
    with pytest.raises(ValueError, match="read-only"):
        with torch.no_grad():
            pal.weight.mul_(2)
    assert "bits=2" in repr(pal.weight)


def test_dtype_and_device_moves_keep_the_codes():
    module = nn.Linear(8, 4)
    clusterer = WeightClusterer(ClusterConfig(bits=3))
    clusterer(module.weight)
    pal = palettize_module(module, clusterer)
    half = copy.deepcopy(pal).half()
    assert isinstance(half.weight, PalettizedTensor) and half.weight.dtype == torch.float16
    assert torch.equal(half.weight.codes, pal.weight.codes)
    assert torch.equal(half.weight.dequantize(), pal.weight.dequantize().half())


def test_pickle_and_deepcopy_round_trip(tmp_path):
    module = nn.Embedding(12, 4)
    clusterer = WeightClusterer(ClusterConfig(bits=2, sparsity=0.25))
    clusterer.train()(module.weight)
    pal = palettize_module(module, clusterer)
    assert pal.weight.mask is not None
    torch.save(pal, tmp_path / "m.pt")
    for other in (copy.deepcopy(pal), torch.load(tmp_path / "m.pt", weights_only=False)):
        ids = torch.arange(12)
        assert torch.equal(other(ids), pal(ids)) and torch.equal(other.weight.mask, pal.weight.mask)
