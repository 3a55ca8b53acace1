"""Brevitas integration: injectable clustering weight quantizers, training, palettize, ModelConfig."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("brevitas")

import brevitas.nn as qnn  # noqa: E402
from brevitas.quant import Int8ActPerTensorFloat, Int8Bias, Int8BiasPerTensorFloatInternalScaling  # noqa: E402
from mnist_data import mnist  # noqa: E402
from qat_helpers import assert_at_most_k_vectors, train  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.brevitas import (ActQuantPalettized, ClusterWeightQuantProxy,  # noqa: E402
                                               DKMWeightQuant, IDKMWeightQuant, JFBWeightQuant, palettize,
                                               quantize_model, weight_quant_kwargs)
from idkm_plugin.nn import PalettizedTensor  # noqa: E402

QUANTS = {"dkm": DKMWeightQuant, "idkm": IDKMWeightQuant, "idkm_jfb": JFBWeightQuant}


def tiny_net(weight_quant, **kw) -> nn.Sequential:
    """conv (1->4, 3x3, stride 2) + linear (676->10), Brevitas layers, int8 input activations."""
    torch.manual_seed(0)
    return nn.Sequential(
        qnn.QuantConv2d(1, 4, 3, stride=2, weight_quant=weight_quant, input_quant=Int8ActPerTensorFloat, **kw),
        nn.ReLU(), nn.Flatten(),
        qnn.QuantLinear(4 * 13 * 13, 10, weight_quant=weight_quant, input_quant=Int8ActPerTensorFloat,
                        bias_quant=Int8BiasPerTensorFloatInternalScaling, **kw))


def train_mnist(model: nn.Module, steps: int = 50, batch: int = 32) -> list[float]:
    return train(model.train(), *mnist("train", steps * batch), steps, batch=batch, lr=1e-2)


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm_jfb"])
def test_mnist_train_and_palettize(method):
    model = tiny_net(QUANTS[method], weight_bit_width=2, weight_max_iter=10)
    assert model[0].weight_quant.cluster_config.method.value == method
    losses = train_mnist(model)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses

    x_test, y_test = mnist("test", 256)
    model.eval()
    with torch.no_grad():
        expected = model(x_test)
    deployed = palettize(model)
    for index, cls in ((0, nn.Conv2d), (3, nn.Linear)):
        assert isinstance(deployed[index], ActQuantPalettized)  # keeps Brevitas' trained int8 input quantizer
        layer = deployed[index].layer
        assert type(layer) is cls and isinstance(layer.weight, PalettizedTensor) and layer.weight.bits == 2
        assert_at_most_k_vectors(layer)
    with torch.no_grad():
        got = deployed(x_test)
    assert torch.equal(got, expected)
    assert (got.argmax(1) == y_test).float().mean() > 0.5


def test_issue_examples_and_overrides_read_back():
    fc = qnn.QuantLinear(512, 10, bias=True, weight_quant=IDKMWeightQuant, weight_bit_width=2)
    conv = qnn.QuantConv2d(8, 16, 3, weight_quant=IDKMWeightQuant, weight_bit_width=4, weight_cluster_dim=4)
    assert isinstance(fc.weight_quant, ClusterWeightQuantProxy)
    assert fc.weight_quant.cluster_config == ClusterConfig(method="idkm", bits=2, dim=1)
    assert conv.weight_quant.cluster_config == ClusterConfig(method="idkm", bits=4, dim=4)
    assert float(fc.weight_quant.bit_width()) == 2.0 and float(conv.weight_quant.bit_width()) == 4.0
    assert conv.weight_quant.clusterer.config.dim == 4  # what the clusterer actually runs with

    other = qnn.QuantLinear(16, 4, weight_quant=JFBWeightQuant, weight_cluster_method="dkm", weight_tau=1e-3,
                            weight_max_iter=7, weight_cluster_init="linear", weight_granularity="per_grouped_channel",
                            weight_group_size=2, weight_lut_dtype="float16", weight_start_step=3)
    assert other.weight_quant.cluster_config == ClusterConfig(
        method="dkm", tau=1e-3, max_iter=7, init="linear", granularity="per_grouped_channel", group_size=2,
        lut_dtype="float16", start_step=3)

    cfg = ClusterConfig(method="idkm_jfb", bits=3, dim=2, tau=2e-4, chunk_size=64, seed=5)
    assert qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant,
                           **weight_quant_kwargs(cfg)).weight_quant.cluster_config == cfg


@pytest.mark.parametrize("quant", [IDKMWeightQuant, JFBWeightQuant, DKMWeightQuant])
def test_overrides_change_the_trained_lut(quant):
    torch.manual_seed(0)
    layer = qnn.QuantConv2d(4, 8, 3, weight_quant=quant, weight_bit_width=3, weight_cluster_dim=2)
    clusterer = layer.weight_quant.clusterer
    x = torch.randn(2, 4, 6, 6)
    layer.train()(x).sum().backward()
    initial = clusterer.centroids.clone()
    assert initial.shape == (1, 8, 2)  # 2**3 centroids of 2-vectors, as the overrides ask
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    assert not torch.equal(clusterer.centroids, initial)  # the LUT is trained with the weights
    deployed = palettize(layer.eval())
    assert type(deployed) is nn.Conv2d and isinstance(deployed.weight, PalettizedTensor)
    assert (deployed.weight.bits, deployed.weight.cluster_dim) == (3, 2)
    assert torch.equal(deployed.weight.lut, clusterer.lut())  # the trained LUT is the deployed one
    assert_at_most_k_vectors(deployed)


def test_invalid_overrides_raise_clear_errors():
    with pytest.raises(ValueError, match="dim=5 does not divide"):
        qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, weight_cluster_dim=5)
    with pytest.raises(ValueError, match="bits=0"):
        qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, weight_bit_width=0)
    with pytest.raises(ValueError, match="method='kmeans'"):
        qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, weight_cluster_method="kmeans")


def test_integer_output_configurations_are_refused():
    x = torch.randn(3, 16)
    needs_int_bias = qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, input_quant=Int8ActPerTensorFloat,
                                     bias_quant=Int8Bias)
    with pytest.raises(ValueError, match="bias quantizer that needs input_scale"):
        needs_int_bias(x)
    int_output = qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, input_quant=Int8ActPerTensorFloat,
                                 return_quant_tensor=True)
    with pytest.raises(ValueError, match="return_quant_tensor=True.*not an integer grid|LUT entries"):
        int_output(x)
    with pytest.raises(ValueError, match="no integer scale"):
        int_output.weight_quant.scale()
    with pytest.raises(ValueError, match="bias quantizer"):
        palettize(needs_int_bias)
    # with an output quantizer the output QuantTensor comes from the activation grid: allowed
    quant_out = qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, output_quant=Int8ActPerTensorFloat,
                                return_quant_tensor=True)
    assert quant_out(x).value.shape == (3, 4)


def test_weight_is_a_plain_differentiable_tensor():
    layer = qnn.QuantLinear(16, 4, weight_quant=IDKMWeightQuant, weight_bit_width=2,
                            input_quant=Int8ActPerTensorFloat)
    w = layer.quant_weight()
    assert type(w) is torch.Tensor and w.requires_grad
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.unique(layer.eval().quant_weight()).numel() <= 4


def test_palettize_plain_layers_and_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(qnn.QuantEmbedding(12, 8, weight_quant=IDKMWeightQuant, weight_bit_width=3),
                          nn.Flatten(), qnn.QuantLinear(5 * 8, 3, weight_quant=JFBWeightQuant, weight_bit_width=2))
    ids = torch.randint(0, 12, (4, 5))
    model.train()(ids).sum().backward()
    model.eval()
    expected = model(ids)
    deployed = palettize(model)
    assert type(deployed[0]) is nn.Embedding and type(deployed[2]) is nn.Linear
    assert isinstance(deployed[0].weight, PalettizedTensor) and isinstance(deployed[2].weight, PalettizedTensor)
    assert torch.equal(deployed(ids), expected)


def test_quantizer_state_dict_round_trip():
    model = tiny_net(IDKMWeightQuant, weight_bit_width=2, weight_max_iter=5)
    train_mnist(model, steps=3)
    fresh = tiny_net(IDKMWeightQuant, weight_bit_width=2, weight_max_iter=5)
    fresh.load_state_dict(model.state_dict())
    x = mnist("test", 16)[0]
    assert torch.equal(fresh.eval()(x), model.eval()(x))


class FloatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_quantize_model_applies_model_config_through_layer_map():
    torch.manual_seed(0)
    model = FloatNet()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    mc = ModelConfig(default=ClusterConfig(bits=4), by_type={"Linear": ClusterConfig(method="idkm_jfb", bits=2, dim=2)},
                     by_name={"features.0": None, r"re:emb": ClusterConfig(bits=3, max_iter=5)})
    model = quantize_model(model, mc, input_quant=Int8ActPerTensorFloat)
    assert type(model.features[0]) is nn.Conv2d
    assert isinstance(model.features[2], qnn.QuantConv2d) and isinstance(model.head, qnn.QuantLinear)
    assert isinstance(model.emb, qnn.QuantEmbedding)
    assert model.features[2].weight_quant.cluster_config == ClusterConfig(bits=4)
    assert model.head.weight_quant.cluster_config == ClusterConfig(method="idkm_jfb", bits=2, dim=2)
    assert model.emb.weight_quant.cluster_config == ClusterConfig(bits=3, max_iter=5)
    assert model.head.weight_quant.clusterer.name == "head"
    assert model.head.input_quant.is_quant_enabled
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name])  # float weights carried over

    x = torch.randn(2, 1, 8, 8)
    model.train()(x).sum().backward()
    model.eval()
    expected = model(x)
    deployed = palettize(model)
    assert torch.equal(deployed(x), expected)
    assert isinstance(deployed.head, ActQuantPalettized) and deployed.head.layer.weight.cluster_dim == 2


def test_quantize_model_unclusterable_layer():
    mc = ModelConfig(default=ClusterConfig(bits=2), by_name={"head": ClusterConfig(dim=3)})
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\): cluster dim=3 does not divide"):
        quantize_model(FloatNet(), mc)
    skipping = ModelConfig(default=mc.default, by_name=dict(mc.by_name), skip_unclusterable=True)
    with pytest.warns(UserWarning, match=r"'head'.*leaving it float"):
        model = quantize_model(FloatNet(), skipping)
    assert type(model.head) is nn.Linear and isinstance(model.features[0], qnn.QuantConv2d)
