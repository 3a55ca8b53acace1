"""CRC32 checksums of a safetensors file's tensors and header, stored in its own metadata.

`seal` returns the value of metadata[CHECKSUMS_KEY]: the CRC32 (zlib) of every tensor's bytes, in
sorted name order, then the CRC32 of the header itself (every other metadata entry and each tensor's
name, dtype and shape, serialised canonically, with the tensors' CRCs), each as 8 hex digits,
concatenated. `verify` recomputes both from what was read and raises ValueError naming the file and
the first tensor (or the header) that does not match. CRC32 detects every error burst of up to 32 bits.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Mapping

import torch

from .safetensors_format import tensor_bytes

__all__ = ["CHECKSUMS_KEY", "seal", "verify"]

CHECKSUMS_KEY = "idkm_plugin.crc32"


def _header_crc(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], crcs: list[int]) -> int:
    described = {name: [str(t.dtype), list(t.shape)] for name, t in sorted(tensors.items())}
    others = {k: v for k, v in sorted(metadata.items()) if k != CHECKSUMS_KEY}
    text = json.dumps([others, described, crcs], sort_keys=True, separators=(",", ":"))
    return zlib.crc32(text.encode("utf-8"))


def seal(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The checksums entry for a file holding `tensors` and `metadata` (without this entry)."""
    crcs = [zlib.crc32(tensor_bytes(tensors[name])) for name in sorted(tensors)]
    return "".join(f"{crc:08x}" for crc in crcs + [_header_crc(tensors, metadata, crcs)])


def verify(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Raise ValueError naming `path` unless every checksum in metadata[CHECKSUMS_KEY] matches."""
    if CHECKSUMS_KEY not in metadata:
        raise ValueError(f"{path}: corrupted file: its checksums ({CHECKSUMS_KEY!r}) are missing")
    text, names = metadata[CHECKSUMS_KEY], sorted(tensors)
    try:
        stored = [int(text[i:i + 8], 16) for i in range(0, len(text), 8)]
    except ValueError:
        stored = []
    if len(text) != 8 * (len(names) + 1) or len(stored) != len(names) + 1:
        raise ValueError(f"{path}: corrupted file: its checksums do not match its {len(names)} tensors")
    if _header_crc(tensors, metadata, stored[:-1]) != stored[-1]:
        raise ValueError(f"{path}: corrupted file: the header (metadata, tensor names, dtypes or shapes) "
                         "fails its CRC32 check")
    for name, expected in zip(names, stored):
        if zlib.crc32(tensor_bytes(tensors[name])) != expected:
            raise ValueError(f"{path}: corrupted file: tensor {name!r} fails its CRC32 check")
