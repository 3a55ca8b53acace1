"""Magnitude pruning of weight vectors (Deep Compression's first stage), as pure tensor math.

A mask is bool [groups, m] over the [groups, m, d] vectors of a weight (True = kept). Pruning is
layer-wise: the vectors with the smallest L2 norms over all groups together are pruned, ties broken
by position (the earlier vector first), and a vector once pruned stays pruned.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["magnitude_mask", "num_pruned", "on_survivors", "scatter_survivors"]


def num_pruned(sparsity: float, num_vectors: int) -> int:
    """round(sparsity * num_vectors): how many vectors a layer of `num_vectors` prunes at `sparsity`."""
    return int(round(sparsity * num_vectors))


@torch.no_grad()
def magnitude_mask(x: torch.Tensor, n_pruned: int, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [g, m, d] -> mask bool [g, m] with exactly max(n_pruned, already pruned) vectors pruned (False).

    The vectors with the smallest L2 norm are pruned; ties go to the lower flat index (stable sort).
    `previous` (bool [g, m] or empty) stays pruned where it was.
    """
    g, m, _ = x.shape
    norms = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).norm(dim=-1).reshape(-1)
    if previous is not None and previous.numel():
        norms = torch.where(previous.reshape(-1), norms, torch.full_like(norms, -1.0))  # pruned sort first
        n_pruned = max(n_pruned, int((~previous).sum()))
    order = torch.sort(norms, stable=True).indices
    keep = torch.ones(g * m, dtype=torch.bool, device=x.device)
    keep[order[:n_pruned]] = False
    return keep.view(g, m)


def on_survivors(fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, mask: torch.Tensor
                 ) -> list[Optional[torch.Tensor]]:
    """fn(x_g [1, n_g, d] surviving vectors of group g, g) for each group; None for a group with no survivors.

    (masked_select: its backward keeps only the bool mask, not an int64 index per survivor.)"""
    d = x.shape[-1]
    return [fn(x[gi].masked_select(mask[gi].unsqueeze(-1)).view(1, -1, d), gi) if bool(mask[gi].any()) else None
            for gi in range(x.shape[0])]


def scatter_survivors(parts: list[Optional[torch.Tensor]], mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-group surviving rows [1, n_g, d] (or None) -> [g, m, d] like `like`, zero at pruned rows.

    Differentiable w.r.t. the parts (pruned rows get no gradient)."""
    rows = []
    for gi, part in enumerate(parts):
        full = like.new_zeros(like.shape[1:])
        if part is not None:
            full = full.masked_scatter(mask[gi].unsqueeze(-1), part[0].to(like.dtype))
        rows.append(full)
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
