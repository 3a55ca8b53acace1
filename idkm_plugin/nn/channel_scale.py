"""Per-channel and per-block weight scales: one rule, shared by training, conversion and decoding.

A scale tensor for a weight [out, ...] is either [out] (one scale per output channel) or [out, blocks] (one scale
per block of row_length / blocks consecutive weights of each output channel, in the row's row-major order).
"""
from __future__ import annotations

import math

import torch

__all__ = ["check_scale_shape", "scale_weight", "unscale_weight"]


def _blocked(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight as [out, blocks, block], scale as [out, blocks, 1])."""
    out = weight.shape[0] if weight.dim() else 1
    s = scale.reshape(out, -1, 1)
    return weight.reshape(out, s.shape[1], -1), s


def scale_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight [out, ...] times its scales ([out] or [out, blocks]), in the weight's shape."""
    w, s = _blocked(weight, scale)
    return (w * s).reshape(weight.shape)


def unscale_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight [out, ...] divided by its scales ([out] or [out, blocks]), in the weight's shape."""
    w, s = _blocked(weight, scale)
    return (w / s).reshape(weight.shape)


def check_scale_shape(scale: torch.Tensor, weight_shape: tuple[int, ...], what: str = "channel_scale") -> None:
    """Raise ValueError unless `scale` is [out] or [out, blocks] with blocks dividing the row length."""
    out = weight_shape[0] if len(weight_shape) else 1
    row = math.prod(weight_shape[1:])
    ok = (scale.dim() == 1 and scale.shape[0] == out) or (
        scale.dim() == 2 and scale.shape[0] == out and scale.shape[1] >= 1 and row % scale.shape[1] == 0)
    if not ok:
        raise ValueError(f"{what} {list(scale.shape)} does not match a {list(weight_shape)} weight: expected [{out}] "
                         f"(one per output channel) or [{out}, blocks] with blocks dividing the row length {row}")
