"""size_report counts the stored bytes of a palettized model exactly."""
from torch import nn

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.export import size_report
from idkm_plugin.layers import palettize_module


def test_size_report_matches_packed_bytes():
    model = nn.Sequential(nn.Linear(300, 64), nn.ReLU(), nn.Linear(64, 10))
    for i, cfg in [(0, ClusterConfig(bits=3)), (2, ClusterConfig(bits=4, dim=2))]:
        clusterer = WeightClusterer(cfg)
        clusterer(model[i].weight)
        model[i] = palettize_module(model[i], clusterer)
    report = size_report(model)
    first, second = report.layers
    assert first.code_bytes == (300 * 64 * 3 + 7) // 8 == model[0].codes.numel()
    assert first.lut_bytes == 8 * 4 and second.lut_bytes == 16 * 2 * 4
    assert second.code_bytes == (64 * 10 // 2 * 4 + 7) // 8
    stored = sum(b.numel() * b.element_size() for b in model.state_dict().values())
    assert report.total_bytes == stored
    assert report.float32_bytes == 4 * sum(p.numel() for p in (nn.Linear(300, 64), nn.Linear(64, 10))
                                           for p in p.parameters())
    assert report.compression_ratio == report.float32_bytes / stored
    assert "| 0 | PalettizedLinear | 19,200 | 3/1 |" in report.to_markdown()
