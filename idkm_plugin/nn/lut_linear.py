"""LUT matmul: `F.linear` on a palettized weight without materialising it.

`lut_linear` reads a converted layer's storage as it is (packed codes, LUT [groups, 2**bits, d], optional
int8 lut_scale, channel_scale, packed pruning mask) and returns what `F.linear(x, W, bias)` returns on the
decoded weight W [out, in]. With the native op built (`torch.ops.idkm_plugin.lut_linear`, C++ in
idkm_plugin/csrc/lut_linear.cpp) the weight is decoded in registers, 16 weights at a time, and never written to
memory; without it the pure-PyTorch path decodes W and calls `F.linear` (same result, float memory for the call).

`prefers_lut_kernel` says where the kernel is faster than decoding once and calling `F.linear` on the dense
weight (small batches: the thresholds are measured by benchmarks/deploy.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import native
from .channel_scale import scale_weight
from .dequantize import apply_packed_mask, dequantize_packed
from .packing import packed_nbytes

__all__ = ["lut_linear", "lut_linear_reference", "prefers_lut_kernel"]

_OP = "lut_linear"

# Largest number of activation rows (batch x tokens) for which the kernel beats decoding the weight and calling
# F.linear (the cache-off alternative): one thread, AVX-512, 4096 x 4096, 4 and 8 bits, d = 1: the kernel is 1.2x
# faster at 128 rows and 0.8x at 256 (it decodes the weight once per 8 rows; the decode is paid once per call).
# See benchmarks/results/deploy.md.
_MAX_ROWS = 128


def _check(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, bits: int, out_features: int,
           in_features: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"lut_linear: bits={bits} is not allowed; expected 1..8")
    if x.shape[-1] != in_features:
        raise ValueError(f"lut_linear: x {list(x.shape)} does not end in in_features={in_features}")
    if lut.dim() != 3 or lut.shape[1] != 1 << bits:
        raise ValueError(f"lut_linear: lut {list(lut.shape)} does not match bits={bits}: "
                         f"expected [groups, {1 << bits}, d]")
    groups, _, dim = lut.shape
    if in_features % dim or out_features % groups:
        raise ValueError(f"lut_linear: lut [groups={groups}, {1 << bits}, d={dim}] does not fit a "
                         f"[{out_features}, {in_features}] weight: d must divide in_features, groups out_features")
    count = out_features * in_features // dim
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != packed_nbytes(count, bits):
        raise ValueError(f"lut_linear: codes must be packed uint8 [{packed_nbytes(count, bits)}] "
                         f"({count} codes of {bits} bits), got {codes.dtype} {list(codes.shape)}")


def _decoded_lut(lut: torch.Tensor, lut_scale: Optional[torch.Tensor]) -> torch.Tensor:
    if lut.dtype == torch.int8:
        if lut_scale is None:
            raise ValueError("lut_linear: an int8 lut needs its lut_scale [groups]")
        return lut.to(torch.float32) * lut_scale.to(torch.float32).view(-1, 1, 1)
    return lut


def lut_linear_reference(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, bits: int, out_features: int,
                         in_features: int, *, channel_scale: Optional[torch.Tensor] = None,
                         lut_scale: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pure-PyTorch path: decode W [out, in] in x's dtype, then `F.linear`. Arguments as `lut_linear`."""
    _check(x, codes, lut, bits, out_features, in_features)
    count = out_features * in_features // lut.shape[2]
    weight = dequantize_packed(codes, bits, count, _decoded_lut(lut, lut_scale), x.dtype,
                               (out_features, in_features))
    if mask is not None:
        weight = apply_packed_mask(weight, mask, count)
    if channel_scale is not None:
        weight = scale_weight(weight, channel_scale.to(x.dtype))
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def lut_linear(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, bits: int, out_features: int,
               in_features: int, *, channel_scale: Optional[torch.Tensor] = None,
               lut_scale: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., in] (float32 / bfloat16 / float16) -> [..., out] in x's dtype: `F.linear(x, W, bias)` with W the
    decoded palettized weight.

    codes: uint8 [packed_nbytes(out * in / d, bits)], `pack_codes` of the codes [groups, out / groups * in / d]
        (row-major over (row, in / d)); lut: [groups, 2**bits, d] float32 / float16 / bfloat16, or int8 with
        lut_scale float32 [groups]; channel_scale [out] multiplies row o of W ([out, blocks]: each block of
        in / blocks weights of a row by its own scale); mask: uint8
        [packed_nbytes(out * in / d, 1)], 1 bit per d-vector (1 = kept); bias [out].
    Not differentiable (converted models are for inference). Uses the native op on CPU tensors when it is built
    and nothing requires grad, else `lut_linear_reference`.
    """
    op = _native_op()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lut, channel_scale, lut_scale, bias))
    if op is None or needs_grad or x.device.type != "cpu" or torch.compiler.is_compiling():
        return lut_linear_reference(x, codes, lut, bits, out_features, in_features, channel_scale=channel_scale,
                                    lut_scale=lut_scale, mask=mask, bias=bias)
    _check(x, codes, lut, bits, out_features, in_features)
    int8 = lut.dtype == torch.int8
    if int8 and lut_scale is None:
        raise ValueError("lut_linear: an int8 lut needs its lut_scale [groups]")
    y = op(x.reshape(-1, in_features), codes, lut, bits, out_features, in_features, channel_scale,
           lut_scale if int8 else None, mask, bias)
    return y.view(x.shape[:-1] + (out_features,))


@functools.lru_cache(maxsize=None)
def _native_op():
    """torch.ops.idkm_plugin.lut_linear.default, or None where the native ops are not built."""
    return torch.ops.idkm_plugin.lut_linear.default if native.has_op(_OP) else None


def prefers_lut_kernel(x: torch.Tensor, out_features: int, in_features: int, bits: int, dim: int = 1,
                       groups: int = 1) -> bool:
    """True where `lut_linear`'s native kernel is faster than decoding the weight and calling `F.linear`: CPU,
    the op built, and few activation rows (x [..., in]: the product of the leading dims)."""
    if x.device.type != "cpu" or _native_op() is None or torch.compiler.is_compiling():
        return False
    rows = x.numel() // max(in_features, 1)
    return 0 < rows <= _MAX_ROWS and 1 <= bits <= 8
