"""eDKM weight uniquification: cluster the distinct rows, weighted by how often they occur.

float16/bfloat16 weights with d = 1 have at most 65,536 distinct values, so the attention is
computed once per distinct value instead of once per weight; results equal the plain computation.
Their distinct values are found by a histogram of the 16-bit patterns (O(m), no sort).

`grid_rows` extends this to float32 weights with d = 1: the values are rounded to a uniform 16-bit
grid over [min, max] (65,536 levels, error <= (max - min) / 131,070) for the clustering only; the
caller treats the rounding as straight-through, so the gradient of a weight is the gradient at its
grid value. A uniform grid (rather than float16) spends its levels evenly over the range, which is
what squared-distance clustering sees, and cannot overflow.
"""
from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)
GRID_LEVELS = 1 << 16


def uniquify_rows(x: torch.Tensor, count_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [g, m, d] -> (distinct rows [g, r, d], counts [g, r], inverse [g, m] int32).

    Groups with fewer distinct rows than the largest are padded with zero-count rows, which
    contribute nothing to any sum.
    """
    if x.shape[-1] == 1 and x.dtype in _HALF:
        per_group = [_histogram(xg.reshape(-1).view(torch.int16).int() + 32768, _half_values(x.dtype, x.device))
                     for xg in x]
    elif x.shape[-1] == 1:
        per_group = [_unique_scalars(xg) for xg in x]
    else:
        per_group = [torch.unique(xg, dim=0, return_inverse=True, return_counts=True) for xg in x]
    return _pad(per_group, x, count_dtype)


def grid_rows(x: torch.Tensor, count_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [g, m, 1] -> the occupied values of each group's uniform 16-bit grid, as uniquify_rows returns.

    float16/bfloat16 weights already lie on a 16-bit grid and are uniquified exactly.
    """
    if x.shape[-1] != 1:
        raise ValueError(f"grid uniquification needs d = 1 (scalar weights); got vectors of dim {x.shape[-1]}")
    if x.dtype in _HALF:
        return uniquify_rows(x, count_dtype)
    per_group = []
    for xg in x:
        flat = xg.reshape(-1)
        lo, hi = flat.min(), flat.max()
        step = torch.where(hi > lo, (hi - lo) / (GRID_LEVELS - 1), torch.ones_like(hi))
        bins = (flat - lo).mul_(1 / step).round_().clamp_(0, GRID_LEVELS - 1).int()
        values = lo + torch.arange(GRID_LEVELS, dtype=flat.dtype, device=flat.device) * step
        per_group.append(_histogram(bins, values))
    return _pad(per_group, x, count_dtype)


def _half_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All 65,536 values of a 16-bit float dtype, indexed by bit pattern + 32768."""
    return torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16).view(dtype)


def _histogram(bins: torch.Tensor, values: torch.Tensor):
    """bins [m] int in [0, len(values)) -> (occupied values [r, 1], inverse [m] int32, counts [r])."""
    counts = torch.bincount(bins, minlength=values.shape[0])
    present = counts > 0
    remap = (present.cumsum(0, dtype=torch.int32) - 1)
    return values[present].unsqueeze(-1), remap.index_select(0, bins), counts[present]


def _unique_scalars(xg: torch.Tensor):
    vals, inv, cnt = torch.unique(xg.reshape(-1), sorted=True, return_inverse=True, return_counts=True)
    return vals.unsqueeze(-1), inv, cnt


def _pad(per_group, x: torch.Tensor, count_dtype: torch.dtype):
    if len(per_group) == 1:  # nothing to pad
        vals, inv, cnt = per_group[0]
        return vals.unsqueeze(0), cnt.to(count_dtype).unsqueeze(0), inv.to(torch.int32).view(1, -1)
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


def gather_rows(t: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Distinct-row values t [g, r, e] -> per-row values [g, m, e]."""
    if t.shape[0] == 1:
        return t[0].index_select(0, inverse[0]).unsqueeze(0)
    return torch.stack([tg.index_select(0, ig) for tg, ig in zip(t, inverse)])


def scatter_rows(t: torch.Tensor, inverse: torch.Tensor, r: int) -> torch.Tensor:
    """Per-row values t [g, m, e] -> sums per distinct row [g, r, e]."""
    out = t.new_zeros(t.shape[0], r, t.shape[-1])
    for og, tg, ig in zip(out, t, inverse):
        if t.shape[-1] == 1:  # index_add_ over 1-D is ~30x faster than over [m, 1] rows
            og.view(-1).index_add_(0, ig, tg.reshape(-1))
        else:
            og.index_add_(0, ig, tg)
    return out
