"""Training loop and checks shared by the integration tests of every toolkit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin.nn import PalettizedModule


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 64,
          lr: float = 3e-3) -> list[float]:
    """Adam on minibatches cycling through (x [n, ...], y [n]) with cross-entropy; the loss of every step.

    The model's mode is the caller's (exported PT2E models refuse `.train()`).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        i = (step * batch) % len(x)
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_at_most_k_vectors(layer: PalettizedModule) -> None:
    """Every LUT group of the deployed weight holds at most 2**bits distinct d-vectors."""
    vectors = layer.dequantize_weight().reshape(layer.groups_lut, -1, layer.dim)
    for group in vectors:
        assert torch.unique(group, dim=0).shape[0] <= 1 << layer.bits
    assert int(layer.unpacked_codes().max()) < 1 << layer.bits
