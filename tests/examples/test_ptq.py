"""examples/ptq.py: post-training k-means clusters what the LUT encodes (the channel-normalised weight)."""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from ptq import ptq_kmeans  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402


def test_ptq_with_per_channel_scales_clusters_the_normalised_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():  # output channels whose scales differ by three orders of magnitude
        model[0].weight.mul_(torch.logspace(-3, 0, 16).unsqueeze(1))
    ptq = ptq_kmeans(model, ModelConfig(default=ClusterConfig(bits=4, per_channel_scale="max_abs")))
    layer = ptq[0]
    assert layer.weight.decoded_lut().abs().max() <= 1.0 + 1e-6  # centroids live in the normalised [-1, 1] space
    w, w_hat = model[0].weight.detach(), layer.weight.dequantize()
    per_channel_error = (w - w_hat).norm(dim=1) / w.norm(dim=1)
    assert per_channel_error.max() < 0.08  # Lloyd on the raw weight (the old bug) leaves 0.10
