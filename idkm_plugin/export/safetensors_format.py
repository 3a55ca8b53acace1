"""The safetensors file format, written and read with torch alone.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the raw little-endian
tensor bytes. The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets into the data section) and may hold "__metadata__": {str: str}. The header is padded
with spaces to a multiple of 8 bytes, and tensors are laid out widest dtype first, so every tensor
starts aligned to its element size (as the `safetensors` library writes them).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Mapping, Optional

import torch

from ..atomic import atomic_path

__all__ = ["read_safetensors", "tensor_bytes", "write_safetensors"]

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is big-endian")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, row-major (copied to CPU and made contiguous first)."""
    flat = tensor.detach().to("cpu").contiguous()
    nbytes = flat.numel() * flat.element_size()
    return ctypes.string_at(flat.data_ptr(), nbytes) if nbytes else b""


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, row-major, as a safetensors file stores them."""
    return _tensor_bytes(tensor)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write `tensors` (name -> tensor) and string `metadata` to `path` atomically; returns the file size."""
    _check_little_endian()
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            f.write(_tensor_bytes(tensors[name]))
    return 8 + len(text) + offset


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; every tensor owns its memory.

    Raises ValueError naming the file when it is truncated, longer than its header says, or its
    header is not valid JSON of the format (unknown dtype, shape / offsets that disagree, tensors
    that do not tile the data section exactly)."""
    _check_little_endian()
    data = bytearray(os.path.getsize(path))  # writable, so torch.frombuffer can view it
    with open(path, "rb") as f:
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise ValueError(f"{path}: not a safetensors file or truncated (header length {header_len} "
                         f"exceeds the file's {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupted safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupted safetensors header (__metadata__ must map str to str)")
    body = memoryview(data)[8 + header_len:]
    entries = {name: _entry(path, name, entry) for name, entry in header.items()}
    _check_tiling(path, entries, len(body))
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            raw.copy_(torch.frombuffer(body[begin:end], dtype=torch.uint8))
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, metadata


def _entry(path, name: str, entry) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked for consistency."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{path}: corrupted safetensors header (entry {name!r} is not a tensor description)")
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{path}: corrupted safetensors header (tensor {name!r}: shape {shape!r}, "
                         f"data_offsets {offsets!r})")
    begin, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if end - begin != numel * dtype.itemsize:
        raise ValueError(f"{path}: corrupted safetensors header (tensor {name!r}: {entry['dtype']} {shape} "
                         f"needs {numel * dtype.itemsize} bytes, its offsets give {end - begin})")
    return dtype, shape, begin, end


def _check_tiling(path, entries: dict, body_len: int) -> None:
    """The tensors' byte ranges must cover the data section exactly, without gaps or overlaps."""
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise ValueError(f"{path}: corrupted safetensors header (tensor {name!r} starts at byte {begin} "
                             f"of the data, expected {position})")
        position = end
    if position != body_len:
        state = "truncated" if position > body_len else "longer than its header says"
        raise ValueError(f"{path}: the file is {state}: its header describes {position} bytes of tensor "
                         f"data, the file holds {body_len}")
