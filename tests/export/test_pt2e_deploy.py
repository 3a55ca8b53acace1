"""A PT2E-converted graph (palettized weight Parameters read by get_attr) saves, reloads into the graph, and runs as
a .pte."""
import copy
import logging

import pytest
import torch

pytest.importorskip("torchao")
logging.getLogger("torchao").setLevel(logging.ERROR)
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e  # noqa: E402

from idkm_plugin import ClusterConfig  # noqa: E402
from idkm_plugin.export import load_palettized, save_palettized  # noqa: E402
from idkm_plugin.integrations.torch_ao import IDKMQuantizer, convert_pt2e_palettized  # noqa: E402
from idkm_plugin.nn import PalettizedTensor, palettized_parameters  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def deployed():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    qat = prepare_qat_pt2e(torch.export.export(Net().train(), (x,)).module(), IDKMQuantizer(ClusterConfig(bits=3)))
    qat(x)  # one training forward sets the centroids
    return convert_pt2e_palettized(qat), x


def test_graph_with_palettized_weights_round_trips(tmp_path, deployed):
    graph, x = deployed
    assert len(palettized_parameters(graph)) == 2
    save_palettized(graph, tmp_path / "graph.safetensors")
    skeleton = copy.deepcopy(graph)
    for weight in palettized_parameters(skeleton).values():
        with torch.no_grad():
            weight.lut.zero_()
    loaded = load_palettized(tmp_path / "graph.safetensors", skeleton)
    assert torch.equal(loaded(x), graph(x))


def test_graph_runs_as_a_pte(tmp_path, deployed):
    pytest.importorskip("executorch.runtime", reason="ExecuTorch is not installed")
    from executorch.runtime import Runtime

    from idkm_plugin.export import to_executorch

    graph, x = deployed
    to_executorch(graph, (x,), tmp_path / "graph.pte")
    out = Runtime.get().load_program(str(tmp_path / "graph.pte")).load_method("forward").execute([x])[0]
    with torch.no_grad():
        ref = graph(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
