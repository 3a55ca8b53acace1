"""The converted form: `PalettizedTensor`, a palettized weight (packed n-bit codes + LUTs) on the unchanged float
module, and the bit packing and decoding it uses. (`palettize_module`, which converts a layer with its clusterer,
is in `idkm_plugin.conversion`.)
"""
from .dequantize import dequantize_packed
from .packing import pack_codes, packed_nbytes, unpack_codes
from .palettized_tensor import PaletteSpec, PalettizedTensor, is_palettized, palettized_parameters

__all__ = ["PaletteSpec", "PalettizedTensor", "dequantize_packed", "is_palettized", "pack_codes", "packed_nbytes",
           "palettized_parameters", "unpack_codes"]
