"""Converted (deployed) modules: bit-packed n-bit codes + per-layer lookup tables.

Each module stores
    codes: uint8 [ceil(numel / d * bits / 8)]  the packed code of every d-vector,
    lut:   [groups, 2**bits, d]                 the lookup table(s), in lut_dtype,
and rebuilds the dense weight in `dequantize_weight()`: lut[codes] reshaped to the weight shape.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple, _single

from ..core import lookup
from ..export.packing import pack_codes, unpack_codes


class PalettizedModule(nn.Module):
    """Common storage and dequantization of the palettized layers."""

    def __init__(self, weight_shape: tuple[int, ...], codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 bias: Optional[torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        """codes [groups, m] int (values < 2**bits), lut [groups, 2**bits, d]."""
        super().__init__()
        groups, m = codes.shape
        if lut.shape[0] != groups or lut.shape[1] != 1 << bits:
            raise ValueError(f"codes {list(codes.shape)} and lut {list(lut.shape)} do not match bits={bits}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.bits = int(bits)
        self.dim = int(lut.shape[2])
        self.num_codes = groups * m
        self.weight_dtype = dtype
        self.register_buffer("codes", pack_codes(codes, bits))
        self.register_buffer("lut", lut.detach().clone())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def groups_lut(self) -> int:
        return self.lut.shape[0]

    def unpacked_codes(self) -> torch.Tensor:
        """codes [groups, m] int64."""
        return unpack_codes(self.codes, self.bits, self.num_codes).view(self.groups_lut, -1)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense weight [weight_shape] in the layer's dtype."""
        return lookup(self.unpacked_codes(), self.lut).reshape(self.weight_shape).to(self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"weight_shape={list(self.weight_shape)}, bits={self.bits}, dim={self.dim}, "
                f"luts={self.groups_lut}, lut_dtype={self.lut.dtype}")


class PalettizedLinear(PalettizedModule):
    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__((out_features, in_features), codes, lut, bits, bias, dtype)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, module: nn.Linear, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> "PalettizedLinear":
        bias = module.bias if bias is None else bias
        return cls(module.in_features, module.out_features, codes, lut, bits, bias, module.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight(), self.bias)


class _PalettizedConvNd(PalettizedModule):
    _conv = None  # F.conv1d / F.conv2d
    _tuple = None

    def __init__(self, weight_shape, codes, lut, bits, bias, stride, padding, dilation, groups,
                 padding_mode: str = "zeros", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(weight_shape, codes, lut, bits, bias, dtype)
        self.out_channels, in_per_group = weight_shape[0], weight_shape[1]
        self.in_channels = in_per_group * groups
        self.kernel_size = tuple(weight_shape[2:])
        self.stride, self.dilation, self.groups = self._tuple(stride), self._tuple(dilation), groups
        self.padding = padding if isinstance(padding, str) else self._tuple(padding)
        self.padding_mode = padding_mode
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError(f"padding={padding!r} with padding_mode={padding_mode!r} is not supported")
            self._pad = _reverse_repeat_tuple(self.padding, 2)

    @classmethod
    def from_float(cls, module, codes, lut, bits, weight=None, bias=None):
        bias = module.bias if bias is None else bias
        return cls(tuple(module.weight.shape), codes, lut, bits, bias, module.stride, module.padding,
                   module.dilation, module.groups, module.padding_mode, module.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return type(self)._conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return type(self)._conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, " + super().extra_repr())


class PalettizedConv1d(_PalettizedConvNd):
    _conv = staticmethod(F.conv1d)
    _tuple = staticmethod(_single)


class PalettizedConv2d(_PalettizedConvNd):
    _conv = staticmethod(F.conv2d)
    _tuple = staticmethod(_pair)


class PalettizedEmbedding(PalettizedModule):
    def __init__(self, num_embeddings: int, embedding_dim: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__((num_embeddings, embedding_dim), codes, lut, bits, None, dtype)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_float(cls, module: nn.Embedding, codes, lut, bits, weight=None, bias=None) -> "PalettizedEmbedding":
        if module.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalises its weight in place; "
                             "a palettized embedding cannot, so convert one without max_norm")
        return cls(module.num_embeddings, module.embedding_dim, codes, lut, bits, module.padding_idx,
                   module.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.dequantize_weight(), self.padding_idx)
