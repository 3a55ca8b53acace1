"""safetensors files through the `safetensors` library: written atomically, read with errors that name the file.

Tensors must not share memory (the caller stores a tied tensor once and records the alias); `tensor_bytes` gives
a tensor's bytes as the file stores them, for the checksums.
"""
from __future__ import annotations

import ctypes
import json
import os
from typing import Mapping, Optional

import torch

from ..atomic import atomic_write_bytes

__all__ = ["read_safetensors", "tensor_bytes", "write_safetensors"]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, row-major, as a safetensors file stores them."""
    flat = tensor.detach().to("cpu").contiguous()
    nbytes = flat.numel() * flat.element_size()
    return ctypes.string_at(flat.data_ptr(), nbytes) if nbytes else b""


def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]]) -> bytes:
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
                dict(metadata) if metadata else None)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write `tensors` (name -> tensor) and string `metadata` to `path` atomically; returns the file size."""
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    data = _serialize(tensors, metadata)
    atomic_write_bytes(path, data)
    return len(data)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; every tensor owns its memory. Raises ValueError naming the file
    when it is not a valid safetensors file (truncated, a header that is not the format's JSON)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: corrupted file: not a valid safetensors file ({error})") from None
    return tensors, dict(metadata)
