"""Turn a float layer plus its trained `WeightClusterer` into the palettized module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..clusterer import WeightClusterer
from .palettized import (PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding, PalettizedLinear,
                         PalettizedModule)

# Matched by isinstance, so QAT subclasses (torch.ao's nn.qat.Linear, ...) map too.
_PALETTIZED = [(nn.Linear, PalettizedLinear), (nn.Conv1d, PalettizedConv1d), (nn.Conv2d, PalettizedConv2d),
               (nn.Embedding, PalettizedEmbedding)]


def palettized_class(module: nn.Module) -> type[PalettizedModule]:
    for float_cls, pal_cls in _PALETTIZED:
        if isinstance(module, float_cls):
            return pal_cls
    raise ValueError(f"{type(module).__name__} cannot be palettized; supported: Linear, Conv1d, Conv2d, Embedding")


def palettize_module(module: nn.Module, clusterer: WeightClusterer, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> PalettizedModule:
    """Build the palettized form of `module` from `clusterer`'s LUT.

    weight / bias override the module's own (e.g. with BatchNorm folded in); the codes are the
    hard nearest-centroid assignment of that weight.
    """
    weight = module.weight if weight is None else weight
    codes, lut = clusterer.codes_and_lut(weight)
    return palettized_class(module).from_float(module, codes, lut, clusterer.config.bits, weight, bias)
