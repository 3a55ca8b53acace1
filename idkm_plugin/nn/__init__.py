"""Converted modules holding packed codes + lookup tables, and the bit packing they use.

(`palettize_module`, which builds them from a float layer and its clusterer, is in `idkm_plugin.layers`.)
"""
from .dequantize import dequantize_packed
from .gpt_conv1d import PalettizedConv1D
from .packing import pack_codes, packed_nbytes, unpack_codes
from .palettized import (PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding, PalettizedLinear,
                         PalettizedModule, PalettizedWeight)

__all__ = ["PalettizedConv1D", "PalettizedConv1d", "PalettizedConv2d", "PalettizedEmbedding", "PalettizedLinear",
           "PalettizedModule",
           "PalettizedWeight", "dequantize_packed", "pack_codes", "packed_nbytes", "unpack_codes"]
