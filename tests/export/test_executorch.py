"""The .pte runs under executorch.runtime and matches the palettized PyTorch model; weights stay packed."""
import os

import pytest
import torch
from torch import nn

pytest.importorskip("executorch.runtime", reason="ExecuTorch is not installed (extra: executorch)")

from executorch.runtime import Runtime  # noqa: E402

from idkm_plugin import ClusterConfig  # noqa: E402
from idkm_plugin.export import size_report, to_executorch  # noqa: E402
from idkm_plugin.export.executorch_export import export_program  # noqa: E402
from idkm_plugin.nn import palettized_parameters  # noqa: E402
from palettized_models import CONFIGS, AllKinds, palettize, trained_bn  # noqa: E402


def run_pte(path, inputs):
    method = Runtime.get().load_program(str(path)).load_method("forward")
    return method.execute(list(inputs))[0]


def max_relative_error(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("case", ["bits 1..8 mixed", "grouped LUTs"])
def test_pte_matches_the_palettized_model(tmp_path, case):
    torch.manual_seed(0)
    model = palettize(trained_bn(AllKinds()), CONFIGS[case])
    inputs = model.example_inputs()
    path = tmp_path / "model.pte"
    size = to_executorch(model, inputs, path)
    assert size == os.path.getsize(path)
    with torch.no_grad():
        ref = model(*inputs)
    assert max_relative_error(run_pte(path, inputs), ref) <= 1e-4


def test_program_constants_are_the_packed_codes_and_luts():
    """No dense weight is folded into the program: its uint8 constants are exactly the packed codes."""
    model = palettize(AllKinds(), CONFIGS["d>1, float16 LUT"])
    program = export_program(model, model.example_inputs())
    constants = {**program.state_dict, **program.constants}
    weights = palettized_parameters(model)
    for name, weight in weights.items():
        assert torch.equal(constants[f"model.{name}_codes"], weight.codes)
    weight_shapes = {tuple(w.shape) for w in weights.values()}
    float_constants = [t for t in constants.values() if t.is_floating_point()]
    assert not any(tuple(t.shape) in weight_shapes for t in float_constants)


def test_pte_size_is_the_packed_size_plus_the_rest(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4000, 64), nn.Flatten(), nn.Linear(64 * 4, 1024), nn.ReLU(),
                          nn.Linear(1024, 512))
    model = palettize(model, {"0": ClusterConfig(bits=2), "2": ClusterConfig(bits=4), "4": ClusterConfig(bits=3)})
    inputs = (torch.randint(0, 4000, (2, 4)),)
    size = to_executorch(model, inputs, tmp_path / "m.pte")
    stored = size_report(model).total_bytes
    assert stored <= size <= 1.1 * stored
    assert max_relative_error(run_pte(tmp_path / "m.pte", inputs), model(*inputs)) <= 1e-4


def test_demo_cnn_pte_matches(tmp_path):
    pytest.importorskip("ccexam", reason="ccexam is not installed")
    from ccexam.models import MNISTNet

    torch.manual_seed(0)
    model = palettize(MNISTNet(28), {"features.0": ClusterConfig(bits=8), "features.3": ClusterConfig(bits=2),
                                     "classifier.0": ClusterConfig(bits=4, dim=4),
                                     "classifier.2": ClusterConfig(bits=8)})
    x = torch.randn(4, 1, 28, 28)
    to_executorch(model, (x,), tmp_path / "cnn.pte")
    with torch.no_grad():
        ref = model(x)
    assert max_relative_error(run_pte(tmp_path / "cnn.pte", (x,)), ref) <= 1e-4


def test_dense_convolutions_keep_linears_packed_and_match(tmp_path):
    """The speed option: convolutions stored decoded (XNNPACK runs them), every other weight still packed."""
    torch.manual_seed(0)
    model = palettize(trained_bn(AllKinds()), CONFIGS["bits 1..8 mixed"])
    inputs = model.example_inputs()
    program = export_program(model, inputs, dense_convolutions=True)
    constants = {**program.state_dict, **program.constants}
    assert "model.fc.weight_codes" in constants and "model.embed.weight_codes" in constants
    assert "model.conv1.weight_codes" not in constants
    assert torch.equal(constants["model.conv2.weight"], model.conv2.weight.dequantize())
    to_executorch(model, inputs, tmp_path / "m.pte", dense_convolutions=True)
    with torch.no_grad():
        ref = model(*inputs)
    assert max_relative_error(run_pte(tmp_path / "m.pte", inputs), ref) <= 1e-4


def test_float_conv_with_batchnorm_beside_palettized_layers(tmp_path):
    """A conv left float before a BatchNorm lowers too (ExecuTorch's conv+BN fusion is picky)."""
    torch.manual_seed(0)
    model = palettize(trained_bn(AllKinds()), {"fc": ClusterConfig(bits=4), "embed": ClusterConfig(bits=2)})
    inputs = model.example_inputs()
    to_executorch(model, inputs, tmp_path / "m.pte")
    with torch.no_grad():
        ref = model(*inputs)
    assert max_relative_error(run_pte(tmp_path / "m.pte", inputs), ref) <= 1e-4


def test_dense_convolutions_of_the_demo_cnn_run_under_xnnpack(tmp_path):
    """MNISTNet's first conv has one input channel (XNNPACK makes it depthwise): it must still load."""
    pytest.importorskip("ccexam", reason="ccexam is not installed")
    from ccexam.models import MNISTNet

    torch.manual_seed(0)
    model = palettize(MNISTNet(28), {"features.0": ClusterConfig(bits=8), "features.3": ClusterConfig(bits=2),
                                     "classifier.0": ClusterConfig(bits=4, dim=4)})
    x = torch.randn(2, 1, 28, 28)
    to_executorch(model, (x,), tmp_path / "cnn.pte", dense_convolutions=True)
    with torch.no_grad():
        ref = model(x)
    assert max_relative_error(run_pte(tmp_path / "cnn.pte", (x,)), ref) <= 1e-4


def test_in_place_sort_moves_only_out_of_order_nodes():
    """The per-partition re-sort the lowering uses: a node placed before its input moves after it (the graph then
    computes what it did), an ordered graph is left as it is."""
    from idkm_plugin.export.executorch_export import _stable_topological_sort

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.neg, (x,))
    b = graph.call_function(torch.relu, (a,))
    c = graph.call_function(torch.exp, (x,))
    graph.output(graph.call_function(torch.add, (b, c)))
    a.prepend(b)  # b before its input a
    names = [node.name for node in graph.nodes]
    assert names.index("relu") < names.index("neg")
    assert _stable_topological_sort(graph)
    assert [node.name for node in graph.nodes] == ["x", "neg", "relu", "exp", "add", "output"]
    assert not _stable_topological_sort(graph)
    gm = torch.fx.GraphModule(nn.Module(), graph)
    v = torch.randn(5)
    torch.testing.assert_close(gm(v), torch.relu(-v) + torch.exp(v), rtol=0, atol=0)
