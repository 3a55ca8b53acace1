"""torchao integration: prepare / train / convert through `quantize_`, mixed precision, compile, export."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

from mnist_data import mnist  # noqa: E402
from qat_helpers import TiedLM, assert_at_most_k_vectors, train  # noqa: E402
from torchao.quantization import FqnToConfig, quantize_  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.export import size_report  # noqa: E402
from idkm_plugin.integrations.torchao import (IDKMFakeQuantConv1d, IDKMFakeQuantConv2d,  # noqa: E402
                                              IDKMFakeQuantEmbedding, IDKMFakeQuantLinear, IDKMQATConfig,
                                              clusterable, fqn_to_config)
from idkm_plugin.nn import PalettizedTensor  # noqa: E402


class TinyNet(nn.Module):
    """conv (1->4, 3x3, stride 2) + linear (676->10): 4,406 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU())
        self.classifier = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def train_mnist(model: nn.Module, steps: int = 50, batch: int = 32) -> list[float]:
    return train(model.train(), *mnist("train", steps * batch), steps, batch=batch, lr=1e-2)


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm_jfb"])
def test_mnist_prepare_train_convert(method):
    model = tiny_net()
    cfg = ClusterConfig(method=method, bits=2, max_iter=10)
    quantize_(model, IDKMQATConfig(cfg, step="prepare"), filter_fn=clusterable)
    assert isinstance(model.features[0], IDKMFakeQuantConv2d) and isinstance(model.classifier, IDKMFakeQuantLinear)

    losses = train_mnist(model)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    stats = model.classifier.weight_clusterer.last_stats  # the last training step's solve
    assert 1 <= stats.forward_iters <= cfg.max_iter and math.isfinite(stats.forward_residual)

    x_test, y_test = mnist("test", 256)
    model.eval()
    with torch.no_grad():
        expected = model(x_test)
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    assert type(model.features[0]) is nn.Conv2d and type(model.classifier) is nn.Linear
    for layer in (model.features[0], model.classifier):
        assert isinstance(layer.weight, PalettizedTensor) and layer.weight.bits == 2
        assert_at_most_k_vectors(layer)
    with torch.no_grad():
        got = model(x_test)
    assert torch.equal(got, expected)
    assert (got.argmax(1) == y_test).float().mean() > 0.5  # 2-bit weights after 50 steps still learned


class AllKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(1, 4, 3, padding="same", bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2)).mean(-1)
        return self.fc(h) + self.conv2(img).mean((1, 2, 3))[:, None]


def test_prepare_swaps_every_supported_layer_and_shares_parameters():
    torch.manual_seed(0)
    model = AllKinds()
    params = {name: p for name, p in model.named_parameters()}
    quantize_(model, IDKMQATConfig(ClusterConfig(bits=3, max_iter=5)), filter_fn=clusterable)
    kinds = {"emb": IDKMFakeQuantEmbedding, "conv1": IDKMFakeQuantConv1d, "conv2": IDKMFakeQuantConv2d,
             "fc": IDKMFakeQuantLinear}
    for name, cls in kinds.items():
        assert type(getattr(model, name)) is cls
    for name, p in model.named_parameters():
        assert p is params[name]  # an optimizer built before prepare keeps training the same tensors

    ids, img = torch.randint(0, 20, (5, 7)), torch.randn(5, 1, 6, 6)
    model.train()
    model(ids, img).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        expected = model(ids, img)
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    converted = {"emb": nn.Embedding, "conv1": nn.Conv1d, "conv2": nn.Conv2d, "fc": nn.Linear}
    for name, cls in converted.items():
        assert type(getattr(model, name)) is cls and isinstance(getattr(model, name).weight, PalettizedTensor)
    assert torch.equal(model(ids, img), expected)


def test_default_filter_is_torchao_linear_only():
    """Without filter_fn, quantize_ only visits nn.Linear (torchao's default); `clusterable` adds the rest."""
    model = tiny_net()
    quantize_(model, IDKMQATConfig(ClusterConfig(bits=2)))
    assert isinstance(model.classifier, IDKMFakeQuantLinear)
    assert type(model.features[0]) is nn.Conv2d


def _bits_by_layer(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {layer.name: (layer.bits, layer.dim) for layer in size_report(model).layers}


class MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)).repeat(1, 4))


