"""Training loop and checks shared by the integration tests of every toolkit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin.nn import PalettizedTensor, PaletteSpec, palettized_parameters


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


def assert_at_most_k_vectors(layer: nn.Module) -> None:
    """Every LUT group of the deployed layer's weight holds at most 2**bits distinct d-vectors."""
    weight = layer.weight
    assert isinstance(weight, PalettizedTensor), f"{type(layer).__name__} has a float weight"
    vectors = weight.dequantize().reshape(weight.groups_lut, -1, weight.cluster_dim)
    for group in vectors:
        assert torch.unique(group, dim=0).shape[0] <= 1 << weight.bits
    assert int(weight.unpacked_codes().max()) < 1 << weight.bits


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every layer of `model` whose weight is palettized (the converted form)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), PalettizedTensor)}


def palettized(layer: nn.Module, codes: torch.Tensor, lut: torch.Tensor, bits: int, *, channel_scale=None,
               lut_scale=None, mask=None, cache_weight: bool = True, transposed: bool = False) -> nn.Module:
    """`layer` (modified) with its weight replaced by codes + LUT [groups, 2**bits, d] (codes as
    `PalettizedTensor.build` takes them)."""
    shape = tuple(layer.weight.shape)
    spec = PaletteSpec(bits, lut.shape[2], tuple(reversed(shape)) if transposed else shape, lut.shape[0],
                       layer.weight.dtype, transposed)
    layer.weight = nn.Parameter(PalettizedTensor.build(codes, lut, spec, channel_scale, lut_scale, mask,
                                                       cache_weight), requires_grad=False)
    return layer


def palettized_linear(in_features: int, out_features: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                      bias: torch.Tensor | None = None, **kwargs) -> nn.Linear:
    """An nn.Linear whose weight [out, in] is codes + LUT (and `bias` [out] when given)."""
    layer = nn.Linear(in_features, out_features, bias=bias is not None)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return palettized(layer, codes, lut, bits, **kwargs)


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight (as GPT-2 / BERT / SmolLM tie them)."""

    def __init__(self, vocab: int = 32, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))
