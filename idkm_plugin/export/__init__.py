"""Bit packing and size reports of the converted form."""
from .packing import pack_codes, packed_nbytes, unpack_codes
from .report import LayerSize, SizeReport, size_report

__all__ = ["LayerSize", "SizeReport", "pack_codes", "packed_nbytes", "size_report", "unpack_codes"]
