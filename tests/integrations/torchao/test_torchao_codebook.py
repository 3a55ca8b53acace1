"""EXPERIMENTAL: a converted nn.Linear's palettized weight as torchao's prototype CodebookQuantizedTensor."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

from idkm_plugin import ClusterConfig  # noqa: E402
from idkm_plugin.clusterer import WeightClusterer  # noqa: E402
from idkm_plugin.layers import palettize_module  # noqa: E402

codebook = pytest.importorskip("idkm_plugin.integrations.torchao.codebook")
try:
    codebook._codebook_tensor_class()
except ImportError:
    pytest.skip("this torchao has no CodebookQuantizedTensor", allow_module_level=True)


def palettized_linear(cfg: ClusterConfig, out_features: int = 8, in_features: int = 12):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    clusterer = WeightClusterer(cfg)
    clusterer.train()(linear.weight)
    return palettize_module(linear, clusterer)


@pytest.mark.parametrize("cfg", [ClusterConfig(bits=3), ClusterConfig(bits=8, lut_dtype="float16"),
                                 ClusterConfig(bits=2, granularity="per_grouped_channel", group_size=4),
                                 ClusterConfig(bits=3, lut_dtype="int8")])
def test_codebook_tensor_matches_palettized_linear(cfg):
    layer = palettized_linear(cfg)
    weight = codebook.to_codebook_tensor(layer)
    assert type(weight).__name__ == "CodebookQuantizedTensor"
    assert weight.shape == (8, 12) and weight.codes.dtype == torch.uint8
    assert weight.codebook.shape == (layer.weight.groups_lut, 1, 1 << cfg.bits, 1)
    assert torch.equal(weight.dequantize(), layer.weight.dequantize())
    x = torch.randn(5, 12)
    assert torch.equal(F.linear(x, weight, layer.bias), layer(x))
    deployed = nn.Linear(12, 8)
    deployed.weight = nn.Parameter(weight, requires_grad=False)
    deployed.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    assert torch.equal(deployed(x), layer(x))


def test_codebook_tensor_constraints():
    with pytest.raises(ValueError, match="dim=2 is not allowed"):
        codebook.to_codebook_tensor(palettized_linear(ClusterConfig(bits=2, dim=2)))
    with pytest.raises(ValueError, match="bits=9 is not allowed"):
        codebook.to_codebook_tensor(palettized_linear(ClusterConfig(bits=9), out_features=32, in_features=32))
    with pytest.raises(ValueError, match="per-channel scales"):
        codebook.to_codebook_tensor(palettized_linear(ClusterConfig(bits=2, per_channel_scale=True)))
    with pytest.raises(ValueError, match=r"expects a converted nn.Linear \(palettized weight\)"):
        codebook.to_codebook_tensor(nn.Linear(2, 2))
