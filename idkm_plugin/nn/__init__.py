"""Converted modules holding packed codes + lookup tables."""
from .convert import palettize_module, palettized_class
from .palettized import (PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding, PalettizedLinear,
                         PalettizedModule)

__all__ = ["PalettizedConv1d", "PalettizedConv2d", "PalettizedEmbedding", "PalettizedLinear", "PalettizedModule",
           "palettize_module", "palettized_class"]