def _prepare_train_convert(model: nn.Module, fqn_cfg: FqnToConfig) -> torch.Tensor:
    quantize_(model, fqn_cfg, filter_fn=None)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    assert torch.equal(model(x), expected)
    return model


def test_fqn_to_config_exact_and_regex_keys_set_bits_per_layer():
    torch.manual_seed(0)
    fqn_cfg = FqnToConfig(OrderedDict([
        ("features.0", None),                                                  # exact: stays float
        ("head.2", IDKMQATConfig(ClusterConfig(bits=6))),                      # exact
        (r"re:head\.\d", IDKMQATConfig(ClusterConfig(bits=2, dim=2))),         # regex
        (r"re:features\..*", IDKMQATConfig(ClusterConfig(bits=3))),            # regex (also matches params)
    ]))
    model = _prepare_train_convert(MixedNet(), fqn_cfg)
    assert type(model.features[0]) is nn.Conv2d
    assert _bits_by_layer(model) == {"features.2": (3, 1), "head.0": (2, 2), "head.2": (6, 1)}


def test_fqn_to_config_parameter_key():
    """A parameter FQN ("head.0.weight") selects its layer, as torchao's FqnToConfig allows."""
    torch.manual_seed(0)
    fqn_cfg = FqnToConfig(OrderedDict([("head.0.weight", IDKMQATConfig(ClusterConfig(bits=5)))]))
    model = _prepare_train_convert(MixedNet(), fqn_cfg)
    assert _bits_by_layer(model) == {"head.0": (5, 1)}


def test_model_config_helper_resolves_names_types_and_skips():
    torch.manual_seed(0)
    model = MixedNet()
    mc = ModelConfig(default=ClusterConfig(bits=4), by_type={"Linear": ClusterConfig(bits=2, dim=4)},
                     by_name={"features.0": None, r"re:head\.2": ClusterConfig(bits=8)})
    fqn_cfg = fqn_to_config(mc, model)
    assert isinstance(fqn_cfg, FqnToConfig)
    assert list(fqn_cfg.fqn_to_config) == ["features.0", "features.2", "head.0", "head.2"]
    assert fqn_cfg.fqn_to_config["features.0"] is None
    model = _prepare_train_convert(model, fqn_cfg)
    # head.2 at 8 bits: its 1 KiB LUT would outweigh its float32 bytes, so it stays float (with a warning)
    assert _bits_by_layer(model) == {"features.2": (4, 1), "head.0": (2, 4)}


def test_model_config_helper_unclusterable_layer():
    model = MixedNet()  # features.0 has 36 weights: dim=5 does not divide them
    mc = ModelConfig(default=ClusterConfig(bits=2, dim=4), by_name={"features.0": ClusterConfig(dim=5)})
    with pytest.raises(ValueError, match="features.0.*dim=5"):
        fqn_to_config(mc, model)
    skipping = ModelConfig(default=mc.default, by_name=dict(mc.by_name), skip_unclusterable=True)
    with pytest.warns(UserWarning, match=r"'features.0'.*leaving it float"):
        fqn_cfg = fqn_to_config(skipping, model)
    assert fqn_cfg.fqn_to_config["features.0"] is None


def _converted_tiny_net() -> tuple[nn.Module, torch.Tensor]:
    model = tiny_net()
    quantize_(model, IDKMQATConfig(ClusterConfig(bits=3, max_iter=5)), filter_fn=clusterable)
    model.train()
    x = mnist("test", 8)[0]
    model(x)
    quantize_(model.eval(), IDKMQATConfig(step="convert"), filter_fn=clusterable)
    return model, x


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
def test_converted_model_runs_under_torch_compile():
    model, x = _converted_tiny_net()
    eager = model(x)
    assert torch.equal(torch.compile(model, backend="aot_eager", fullgraph=True)(x), eager)
    # inductor fuses the LUT gather into the matmul's producer: same math, float rounding may differ
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-6)


