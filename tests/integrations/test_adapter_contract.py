"""The adapter contract: every toolkit selects layers through the one registry and the one walk.

One ModelConfig goes through torch.ao eager, FX, PT2E, torchao and Brevitas; each must make the same
per-layer decision (bits, dim, or float) and give the same warnings. A kind added to the registry
works in every toolkit that can express it without touching the adapters.
"""
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("brevitas")

import torch.ao.quantization as tq  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations import brevitas as ib  # noqa: E402
from idkm_plugin.integrations import torch_ao as ita  # noqa: E402
from idkm_plugin.integrations import torchao as ito  # noqa: E402
from idkm_plugin.layers import LayerKind, register_layer_kind, unregister_layer_kind  # noqa: E402
from idkm_plugin.nn import PalettizedTensor  # noqa: E402


class Net(nn.Module):
    """Embedding, Conv1d, Conv2d and two Linears; forward(ids [N, 4], img [N, 1, 6, 6]) -> [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.conv1 = nn.Conv1d(8, 6, 3)
        self.conv2 = nn.Conv2d(1, 4, 3)  # 36 weights
        self.fc = nn.Linear(6 * 2 + 4 * 4 * 4, 8)
        self.head = nn.Linear(8, 3)  # 24 weights: a small layer

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        a = self.conv1(self.emb(ids).transpose(1, 2)).flatten(1)
        b = self.conv2(img).flatten(1)
        return self.head(F.relu(self.fc(torch.cat([a, b], 1))))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 10, (2, 4)), torch.randn(2, 1, 6, 6)


MP = ModelConfig(default=ClusterConfig(bits=4, max_iter=3), by_type={"Linear": ClusterConfig(bits=2, dim=2),
                                                                      "Embedding": ClusterConfig(bits=3)},
                 by_name={"conv1": None, "re:conv.": ClusterConfig(bits=2, dim=5)},  # dim 5 does not divide 36
                 small_layer_params=30, small_layer=ClusterConfig(bits=8), skip_unclusterable=True)
EXPECTED = {"emb": (3, 1), "conv1": None, "conv2": None, "fc": (2, 2), "head": (2, 2)}


def _decision(cfg):
    return None if cfg is None else (cfg.bits, cfg.dim)


def _torch_ao_eager(model, mp=MP):
    ita.assign_qconfigs(model, mp, mapping=ita.qat_module_mapping())
    return {name: _decision(None if m.qconfig is None else m.qconfig.weight().config)
            for name, m in model.named_children()}


def _fx(model, mp=MP):
    mapping = ita.qconfig_mapping(mp, model)
    return {name: _decision(None if q is None else q.weight().config) for name, q in mapping.module_name_qconfigs.items()}


def _pt2e(model, mp=MP):
    exported = torch.export.export(model, inputs()).module()
    ita.IDKMQuantizer(mp).annotate(exported)
    found = {name: None for name in EXPECTED}
    for node in exported.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        for spec in ([] if annotation is None else annotation.input_qspec_map.values()):
            if spec is not None:
                keywords = spec.observer_or_fake_quant_ctr.p.keywords
                found[keywords["name"]] = _decision(keywords["config"])
    return found


def _torchao(model, mp=MP):
    table = ito.fqn_to_config(mp, model).fqn_to_config
    return {name: _decision(None if c is None else c.cluster_config) for name, c in table.items()}


def _brevitas(model, mp=MP):
    configs, skipped = ib.resolve_layers(model, mp)
    return {**{name: _decision(c) for name, c in configs.items()}, **{name: None for name in skipped}}


@pytest.mark.parametrize("adapter", [_torch_ao_eager, _fx, _pt2e, _torchao, _brevitas])
def test_one_model_config_same_decisions_and_warnings_in_every_adapter(adapter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decisions = adapter(Net())
    assert decisions == EXPECTED
    ours = sorted({str(w.message) for w in caught if "skip_unclusterable" in str(w.message)})
    assert ours == ["layer 'conv2' (Conv2d): cluster dim=5 does not divide the 36 weights per LUT (shape [4, 1, 3, 3]); "
                    "use a dim that divides 36; skip_unclusterable=True: leaving it float"]


@pytest.mark.parametrize("adapter", [_torch_ao_eager, _torchao, _brevitas])
def test_unsupported_layer_is_refused_the_same_way(adapter):
    strict = dataclasses.replace(MP, skip_unclusterable=False, by_name={})

    class WithConv3d(Net):
        def __init__(self):
            super().__init__()
            self.vol = nn.Conv3d(1, 2, 3)

    with pytest.raises(ValueError, match=r"layer 'vol' \(Conv3d\) cannot be clustered in the .* flow"):
        adapter(WithConv3d(), strict)


class ScaledLinear(nn.Linear):
    """A user layer: a Linear whose output is multiplied by a fixed scale."""

    def __init__(self, in_features: int, out_features: int, scale: float = 2.0) -> None:
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale


@pytest.fixture
def scaled_linear_kind():
    kind = register_layer_kind(LayerKind("ScaledLinear", ScaledLinear, lambda m, x, w: F.linear(x, w, m.bias) * m.scale))
    yield kind
    unregister_layer_kind(kind)


def converted_scaled_linear(layer: nn.Module) -> bool:
    """The converted form of the user's kind: still a ScaledLinear (its scale kept), with a palettized weight."""
    return type(layer) is ScaledLinear and layer.scale == 2.0 and isinstance(layer.weight, PalettizedTensor)


