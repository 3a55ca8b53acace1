"""Reshape a weight of any layer kind into [groups, m, d] clustering vectors and back."""
from __future__ import annotations

import torch


def vector_shape(weight_shape: torch.Size | tuple[int, ...], dim: int, group_size: int = 0,
                 name: str = "weight") -> tuple[int, int, int]:
    """The [groups, m, d] shape for a weight, or a ValueError naming the problem.

    group_size 0 means one group (a LUT per tensor); otherwise each group holds `group_size`
    consecutive output channels (dim 0 of the weight), flattened across kernel and channel
    boundaries as DKM does.
    """
    shape = tuple(weight_shape)
    numel = 1
    for s in shape:
        numel *= s
    out_channels = shape[0] if shape else 1
    if group_size:
        if out_channels % group_size:
            raise ValueError(f"{name}: group_size={group_size} does not divide the {out_channels} output "
                             f"channels of shape {list(shape)}; use a divisor of {out_channels}")
        groups = out_channels // group_size
    else:
        groups = 1
    per_group = numel // groups
    if per_group % dim:
        raise ValueError(f"{name}: cluster dim={dim} does not divide the {per_group} weights per LUT "
                         f"(shape {list(shape)}); use a dim that divides {per_group}")
    return groups, per_group // dim, dim


def to_vectors(weight: torch.Tensor, dim: int, group_size: int = 0, name: str = "weight") -> torch.Tensor:
    """weight [out, ...] -> vectors [groups, m, d] (a view when the weight is contiguous)."""
    return weight.reshape(vector_shape(weight.shape, dim, group_size, name))


def from_vectors(vectors: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """vectors [groups, m, d] -> weight of `weight_shape`."""
    return vectors.reshape(weight_shape)
