"""Weighted hard k-means (Lloyd's iterations), batched over all LUT groups of a layer.

Minimises sum_i w_i ||x_i - c_{a(i)}||^2 over the centroids c and the assignment a, per group, where the
assignment is the plain nearest centroid (a per-vector weight does not change which centroid is nearest), i.e.
exactly the codes a converted model decodes. With w_i = the diagonal Fisher information of the weight (squared
gradients of the loss) this is sensitivity-weighted k-means (SqueezeLLM, coremltools' SKMPalettizer); with equal
weights it is plain k-means. A weight of 0 leaves a vector out of the centroids.

Every step works on [groups, m, d] at once (no Python loop over groups). Scalars (d = 1) are sorted once, so
that each iteration costs O(groups * k * log m) (clusters are runs between the centroids' midpoints, their sums
differences of prefix sums); vectors (d > 1) are assigned through `hard_assign` (row chunks).
"""
from __future__ import annotations

import torch

from .hard import hard_assign


def weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, init: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Lloyd's iterations from `init`.

    Args:
        x: vectors [g, m, d].
        weights: [g, m], >= 0 (0 excludes a vector from the centroids).
        init: initial centroids [g, k, d].
        iters: at most this many assignment / update rounds; stops early once no centroid moves.

    Returns:
        centroids [g, k, d] in x's dtype (sorted for d = 1); a centroid whose cluster has zero total weight keeps
        its value.
    """
    _check_shapes(x, weights, init)
    x, weights = x.detach(), weights.detach().to(x.dtype)
    c = init.detach().to(x.dtype).clone()
    if x.shape[-1] == 1:
        return _scalar_kmeans(x[..., 0], weights, c[..., 0], iters).unsqueeze(-1)
    for _ in range(iters):
        new = weighted_means(x, weights, assign(x, c), c)
        if torch.equal(new, c):
            break
        c = new
    return c


def _scalar_kmeans(x: torch.Tensor, weights: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's iterations on scalars x [g, m] (weights [g, m]) from c [g, k] -> [g, k].

    The scalars are sorted once; a cluster is then a contiguous run of them, between the sorted centroids'
    midpoints, and its weighted sum and mass are differences of prefix sums: each iteration costs
    O(g k log m), not O(g m k). Assignment as `assign`: a scalar on a midpoint goes to the lower centroid.
    """
    values, order = x.sort(dim=1)
    w = weights.gather(1, order).double()
    zero = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)
    mass = torch.cat([zero, w.cumsum(1)], 1)  # [g, m + 1]
    moment = torch.cat([zero, (w * values.double()).cumsum(1)], 1)
    last = torch.full((x.shape[0], 1), x.shape[1], dtype=torch.long, device=x.device)
    for _ in range(iters):
        c_sorted = c.sort(dim=1).values
        midpoints = (c_sorted[:, 1:] + c_sorted[:, :-1]) / 2  # [g, k - 1]
        ends = torch.cat([torch.searchsorted(values, midpoints.contiguous(), right=True), last], 1)  # [g, k]
        starts = torch.cat([torch.zeros_like(last), ends[:, :-1]], 1)
        total = mass.gather(1, ends) - mass.gather(1, starts)
        summed = moment.gather(1, ends) - moment.gather(1, starts)
        new = torch.where(total > 0, summed / total.clamp_min(torch.finfo(torch.float64).tiny),
                          c_sorted.double()).to(x.dtype)
        if torch.equal(new, c_sorted):
            break
        c = new
    return c.sort(dim=1).values


def assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes [g, m] (int64) of x [g, m, d] among c [g, k, d]."""
    if x.shape[-1] != 1:
        return hard_assign(x, c)
    values, order = c[..., 0].sort(dim=1)  # [g, k]
    midpoints = (values[:, 1:] + values[:, :-1]) / 2  # [g, k - 1]
    sorted_codes = torch.searchsorted(midpoints.contiguous(), x[..., 0].contiguous())  # [g, m] in 0..k-1
    return order.gather(1, sorted_codes)


def weighted_means(x: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per cluster, the weighted mean of its vectors: x [g, m, d], weights [g, m], codes [g, m] -> [g, k, d]
    (the old centroid c [g, k, d] where the cluster's total weight is 0)."""
    wx = x * weights.unsqueeze(-1)
    sums = torch.zeros_like(c).scatter_add_(1, codes.unsqueeze(-1).expand_as(x), wx)
    totals = torch.zeros(c.shape[:2], dtype=x.dtype, device=x.device).scatter_add_(1, codes, weights)
    return torch.where(totals.unsqueeze(-1) > 0, sums / totals.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1), c)


def weighted_error(x: torch.Tensor, weights: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i w_i ||x_i - c_{a(i)}||^2 per group [g] with a = the nearest centroid."""
    codes = assign(x, c)
    snapped = torch.gather(c, 1, codes.unsqueeze(-1).expand_as(x))
    return ((x - snapped).square().sum(-1) * weights.to(x.dtype)).sum(-1)


def weighted_quantile_init(x: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids [g, k, 1] at the weighted (i + 0.5) / k quantiles of each group's scalars x [g, m, 1]
    (weights [g, m]); groups with zero total weight use equal weights. Batched; d = 1 only."""
    if x.shape[-1] != 1:
        raise ValueError(f"weighted_quantile_init clusters scalars (d = 1); got vectors of d = {x.shape[-1]}")
    _check_shapes(x, weights, None)
    values, order = x[..., 0].sort(dim=1)  # [g, m]
    w = weights.to(x.dtype).gather(1, order)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    cum = w.cumsum(1)
    total = cum[:, -1:]
    targets = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k * total  # [g, k]
    idx = torch.searchsorted(cum.contiguous(), targets.contiguous()).clamp_max(x.shape[1] - 1)
    return values.gather(1, idx).unsqueeze(-1)


def _check_shapes(x: torch.Tensor, weights: torch.Tensor, init: torch.Tensor | None) -> None:
    if x.dim() != 3 or weights.shape != x.shape[:2]:
        raise ValueError(f"weighted k-means expects x [g, m, d] and weights [g, m]; got {list(x.shape)} and "
                         f"{list(weights.shape)}")
    if init is not None and (init.dim() != 3 or init.shape[0] != x.shape[0] or init.shape[2] != x.shape[2]):
        raise ValueError(f"weighted k-means expects init [g, k, d] = [{x.shape[0]}, k, {x.shape[2]}]; got "
                         f"{list(init.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weighted k-means needs weights >= 0")
