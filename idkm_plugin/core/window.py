"""The soft k-means map for scalar weights (d = 1) over sorted rows, visiting only nearby centroids.

In 1-D, a weight's shifted logit -((x - c_j)^2 - (x - c_p)^2) / tau (c_p its nearest centroid) falls
below the exp floor (soft_step.exp_floor, -36 in float32) for every centroid outside a short run of
neighbours around p, so the dense kernel spends most of its k exp evaluations per row on terms that it
floors to exp(-36). This kernel evaluates, per row, only the window of centroids p - left .. p + right
that can be above the floor, with left / right the largest needs over the rows (exact: computed from
every nearest-centroid segment's end rows). Terms outside the window are taken as 0 instead of the
floor value, a relative change below k * exp(-36) = 6e-14 of a row's sum at k = 256.

The rows are sorted once per solve (SortedRows); then the rows whose nearest centroid is c_j form one
contiguous segment, found by a binary search of the k - 1 midpoints, and the per-row terms of each
window offset are summed per segment in float64 (index_add_ by nearest centroid; float32 sums of 4,096
rows were off by 1e-6). One evaluation on one thread, 512x512 weight:
k = 256 (a window of 5 centroids) 33 ms against 130 ms dense, k = 64: 27 ms against 36 ms. A window
as wide as k (a large tau) falls back to the dense kernel.

Shapes: rows x [g, r] sorted ascending per group, counts n [g, r] or None, c [g, k, 1], tau [g, 1, 1].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .kernel import map_sums
from .soft_step import chunk_rows, exp_floor, row_chunks, update_centroids

WINDOW_MIN_K = 64  # below it the dense kernel is as fast or faster (k = 16: 29 ms against 12 ms)
WINDOW_CHUNK_ROWS = 1 << 12


class SortedRows(NamedTuple):
    x: torch.Tensor  # [g, r] sorted ascending
    n: Optional[torch.Tensor]  # [g, r] counts in the sorted order, or None


def use_window(k: int, d: int) -> bool:
    return d == 1 and k >= WINDOW_MIN_K


def sort_rows(x: torch.Tensor, n: Optional[torch.Tensor]) -> SortedRows:
    """x [g, r, 1], n [g, r] or None -> the rows sorted per group (counts follow their rows)."""
    xs, order = x[..., 0].sort(1)
    return SortedRows(xs, None if n is None else n.gather(1, order))


def _segments(xs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """[g, k + 1] row boundaries: rows bounds[j] .. bounds[j + 1] - 1 have cs[j] as nearest centroid."""
    g, r = xs.shape
    mids = 0.5 * (cs[:, 1:] + cs[:, :-1])
    inner = torch.searchsorted(xs, mids.contiguous())
    return torch.cat([inner.new_zeros(g, 1), inner, inner.new_full((g, 1), r)], 1)


def _window(xs: torch.Tensor, cs: torch.Tensor, bounds: torch.Tensor, reach: torch.Tensor) -> tuple[int, int]:
    """(left, right): how many centroids below / above the nearest one any row can see above the floor.

    Within a segment both ends of [x - r(x), x + r(x)], r(x)^2 = (x - c_p)^2 + reach^2, grow with x, so the
    segment's first row needs the most on the left and its last row the most on the right.
    """
    g, r = xs.shape
    k = cs.shape[1]
    j = torch.arange(k, device=xs.device).expand(g, k)
    filled = bounds[:, 1:] > bounds[:, :-1]
    first = xs.gather(1, bounds[:, :-1].clamp_max(r - 1))
    last = xs.gather(1, (bounds[:, 1:] - 1).clamp_min(0))
    rad_first = ((first - cs).square() + reach.square()).sqrt()
    rad_last = ((last - cs).square() + reach.square()).sqrt()
    lo = torch.searchsorted(cs, (first - rad_first).contiguous())
    hi = torch.searchsorted(cs, (last + rad_last).contiguous(), right=True)
    left = int(torch.where(filled, j - lo, 0).max())
    right = int(torch.where(filled, hi - 1 - j, 0).max())
    return max(left, 0), max(right, 0)


def window_map_sums(rows: SortedRows, c: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num [g, k, 1], mass [g, k]) = (sum_i n_i A_ij x_i, sum_i n_i A_ij) in float64, as kernel.map_sums."""
    xs, n = rows
    g, r = xs.shape
    k = c.shape[1]
    cs, order = c[..., 0].sort(1)
    floor = -exp_floor(xs.dtype)
    reach = (floor * tau.view(g, 1)).sqrt()  # a term is above the floor within this distance beyond the nearest
    bounds = _segments(xs, cs)
    left, right = _window(xs, cs, bounds, reach)
    if left + right + 1 >= k:  # soft enough that rows see most centroids: the dense kernel is cheaper
        return map_sums(xs.unsqueeze(-1), n, c, tau, chunk_rows(None, g, r, k, 1))
    offsets = torch.arange(-left, right + 1, device=xs.device)  # [w]
    w = offsets.numel()
    # nearest centroid of every row: its segment index, from the boundaries
    starts = torch.zeros(g, r + 1, dtype=torch.int32, device=xs.device)
    starts.scatter_add_(1, bounds[:, 1:-1], torch.ones_like(bounds[:, 1:-1], dtype=torch.int32))
    nearest = starts[:, :r].cumsum(1)  # [g, r]
    neg_inv_tau = (-1 / tau).view(g, 1, 1)
    # (num, mass) per offset and (group, segment): one index_add_ over all groups' segments per chunk
    sums = torch.zeros(2 * w, g * k, dtype=torch.float64, device=xs.device)
    group_base = (k * torch.arange(g, device=xs.device)).unsqueeze(1)  # [g, 1]
    for s in row_chunks(r, WINDOW_CHUNK_ROWS):
        x = xs[:, s].unsqueeze(1)  # [g, 1, rows]
        idx = nearest[:, s].unsqueeze(1) + offsets.view(1, w, 1)  # [g, w, rows]: rows contiguous
        valid = (idx >= 0) & (idx < k)
        cw = cs.gather(1, idx.clamp(0, k - 1).flatten(1)).view_as(idx)
        d2 = (x - cw).square_()
        d2.sub_(d2[:, left: left + 1].clone())  # the nearest centroid's: offset 0
        e = d2.mul_(neg_inv_tau).clamp_min_(-floor).exp_().mul_(valid)
        inv = e.sum(1, keepdim=True).reciprocal_()
        if n is not None:
            inv.mul_(n[:, s].unsqueeze(1))
        e.mul_(inv)  # n_i A_ij
        vals = torch.stack([e * x, e], 0).double()  # [2, g, w, rows]
        vals = vals.transpose(1, 2).reshape(2 * w, -1)  # [(2, w), (g, rows)]
        sums.index_add_(1, (nearest[:, s] + group_base).view(-1), vals)
    sums = sums.view(2, w, g, k).permute(2, 0, 1, 3)  # [g, 2, w, k]
    # segment j's offset o goes to centroid j + o
    per_centroid = torch.zeros(g, 2, k + w, dtype=torch.float64, device=xs.device)
    for i, o in enumerate(offsets.tolist()):
        per_centroid[..., left + o: left + o + k] += sums[:, :, i]
    sorted_sums = per_centroid[..., left: left + k]
    out = torch.empty_like(sorted_sums).scatter_(2, order.unsqueeze(1).expand(g, 2, k), sorted_sums)
    return out[:, 0].unsqueeze(-1), out[:, 1]


def window_soft_map(rows: SortedRows, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """F(C) [g, k, 1] in c's dtype, as kernel.soft_map."""
    num, mass = window_map_sums(rows, c, tau)
    return update_centroids(c, num, mass)
