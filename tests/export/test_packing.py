import pytest
import torch
from torch import nn

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.export import pack_codes, packed_nbytes, size_report, unpack_codes
from idkm_plugin.nn import palettize_module


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [1, 7, 1000])
def test_pack_unpack_round_trip_is_exact(bits, count):
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits))
    codes[0] = (1 << bits) - 1  # the extreme value
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\) for bits=2; got range \[0, 4\]"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="bits=17 is not allowed"):
        pack_codes(torch.tensor([0]), 17)


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
