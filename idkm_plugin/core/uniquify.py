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

    Groups with fewer distinct rows than the largest are padded with zero-count rows (copies of their first
    row), which contribute nothing to any sum. d = 1: all groups at once (one sort along the rows; one
    group of 16-bit floats: a histogram of the bit patterns, no sort). d > 1: torch.unique(dim=0) per group.
    """
    if x.shape[-1] == 1 and x.dtype in _HALF and x.shape[0] == 1:
        bins = x.reshape(-1).view(torch.int16).int() + 32768
        return _pad([_histogram(bins, _half_values(x.dtype, x.device))], x, count_dtype)
    if x.shape[-1] == 1:
        return _unique_sorted(x[..., 0], lambda sorted_keys: sorted_keys, count_dtype)
    return _pad([torch.unique(xg, dim=0, return_inverse=True, return_counts=True) for xg in x], x, count_dtype)


def grid_rows(x: torch.Tensor, count_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [g, m, 1] -> the occupied values of each group's uniform 16-bit grid, as uniquify_rows returns.

    float16/bfloat16 weights already lie on a 16-bit grid and are uniquified exactly. All groups at once:
    one group by a histogram of its bins, several by one sort of the bins along the rows.
    """
    if x.shape[-1] != 1:
        raise ValueError(f"grid uniquification needs d = 1 (scalar weights); got vectors of dim {x.shape[-1]}")
    if x.dtype in _HALF:
        return uniquify_rows(x, count_dtype)
    flat = x[..., 0]  # [g, m]
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    step = torch.where(hi > lo, (hi - lo) / (GRID_LEVELS - 1), torch.ones_like(hi))
    bins = (flat - lo).mul_(1 / step).round_().clamp_(0, GRID_LEVELS - 1).int()
    if x.shape[0] == 1:
        values = lo[0] + torch.arange(GRID_LEVELS, dtype=flat.dtype, device=flat.device) * step[0]
        return _pad([_histogram(bins[0], values)], x, count_dtype)
    return _unique_sorted(bins, lambda sorted_bins: lo + sorted_bins.to(flat.dtype) * step, count_dtype)


def _unique_sorted(keys: torch.Tensor, value_of, count_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys [g, m] -> (value_of(distinct keys) [g, r, 1] ascending, counts [g, r], inverse [g, m] int32), every
    group in one sort; a group with fewer than r distinct keys is padded with its smallest, count 0."""
    g, m = keys.shape
    sorted_keys, order = keys.sort(1)
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    ids = new.cumsum(1, dtype=torch.int64).sub_(1)  # [g, m]: distinct index, in sorted order
    r = int(ids[:, -1].max()) + 1
    inverse = torch.empty(g, m, dtype=torch.int32, device=keys.device).scatter_(1, order, ids.int())
    counts = torch.zeros(g, r, dtype=count_dtype, device=keys.device)
    counts.scatter_add_(1, ids, torch.ones(g, m, dtype=count_dtype, device=keys.device))
    firsts = sorted_keys[:, :1].expand(g, r).clone()  # padding rows: the group's smallest key
    firsts.scatter_(1, ids, sorted_keys)  # equal keys write equal values
    return value_of(firsts).unsqueeze(-1), counts, inverse


def _half_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All 65,536 values of a 16-bit float dtype, indexed by bit pattern + 32768."""
    return torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16).view(dtype)


def _histogram(bins: torch.Tensor, values: torch.Tensor):
    """bins [m] int in [0, len(values)) -> (occupied values [r, 1], inverse [m] int32, counts [r])."""
    counts = torch.bincount(bins, minlength=values.shape[0])
    present = counts > 0
    remap = (present.cumsum(0, dtype=torch.int32) - 1)
    return values[present].unsqueeze(-1), remap.index_select(0, bins), counts[present]


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
    """Distinct-row values t [g, r, e] -> per-row values [g, m, e] (all groups in one gather)."""
    if t.shape[0] == 1 and t.shape[-1] == 1:  # gather is the fastest 1-D lookup on CPU
        return torch.gather(t.view(-1), 0, inverse.view(-1).long()).view(1, -1, 1)
    if t.shape[0] == 1:
        return t[0].index_select(0, inverse[0]).unsqueeze(0)
    g, m = inverse.shape
    return torch.gather(t, 1, inverse.long().unsqueeze(-1).expand(g, m, t.shape[-1]))


def scatter_rows(t: torch.Tensor, inverse: torch.Tensor, r: int) -> torch.Tensor:
    """Per-row values t [g, m, e] -> sums per distinct row [g, r, e] (all groups in one index_add_)."""
    g, m, e = t.shape
    out = t.new_zeros(g, r, e)
    index = inverse[0] if g == 1 else (inverse.long() + r * torch.arange(g, device=t.device).unsqueeze(1)).view(-1)
    if e == 1:  # index_add_ over 1-D is ~30x faster than over [m, 1] rows
        out.view(-1).index_add_(0, index, t.reshape(-1))
    else:
        out.view(g * r, e).index_add_(0, index, t.reshape(g * m, e))
    return out
