"""Size reports, self-describing files and runtime exports of the converted (palettized) form.

`pack_codes` / `unpack_codes` / `packed_nbytes` live in `idkm_plugin.nn.packing` (the modules use them)
and are re-exported here. `to_executorch` and `to_coreml` import their runtime lazily.
`save_palettized(model, path, codec="raw" | "huffman")`: `huffman` (canonical Huffman streams) and
`code_layouts` (a layer's codes + mask as packed / huffman / reserved-symbol / sparse) implement the
entropy-coded codec, `integrity` the CRC32 checks every file carries.
"""
from ..nn.packing import pack_codes, packed_nbytes, unpack_codes
from .palettized_file import CODECS, load_palettized, save_palettized
from .report import LayerSize, SizeReport, size_report

__all__ = ["CODECS", "LayerSize", "SizeReport", "load_palettized", "pack_codes", "packed_nbytes", "save_palettized",
           "size_report", "to_coreml", "to_executorch", "unpack_codes"]


def __getattr__(name: str):
    """to_executorch / to_coreml import their runtime (an optional extra) only when used."""
    if name == "to_executorch":
        from .executorch_export import to_executorch
        return to_executorch
    if name == "to_coreml":
        from .coreml_export import to_coreml
        return to_coreml
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