def test_converted_model_exports_with_codes_and_lut():
    model, x = _converted_tiny_net()
    program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x), model(x))
    state = program.state_dict
    for layer in ("features.0", "classifier"):
        weight = state[f"{layer}.weight"]  # the program's parameter is the palettized weight itself
        assert isinstance(weight, PalettizedTensor)
        assert weight.codes.dtype == torch.uint8
        assert weight.lut.shape == (1, 8, 1)
    # nothing dense of the weights' size is stored: 676*10 float weights would be 27 kB
    stored = [u for t in state.values() for u in (t.inner_tensors().values() if isinstance(t, PalettizedTensor)
                                                  else (t,))]
    assert max(t.numel() * t.element_size() for t in stored) < 676 * 10 * 4 / 8
    # the graph reads the codes and the LUT (and decodes them), not a dense weight
    inner = [n.args[1] for n in program.graph.nodes
             if n.op == "call_function" and "access_subclass_inner_tensor" in str(n.target)]
    assert inner.count("codes") == 2 and inner.count("lut") == 2


def test_config_validation():
    with pytest.raises(ValueError, match="step='train'"):
        IDKMQATConfig(step="train")
    with pytest.raises(ValueError, match="takes no cluster_config"):
        IDKMQATConfig(ClusterConfig(), step="convert")
    with pytest.raises(ValueError, match="expected an idkm_plugin.ClusterConfig"):
        IDKMQATConfig({"bits": 2})
    assert IDKMQATConfig().resolved_cluster_config == ClusterConfig()
    model = tiny_net()
    quantize_(model, IDKMQATConfig(ClusterConfig(bits=2)), filter_fn=clusterable)
    with pytest.raises(ValueError, match="already prepared"):
        quantize_(model, IDKMQATConfig(ClusterConfig(bits=4)), filter_fn=clusterable)
    with pytest.raises(ValueError, match=r"Linear\(weight \[3, 10\]\): cluster dim=4 does not divide"):
        quantize_(nn.Sequential(nn.Linear(10, 3)), IDKMQATConfig(ClusterConfig(dim=4)))


def test_prepared_state_dict_round_trip():
    model = tiny_net()
    quantize_(model, IDKMQATConfig(ClusterConfig(bits=2, max_iter=5)), filter_fn=clusterable)
    train_mnist(model, steps=3)
    fresh = tiny_net()
    quantize_(fresh, IDKMQATConfig(ClusterConfig(bits=2, max_iter=5)), filter_fn=clusterable)
    fresh.load_state_dict(model.state_dict())
    x = mnist("test", 16)[0]
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_config_takes_cluster_config_fields_as_idkm_qconfig_does():
    assert IDKMQATConfig(bits=3, method="idkm_jfb").cluster_config == ClusterConfig(bits=3, method="idkm_jfb")
    assert IDKMQATConfig(ClusterConfig(bits=2), dim=2).cluster_config == ClusterConfig(bits=2, dim=2)
    with pytest.raises(ValueError, match=r"ClusterConfig got unknown field\(s\) \['bitz'\]"):
        IDKMQATConfig(bitz=3)
    with pytest.raises(ValueError, match=r"step='convert'\) takes no ClusterConfig fields"):
        IDKMQATConfig(step="convert", bits=3)


def test_convert_warns_for_a_never_prepared_layer_and_for_train_mode():
    model = tiny_net()
    with pytest.warns(UserWarning, match=r"classifier was never prepared for clustering"):
        quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    assert not isinstance(model.classifier.weight, PalettizedTensor)
    quantize_(model, IDKMQATConfig(bits=3), filter_fn=clusterable)
    model(torch.randn(2, 1, 28, 28))
    with pytest.warns(UserWarning, match=r"classifier is in train mode"):
        quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    assert isinstance(model.classifier.weight, PalettizedTensor)


def test_converting_the_head_converts_its_tied_embedding_too():
    """torchao's default filter matches nn.Linear only: the prepared embedding tied to the head must not stay
    fake-quantized (the file would hold a float embedding beside a palettized head)."""
    torch.manual_seed(0)
    model = TiedLM()
    quantize_(model, IDKMQATConfig(bits=2), filter_fn=clusterable)
    assert model.embed.weight_clusterer is model.head.weight_clusterer  # one clusterer for the tied Parameter
    ids = torch.randint(0, 32, (2, 5))
    model(ids)
    model.eval()
    expected = model(ids)
    quantize_(model, IDKMQATConfig(step="convert"))  # default filter: Linear only
    assert type(model.embed) is nn.Embedding and type(model.head) is nn.Linear
    assert isinstance(model.head.weight, PalettizedTensor) and model.embed.weight is model.head.weight
    assert torch.equal(model(ids), expected)
