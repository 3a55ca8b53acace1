"""Eager-mode torch.ao QAT with IDKMFakeQuantize: prepare_qat -> train -> convert(mapping=palettize_mapping())."""
import copy
import io

import pytest
import torch
from torch import nn

tq = pytest.importorskip("torch.ao.quantization")

from mnist_data import mnist  # noqa: E402
from qat_helpers import converted_layers, train  # noqa: E402
from torch_ao_models import MnistNet, fused  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.torch_ao.convert import FrozenActivationFakeQuant  # noqa: E402
from idkm_plugin.integrations.torch_ao import (IDKMFakeQuantize, assign_qconfigs, idkm_qconfig,  # noqa: E402
                                               palettize_mapping, qat_module_mapping)
from idkm_plugin.nn import PalettizedTensor  # noqa: E402

FAST = dict(max_iter=10)


def prepared(cfg: ClusterConfig, bn: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = fused(MnistNet(bn=bn))
    model.qconfig = idkm_qconfig(cfg)
    return tq.prepare_qat(model, mapping=qat_module_mapping())


def convert(qat: nn.Module) -> nn.Module:
    return tq.convert(qat.eval(), mapping=palettize_mapping())


def distinct_vectors_per_lut(layer: nn.Module) -> int:
    w = layer.weight.dequantize().reshape(layer.weight.groups_lut, -1, layer.weight.cluster_dim)
    return max(torch.unique(g, dim=0).shape[0] for g in w)


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm_jfb"])
def test_trains_on_mnist_and_converts(method):
    x, y = mnist("train", 3200)
    qat = prepared(ClusterConfig(method=method, bits=2, **FAST))
    losses = train(qat, x, y, steps=50, lr=1e-2)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05, losses

    xt = mnist("test", 256)[0]
    ref = qat.eval()(xt)
    deployed = convert(qat)
    kinds = {n: type(m) for n, m in converted_layers(deployed).items()}
    assert kinds == {"conv.0": nn.Conv2d, "dw": nn.Conv2d, "conv1d": nn.Conv1d, "emb": nn.Embedding,
                     "fc": nn.Linear}
    assert isinstance(deployed.conv[1], nn.ReLU) and isinstance(deployed.bn, nn.Identity)
    for layer in converted_layers(deployed).values():
        assert layer.weight.bits == 2 and distinct_vectors_per_lut(layer) <= 4
    assert not any(isinstance(p, nn.Parameter) and p.requires_grad for p in deployed.parameters())
    # BatchNorm folded into conv's weight and bias reorders float32 arithmetic: rounding only.
    torch.testing.assert_close(deployed(xt), ref, rtol=1e-5, atol=1e-5)


def test_converted_equals_eval_qat_exactly_without_bn():
    x, y = mnist("train", 640)
    qat = prepared(ClusterConfig(method="idkm", bits=3, dim=2, **FAST), bn=False)
    train(qat, x, y, steps=5)
    xt = mnist("test", 128)[0]
    ref = qat.eval()(xt)
    deployed = convert(qat)
    assert torch.equal(deployed(xt), ref)
    for name, layer in converted_layers(deployed).items():
        assert (layer.weight.bits, layer.weight.cluster_dim) == (3, 2), name
        assert distinct_vectors_per_lut(layer) <= 8


def test_keyword_form_reads_like_fake_quantize_with_args():
    fq = IDKMFakeQuantize.with_args(bits=2, method="dkm", dim=2)()
    assert fq.config == ClusterConfig(bits=2, method="dkm", dim=2)
    cfg = ClusterConfig(method="idkm_jfb", bits=3)
    assert IDKMFakeQuantize.with_args(config=cfg)().config == cfg
    assert IDKMFakeQuantize.with_args(config=cfg, bits=4)().config == cfg.replace(bits=4)
    assert idkm_qconfig(bits=2, method="dkm").weight().config == ClusterConfig(bits=2, method="dkm")
    model = nn.Sequential(nn.Linear(8, 4))
    model.qconfig = tq.QConfig(activation=tq.PlaceholderObserver.with_args(dtype=torch.float32),
                               weight=IDKMFakeQuantize.with_args(bits=1))
    qat = tq.prepare_qat(model.train())
    qat(torch.randn(5, 8))
    assert qat[0].weight_fake_quant.clusterer.centroids.shape == (1, 2, 1)
    with pytest.raises(ValueError, match="bits"):
        idkm_qconfig(bits=0)


def test_weight_only_by_default_leaves_activations_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model.qconfig = idkm_qconfig(bits=2)
    qat = tq.prepare_qat(copy.deepcopy(model).train())
    qat.apply(tq.disable_fake_quant)
    x = torch.randn(8, 16)
    assert torch.equal(qat(x), model(x))  # no activation fake-quant anywhere


def test_fake_quant_and_observer_switches():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    lin.qconfig = idkm_qconfig(bits=2, **FAST)
    qat = tq.prepare_qat(nn.Sequential(lin).train())
    fq = qat[0].weight_fake_quant
    w = qat[0].weight
    qat.apply(tq.disable_fake_quant)
    assert torch.equal(fq(w), w) and int(fq.clusterer.step) == 0 and not fq.clusterer.initialized
    qat.apply(tq.enable_fake_quant)
    soft = fq(w)
    assert not torch.equal(soft, w) and int(fq.clusterer.step) == 1
    before = fq.clusterer.centroids.clone()
    qat.apply(tq.disable_observer)
    frozen = fq(w * 1.5)  # the LUT does not follow the weight any more
    assert torch.equal(fq.clusterer.centroids, before)
    frozen.sum().backward()  # still differentiable w.r.t. the weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    fq.eval()
    hard = fq(w)
    assert torch.unique(hard).numel() <= 4
    assert torch.all(torch.isin(hard, fq.clusterer.lut().flatten()))


def test_start_step_switches_clustering_on_after_n_training_forwards():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    lin.qconfig = idkm_qconfig(bits=2, start_step=3, **FAST)
    qat = tq.prepare_qat(nn.Sequential(lin).train())
    fq, w = qat[0].weight_fake_quant, qat[0].weight
    for _ in range(3):  # start_step training forwards run unclustered
        assert torch.equal(fq(w), w)
    assert not torch.equal(fq(w), w)  # the fourth is clustered
    assert int(fq.clusterer.step) == 4


def test_activation_fake_quant_is_kept_frozen_after_convert():
    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4), tq.DeQuantStub())
    model.qconfig = idkm_qconfig(bits=2, activation=tq.default_fake_quant, **FAST)
    qat = tq.prepare_qat(model.train())
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(3):
        loss = qat(torch.randn(32, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat.apply(tq.disable_observer)
    x = torch.randn(8, 16)
    ref = qat.eval()(x)
    deployed = convert(qat)
    assert type(deployed[1][0]) is nn.Linear and isinstance(deployed[1][0].weight, PalettizedTensor)
    assert isinstance(deployed[1][1], FrozenActivationFakeQuant)
    assert torch.equal(deployed(x), ref)


def test_state_dicts_round_trip_and_training_resumes(tmp_path):
    x, y = mnist("train", 640)
    cfg = ClusterConfig(method="idkm", bits=2, **FAST)
    qat = prepared(cfg)
    train(qat, x, y, steps=3)
    torch.save(qat.state_dict(), tmp_path / "qat.pt")
    resumed = prepared(cfg, seed=1)
    resumed.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    for (name, a), b in zip(qat.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # one more identical training step on both: identical centroids afterwards
    torch.manual_seed(5)
    train(qat, x[64:], y[64:], steps=1)
    torch.manual_seed(5)
    train(resumed, x[64:], y[64:], steps=1)
    cents = [(k, v) for k, v in qat.state_dict().items() if k.endswith("centroids")]
    assert len(cents) == 5
    for k, v in cents:
        assert torch.equal(v, resumed.state_dict()[k]), k

    deployed = convert(qat)
    buf = io.BytesIO()
    torch.save(deployed.state_dict(), buf)
    buf.seek(0)
    fresh = convert(prepared(cfg, seed=2))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    xt = mnist("test", 64)[0]
    assert torch.equal(fresh(xt), deployed(xt))


def test_unclusterable_layer_is_named_at_prepare_time():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(9, 8))
    model.add_module("head", nn.Linear(8, 5))  # 40 weights: dim=3 does not divide
    mp = ModelConfig(default=ClusterConfig(bits=2), by_name={"head": ClusterConfig(bits=2, dim=3)})
    with pytest.raises(ValueError, match=r"'head'.*dim=3"):
        assign_qconfigs(model, mp)
    skip = ModelConfig(default=ClusterConfig(bits=2), by_name={"head": ClusterConfig(bits=2, dim=3)},
                       skip_unclusterable=True)
    with pytest.warns(UserWarning, match=r"'head'.*leaving it float"):
        assign_qconfigs(model, skip)
    assert model.head.qconfig is None and model.body.qconfig is not None
    qat = tq.prepare_qat(model.train())
    assert type(qat.head) is nn.Linear and isinstance(qat.body.weight_fake_quant, IDKMFakeQuantize)


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Conv3d(2, 4, 3))
    with pytest.raises(ValueError, match=r"'0' \(Conv3d\) cannot be clustered"):
        assign_qconfigs(model, ClusterConfig(bits=2))
    assign_qconfigs(model, ModelConfig(default=ClusterConfig(bits=2), by_type={"Conv3d": None}))


def test_layer_left_float_by_the_default_qat_mapping_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"'0' \(Embedding\).*qat_module_mapping"):
        assign_qconfigs(model, ClusterConfig(bits=2))
    qat = tq.prepare_qat(model.train())  # torch.ao's default mapping has no Embedding
    qat(torch.randint(0, 10, (3, 2)))
    with pytest.raises(ValueError, match="never prepared.*qat_module_mapping"):
        convert(qat)
