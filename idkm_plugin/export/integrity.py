"""CRC32 checksums of a safetensors file's tensors and header, stored in its own metadata.

`seal` returns the value of metadata[CHECKSUMS_KEY]: a JSON list of the CRC32 (zlib) of every
tensor's bytes, in sorted name order, followed by the CRC32 of the header itself (every other
metadata entry and each tensor's name, dtype and shape, serialised canonically). `verify` recomputes
both from what was read and raises ValueError naming the file and the first tensor (or the header)
that does not match. zlib.crc32 detects every error burst up to 32 bits and any odd number of flipped bits.
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
    return json.dumps(crcs + [_header_crc(tensors, metadata, crcs)], separators=(",", ":"))


def verify(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Raise ValueError naming `path` unless every checksum in metadata[CHECKSUMS_KEY] matches."""
    if CHECKSUMS_KEY not in metadata:
        raise ValueError(f"{path}: corrupted file: its checksums ({CHECKSUMS_KEY!r}) are missing")
    try:
        stored = json.loads(metadata[CHECKSUMS_KEY])
    except json.JSONDecodeError:
        stored = None
    names = sorted(tensors)
    if not isinstance(stored, list) or len(stored) != len(names) + 1 or not all(isinstance(c, int) for c in stored):
        raise ValueError(f"{path}: corrupted file: its checksum list does not match its {len(names)} tensors")
    if _header_crc(tensors, metadata, stored[:-1]) != stored[-1]:
        raise ValueError(f"{path}: corrupted file: the header (metadata, tensor names, dtypes or shapes) "
                         "fails its CRC32 check")
    for name, expected in zip(names, stored):
        if zlib.crc32(tensor_bytes(tensors[name])) != expected:
            raise ValueError(f"{path}: corrupted file: tensor {name!r} fails its CRC32 check")
