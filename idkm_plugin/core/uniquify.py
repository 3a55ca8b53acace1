"""eDKM weight uniquification: cluster the distinct rows, weighted by how often they occur.

float16/bfloat16 weights with d = 1 have at most 65,536 distinct values, so the attention is
computed once per distinct value instead of once per weight. Results equal the plain computation.
"""
from __future__ import annotations

import torch


def uniquify_rows(x: torch.Tensor, count_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [g, m, d] -> (distinct rows [g, r, d], counts [g, r], inverse [g, m] int32).

    Groups with fewer distinct rows than the largest are padded with zero-count rows, which
    contribute nothing to any sum.
    """
    per_group = [torch.unique(xg, dim=0, return_inverse=True, return_counts=True) if x.shape[-1] > 1
                 else _unique_scalars(xg) for xg in x]
    r = max(vals.shape[0] for vals, _, _ in per_group)
    rows = x.new_zeros(x.shape[0], r, x.shape[-1])
    counts = torch.zeros(x.shape[0], r, dtype=count_dtype, device=x.device)
    inverse = torch.empty(x.shape[:2], dtype=torch.int32, device=x.device)
    for i, (vals, inv, cnt) in enumerate(per_group):
        rows[i, : vals.shape[0]] = vals
        rows[i, vals.shape[0]:] = vals[:1]
        counts[i, : cnt.shape[0]] = cnt.to(count_dtype)
        inverse[i] = inv.to(torch.int32)
    return rows, counts, inverse


def _unique_scalars(xg: torch.Tensor):
    vals, inv, cnt = torch.unique(xg.reshape(-1), sorted=True, return_inverse=True, return_counts=True)
    return vals.unsqueeze(-1), inv, cnt


def gather_rows(t: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Distinct-row values t [g, r, e] -> per-row values [g, m, e]."""
    index = inverse.long().unsqueeze(-1).expand(-1, -1, t.shape[-1])
    return torch.gather(t, 1, index)


def scatter_rows(t: torch.Tensor, inverse: torch.Tensor, r: int) -> torch.Tensor:
    """Per-row values t [g, m, e] -> sums per distinct row [g, r, e]."""
    index = inverse.long().unsqueeze(-1).expand(-1, -1, t.shape[-1])
    return t.new_zeros(t.shape[0], r, t.shape[-1]).scatter_add_(1, index, t)
