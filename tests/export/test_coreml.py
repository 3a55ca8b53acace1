"""Core ML: one constexpr_lut_to_dense per palettized weight, decompressing to exactly its dequantize()."""
import os

import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (extra: coreml)")

from idkm_plugin import ClusterConfig  # noqa: E402
from idkm_plugin.export import size_report, to_coreml  # noqa: E402
from idkm_plugin.nn import PaletteSpec, PalettizedTensor, palettized_parameters  # noqa: E402
from qat_helpers import palettized_linear  # noqa: E402
from palettized_models import AllKinds, palettize, trained_bn  # noqa: E402

MIXED = {"embed": ClusterConfig(bits=1, dim=2), "conv1": ClusterConfig(bits=3),
         "conv2": ClusterConfig(bits=5, granularity="per_grouped_channel", group_size=2),
         "fc": ClusterConfig(bits=8, dim=2, lut_dtype="float16")}
GROUPED = {"embed": ClusterConfig(bits=2, granularity="per_grouped_channel", group_size=8),
           "conv1": ClusterConfig(bits=4, granularity="per_grouped_channel", group_size=4),
           "conv2": ClusterConfig(bits=6, dim=3), "fc": ClusterConfig(bits=7, dim=4)}


def lut_ops(mlmodel):
    ops = [op for function in mlmodel._mil_program.functions.values() for op in function.operations]
    # named after the weight ("fc_weight"), with "_cast_fp16" appended where the LUT was cast to float16
    return {op.name.removesuffix("_cast_fp16"): op for op in ops if op.op_type == "constexpr_lut_to_dense"}


def palettized(model):
    """layer name -> its palettized weight."""
    return {name.removesuffix(".weight"): w for name, w in palettized_parameters(model).items()}


@pytest.mark.parametrize("configs", [MIXED, GROUPED], ids=["mixed bits, d>1", "grouped LUTs, 6/7 bits"])
def test_float32_decompressed_weights_equal_dequantize_weight(configs):
    model = palettize(trained_bn(AllKinds()), configs)
    mlmodel = to_coreml(model, model.example_inputs(), compute_precision=ct.precision.FLOAT32)
    ops = lut_ops(mlmodel)
    layers = palettized(model)
    assert sorted(ops) == sorted(f"{name.replace('.', '_')}_weight" for name in layers)
    for name, layer in layers.items():
        weight = torch.from_numpy(ops[f"{name.replace('.', '_')}_weight"].materialized_val_inference())
        assert weight.dtype == layer.lut.dtype  # float32 LUTs stay float32; a float16 LUT stays float16
        assert torch.equal(weight.to(layer.weight_dtype), layer.dequantize()), name


def test_default_precision_gives_the_float16_rounding():
    model = palettize(AllKinds(), MIXED)
    ops = lut_ops(to_coreml(model, model.example_inputs()))
    for name, layer in palettized(model).items():
        weight = torch.from_numpy(ops[f"{name}_weight"].materialized_val_inference())
        assert weight.dtype == torch.float16 and torch.equal(weight, layer.dequantize().half()), name


def test_mlpackage_is_the_packed_size_plus_the_rest(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 512))
    model = palettize(model, {"0": ClusterConfig(bits=4), "2": ClusterConfig(bits=3)})
    path = tmp_path / "m.mlpackage"
    to_coreml(model, (torch.randn(1, 256),), path, compute_precision=ct.precision.FLOAT32)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    stored = size_report(model).total_bytes
    assert stored <= size <= 1.1 * stored
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]  # no temporary left behind


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pruned_layers_decompress_exactly(bits):
    model = palettize(AllKinds(), {name: ClusterConfig(bits=bits, sparsity=0.6)
                                   for name in ("embed", "conv1", "conv2", "fc")})
    ops = lut_ops(to_coreml(model, model.example_inputs(), compute_precision=ct.precision.FLOAT32))
    for name, layer in palettized(model).items():
        assert layer.mask is not None
        weight = torch.from_numpy(ops[f"{name}_weight"].materialized_val_inference())
        assert torch.equal(weight, layer.dequantize()), name
        assert int((weight == 0).sum()) >= 0.6 * weight.numel() - 1


def test_what_core_ml_cannot_express_is_refused():
    torch.manual_seed(0)
    wide = nn.Sequential(palettized_linear(8, 4, torch.randint(0, 1024, (1, 32)), torch.randn(1, 1024, 1), 10))
    with pytest.raises(ValueError, match=r"layer '0': Core ML palettizes with at most 8 bits; this layer has bits=10"):
        to_coreml(wide, (torch.randn(1, 8),))
    pruned8 = palettize(nn.Sequential(nn.Linear(8, 4)), {"0": ClusterConfig(bits=8, sparsity=0.5)})
    with pytest.raises(ValueError, match=r"layer '0': Core ML palettizes with at most 7 bits for a pruned layer"):
        to_coreml(pruned8, (torch.randn(1, 8),))
    crossing = palettize(nn.Sequential(nn.Conv2d(2, 4, 3)), {"0": ClusterConfig(bits=2, dim=2)})
    with pytest.raises(ValueError, match=r"layer '0': .*dim=2 does not divide the last axis of the \[4, 2, 3, 3\]"):
        to_coreml(crossing, (torch.randn(1, 2, 5, 5),))


def test_palettized_weight_outside_a_layer_is_refused():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            weight = PalettizedTensor.build(torch.randint(0, 4, (1, 8)), torch.randn(1, 4, 1), PaletteSpec(2, 1, (2, 4)))
            self.w = nn.Parameter(weight, requires_grad=False)

        def forward(self, x):
            return nn.functional.linear(x, self.w)
    with pytest.raises(ValueError, match=r"'w': a palettized weight outside a layer \(a PT2E graph\) cannot be conv"):
        to_coreml(Holder(), (torch.randn(1, 4),))
