"""FX graph mode: prepare_qat_fx with qconfig_mapping(ModelConfig) -> train -> convert_fx_palettized."""
import pytest
import torch
from torch import nn

tq = pytest.importorskip("torch.ao.quantization")
from torch.ao.quantization.quantize_fx import prepare_qat_fx  # noqa: E402

from mnist_data import mnist  # noqa: E402
from qat_helpers import train  # noqa: E402
from torch_ao_models import MnistNet  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.torch_ao import IDKMFakeQuantize, convert_fx_palettized, qconfig_mapping  # noqa: E402
from idkm_plugin.nn import palettized_parameters  # noqa: E402

MP = ModelConfig(default=ClusterConfig(method="idkm_jfb", bits=2, max_iter=10),
                 by_name={"fc": ClusterConfig(method="dkm", bits=3, dim=2, max_iter=5), "emb": None})


def prepared_fx(bn: bool, activation=None):
    torch.manual_seed(0)
    model = MnistNet(bn=bn).train()
    x, y = mnist("train", 640)
    qat = prepare_qat_fx(model, qconfig_mapping(MP, model, activation=activation), (x[:2],))
    train(qat, x, y, steps=5)
    return qat


def palettized(gm):
    return {n.removesuffix(".weight"): (w.bits, w.cluster_dim) for n, w in palettized_parameters(gm).items()}


@pytest.mark.parametrize("bn", [False, True])
def test_fx_converted_equals_eval_qat(bn):
    qat = prepared_fx(bn)
    fqs = [m for m in qat.modules() if isinstance(m, IDKMFakeQuantize)]
    assert len(fqs) == 4 and all(int(m.clusterer.step) == 5 for m in fqs)
    xt = mnist("test", 128)[0]
    ref = qat.eval()(xt)
    deployed = convert_fx_palettized(qat)
    conv = "conv.0" if bn else "conv"  # FX fuses conv+bn+relu (ConvBnReLU2d) -> Sequential(conv, ReLU)
    assert palettized(deployed) == {conv: (2, 1), "dw": (2, 1), "conv1d": (2, 1), "fc": (3, 2)}
    assert type(deployed.emb) is nn.Embedding and type(deployed.emb.weight) is nn.Parameter
    assert type(deployed.fc) is nn.Linear and type(deployed.get_submodule(conv)) is nn.Conv2d
    assert not any(isinstance(m, IDKMFakeQuantize) for m in deployed.modules())
    if bn:
        torch.testing.assert_close(deployed(xt), ref, rtol=1e-5, atol=1e-5)  # BN folding: rounding only
    else:
        assert torch.equal(deployed(xt), ref)


def test_fx_with_activation_fake_quant():
    qat = prepared_fx(False, activation=tq.default_fake_quant)
    qat.apply(tq.disable_observer)
    xt = mnist("test", 64)[0]
    ref = qat.eval()(xt)
    deployed = convert_fx_palettized(qat)
    assert torch.equal(deployed(xt), ref)
