"""Small models with one layer of every palettized kind, palettized without QAT (shared by the export tests)."""
import torch
from torch import nn

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.layers import palettize_module


class AllKinds(nn.Module):
    """One layer of every palettized kind, plus float layers with buffers (BatchNorm) left alone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 12, padding_idx=0)
        self.conv1 = nn.Conv1d(12, 16, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(16 * 7 + 8 * 4 * 4, 10)

    def example_inputs(self):
        return torch.randint(0, 40, (2, 7)), torch.randn(2, 4, 8, 8)

    def forward(self, ids, image):
        seq = self.conv1(self.embed(ids).transpose(1, 2)).flatten(1)
        img = self.bn(self.conv2(image)).flatten(1)
        return self.fc(torch.cat([seq, img], 1))


def palettize(model, config_of):
    """Replace each named layer by its palettized form (centroids from one training forward)."""
    torch.manual_seed(0)
    for name, cfg in config_of.items():
        layer = model.get_submodule(name)
        clusterer = WeightClusterer(cfg, name)
        clusterer(layer.weight)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, palettize_module(layer, clusterer))
    return model.eval()


def trained_bn(model):
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked += 3
    return model


CONFIGS = {
    "bits 1..8 mixed": {"embed": ClusterConfig(bits=1), "conv1": ClusterConfig(bits=3),
                        "conv2": ClusterConfig(bits=5), "fc": ClusterConfig(bits=8)},
    "d>1, float16 LUT": {"embed": ClusterConfig(bits=2, dim=4, lut_dtype="float16"),
                         "conv1": ClusterConfig(bits=4, dim=2), "conv2": ClusterConfig(bits=6, dim=3),
                         "fc": ClusterConfig(bits=7, dim=2)},
    "grouped LUTs": {"embed": ClusterConfig(bits=2, granularity="per_grouped_channel", group_size=8),
                     "conv1": ClusterConfig(bits=3, granularity="per_grouped_channel", group_size=4),
                     "conv2": ClusterConfig(bits=4, granularity="per_grouped_channel", group_size=2),
                     "fc": ClusterConfig(bits=2, dim=2, granularity="per_grouped_channel", group_size=5)},
}