def _scaled_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def _train_then_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model.train()(x).square().mean().backward()
        opt.step()
    return model.eval()(x)


def test_a_registered_kind_works_in_torchao_and_torch_ao_without_adapter_changes(scaled_linear_kind):
    x = torch.randn(5, 12)
    cfg = ClusterConfig(bits=2, max_iter=5)

    model = _scaled_model()
    quantize_(model, ito.IDKMQATConfig(cfg), filter_fn=ito.clusterable)
    assert isinstance(model[0], ScaledLinear) and model[0].cluster_config.bits == 2
    expected = _train_then_eval(model, x)
    quantize_(model, ito.IDKMQATConfig(step="convert"), filter_fn=ito.clusterable)
    assert converted_scaled_linear(model[0]) and torch.equal(model(x), expected)

    model = _scaled_model()
    ita.assign_qconfigs(model, cfg, mapping=ita.qat_module_mapping())
    qat = tq.prepare_qat(model, mapping=ita.qat_module_mapping())
    assert isinstance(qat[0].weight_fake_quant, ita.IDKMFakeQuantize)
    expected = _train_then_eval(qat, x)
    deployed = tq.convert(qat, mapping=ita.palettize_mapping())
    assert converted_scaled_linear(deployed[0]) and torch.equal(deployed(x), expected)


def test_brevitas_names_a_registered_kind_it_has_no_layer_for(scaled_linear_kind):
    with pytest.raises(ValueError, match=r"layer '0' \(ScaledLinear\) cannot be clustered in the Brevitas flow"):
        ib.quantize_model(_scaled_model(), ModelConfig(default=ClusterConfig(bits=2)))


def test_every_cluster_config_field_is_reachable_from_the_brevitas_injector():
    import brevitas.nn as qnn

    non_default = {"method": "idkm_jfb", "bits": 3, "dim": 2, "tau": 2e-4, "max_iter": 7, "tol": 1e-4,
                   "init": "linear", "granularity": "per_grouped_channel", "group_size": 4, "uniquify": "off",
                   "chunk_size": 64, "adjoint_max_iter": 9, "adjoint_tol": 1e-3, "lut_dtype": "float16",
                   "start_step": 3, "seed": 5, "per_channel_scale": "rms", "scale_dtype": "float16", "sparsity": 0.75,
                   "prune_start": 4, "prune_steps": 10, "scale_block_size": 8}
    needs = {"scale_block_size": {"per_channel_scale": "max_abs"}}  # fields valid only beside another
    default = ClusterConfig(group_size=2)  # valid with either granularity
    for f in dataclasses.fields(ClusterConfig):
        value = non_default.get(f.name)
        if value is None:  # a new field: pick any other valid value of its enum, or fail loudly
            current = getattr(default, f.name)
            others = [m for m in type(current)] if hasattr(type(current), "__members__") else []
            assert others, f"add a non-default value for ClusterConfig.{f.name} to this test"
            value = next(m.value for m in others if m != current)
        cfg = dataclasses.replace(default, **{f.name: value, **needs.get(f.name, {})})
        layer = qnn.QuantLinear(16, 4, weight_quant=ib.IDKMWeightQuant, **ib.weight_quant_kwargs(cfg))
        assert layer.weight_quant.cluster_config == cfg, f.name
