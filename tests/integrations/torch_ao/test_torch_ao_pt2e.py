"""PT2E: torch.export -> prepare_qat_pt2e(IDKMQuantizer) -> train -> convert_pt2e_palettized."""
import logging

import pytest
import torch

pytest.importorskip("torchao")
logging.getLogger("torchao").setLevel(logging.ERROR)
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e  # noqa: E402

from mnist_data import mnist  # noqa: E402
from qat_helpers import train  # noqa: E402
from torch_ao_models import MnistNet  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.torch_ao import (IDKMFakeQuantize, IDKMQuantizer,  # noqa: E402
                                               convert_pt2e_palettized, pt2e_eval)
from idkm_plugin.nn import palettized_parameters  # noqa: E402

MP = ModelConfig(default=ClusterConfig(method="idkm", bits=2, max_iter=10),
                 by_name={"fc": ClusterConfig(bits=3, dim=2, max_iter=10), "emb": None})


@pytest.mark.parametrize("bn", [False, True])
def test_pt2e_converted_keeps_codes_and_lut_and_equals_eval_qat(bn):
    torch.manual_seed(0)
    x, y = mnist("train", 640)
    # static batch of 64 (train() uses batches of 64; dynamic shapes make torchao's conv-bn rewrite slow)
    exported = torch.export.export(MnistNet(bn=bn).train(), (x[:64],)).module()
    qat = prepare_qat_pt2e(exported, IDKMQuantizer(MP))
    fqs = {m.clusterer.name: m.config for m in qat.modules() if isinstance(m, IDKMFakeQuantize)}
    assert sorted(fqs) == ["conv", "conv1d", "dw", "fc"] and fqs["fc"].bits == 3 and fqs["fc"].dim == 2
    train(qat, x, y, steps=5)
    xt = mnist("test", 64)[0]
    ref = pt2e_eval(qat)(xt)
    deployed = convert_pt2e_palettized(qat)
    weights = palettized_parameters(deployed)
    assert sorted(weights) == ["conv1d_palettized_weight", "conv_palettized_weight", "dw_palettized_weight",
                               "fc_palettized_weight"]
    assert weights["fc_palettized_weight"].lut.shape == (1, 8, 2)
    for w in weights.values():
        assert w.codes.dtype == torch.uint8
        dense = w.dequantize().reshape(w.lut.shape[0], -1, w.lut.shape[2])
        assert torch.unique(dense[0], dim=0).shape[0] <= w.lut.shape[1]
    names = {n for n, _ in deployed.named_parameters()}
    assert not names & {"conv.weight", "dw.weight", "conv1d.weight", "fc.weight"}  # no float copy kept
    assert "emb.weight" in names  # None in the ModelConfig: left float
    reads = [n for n in deployed.graph.nodes if n.op == "get_attr" and n.target in weights]
    assert len(reads) == 4  # the palettized weights are what the graph reads
    # BN stays a separate op after the conv in torchao's QAT pattern, so no reordering: exact.
    assert torch.equal(deployed(xt), ref)
