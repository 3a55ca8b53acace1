"""Mixed precision from a ModelConfig: assign_qconfigs (eager) reads back exactly from the converted model."""
import pytest
import torch
from torch import nn

tq = pytest.importorskip("torch.ao.quantization")

from mnist_data import mnist  # noqa: E402
from qat_helpers import train  # noqa: E402
from torch_ao_models import MnistNet, fused  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.export import size_report  # noqa: E402
from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping, qat_module_mapping  # noqa: E402
from idkm_plugin.nn import PalettizedTensor, palettized_parameters  # noqa: E402

YAML = """
default: {method: idkm, bits: 4, max_iter: 10}
by_type:
  Linear: {bits: 2, dim: 4}
by_name:
  "re:conv1d|dw": {bits: 3, dim: 3}
  emb: skip
small_layer_params: 100
small_layer: {bits: 8}
"""


def mixed_config(tmp_path) -> ModelConfig:
    path = tmp_path / "mixed.yaml"
    path.write_text(YAML)
    return ModelConfig.from_yaml(str(path))


def test_mixed_precision_bits_and_dims_read_back(tmp_path):
    mp = mixed_config(tmp_path)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"'conv' \(Conv2d\).*not less than its 288 B in float32; leaving it float"):
        model = assign_qconfigs(fused(MnistNet()), mp, mapping=qat_module_mapping())
    qat = tq.prepare_qat(model, mapping=qat_module_mapping())
    x, y = mnist("train", 320)
    train(qat, x, y, steps=3)
    deployed = tq.convert(qat.eval(), mapping=palettize_mapping())
    weights = {n.removesuffix(".weight"): w for n, w in palettized_parameters(deployed).items()}
    got = {n: (w.bits, w.cluster_dim) for n, w in weights.items()}
    # conv (72 weights) < 100: small-layer rule gives 8 bits, whose 1 KiB LUT is more than its float32 bytes, so
    # it stays float; dw matches the regex before by_type; emb is None
    assert got == {"dw": (3, 3), "conv1d": (3, 3), "fc": (2, 4)}
    assert type(deployed.emb) is nn.Embedding and type(deployed.emb.weight) is nn.Parameter

    report = size_report(deployed)
    assert {layer.name: (layer.bits, layer.dim) for layer in report.layers} == got
    for layer in report.layers:
        weight = weights[layer.name]
        assert layer.code_bytes == weight.codes.numel() == -(-weight.num_codes * weight.bits // 8)
        assert layer.lut_bytes == weight.lut.numel() * weight.lut.element_size()
    stored = sum(weight.nbytes_stored for weight in weights.values())
    stored += sum(t.numel() * t.element_size() for t in deployed.state_dict().values()
                  if not isinstance(t, PalettizedTensor) and (t.is_floating_point() or t.dtype == torch.uint8))
    assert report.total_bytes == stored


def test_fused_layer_resolves_by_its_name_and_conv_type():
    torch.manual_seed(0)
    model = fused(MnistNet())
    mp = ModelConfig(default=None, by_type={"Conv2d": ClusterConfig(bits=2)})
    assign_qconfigs(model, mp)
    assert model.conv.qconfig.weight().config.bits == 2  # ConvBnReLU2d resolved as its Conv2d
    assert model.dw.qconfig.weight().config.bits == 2
    assert model.fc.qconfig is None and model.emb.qconfig is None and model.conv1d.qconfig is None
    assert model.conv.qconfig.weight().clusterer.name == "conv"
