"""size_report counts the stored bytes of a palettized model exactly (a tied weight once)."""
import torch
from torch import nn

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.export import save_palettized, size_report
from idkm_plugin.nn import PalettizedTensor
from idkm_plugin.layers import palettize_module


def test_size_report_matches_packed_bytes():
    model = nn.Sequential(nn.Linear(300, 64), nn.ReLU(), nn.Linear(64, 10))
    for i, cfg in [(0, ClusterConfig(bits=3)), (2, ClusterConfig(bits=4, dim=2))]:
        clusterer = WeightClusterer(cfg)
        clusterer(model[i].weight)
        model[i] = palettize_module(model[i], clusterer)
    report = size_report(model)
    first, second = report.layers
    assert first.code_bytes == (300 * 64 * 3 + 7) // 8 == model[0].weight.codes.numel()
    assert first.lut_bytes == 8 * 4 and second.lut_bytes == 16 * 2 * 4
    assert second.code_bytes == (64 * 10 // 2 * 4 + 7) // 8
    stored = sum(b.nbytes_stored if isinstance(b, PalettizedTensor) else b.numel() * b.element_size()
                 for b in model.state_dict().values())
    assert report.total_bytes == stored
    assert report.float32_bytes == 4 * sum(p.numel() for p in (nn.Linear(300, 64), nn.Linear(64, 10))
                                           for p in p.parameters())
    assert report.compression_ratio == report.float32_bytes / stored
    assert "| 0 | Linear | 19,200 | 3/1 |" in report.to_markdown()


def test_a_tied_weight_is_counted_once_and_agrees_with_the_file(tmp_path):
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64, bias=False))
    model[1].weight = model[0].weight
    clusterer = WeightClusterer(ClusterConfig(bits=3))
    clusterer(model[0].weight)
    model[0] = palettize_module(model[0], clusterer)
    model[1] = palettize_module(model[1], clusterer)
    assert model[1].weight is model[0].weight  # one Parameter, converted once
    report = size_report(model)
    assert [layer.name for layer in report.layers] == ["0"] and report.other_bytes == 0
    assert report.float32_bytes == 4 * 64 * 16
    size = save_palettized(model, tmp_path / "tied.safetensors")
    header = int.from_bytes((tmp_path / "tied.safetensors").read_bytes()[:8], "little")
    assert size - 8 - header == report.total_bytes == (64 * 16 * 3 + 7) // 8 + 8 * 4
