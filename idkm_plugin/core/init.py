"""Seeded, deterministic centroid initialisations: k-means++, linear, density, random.

Deep Compression compares linear (evenly spaced between min and max), density (evenly spaced
quantiles) and random (k distinct weights); k-means++ is D^2 sampling (Arthur & Vassilvitskii).
For d > 1, linear and density space the centroids along the diagonal per coordinate.
k-means++ with k > 1024 (bits > 10) uses density, as D^2 sampling would take k sequential passes.
"""
from __future__ import annotations

import torch

from .enums import Init

_KMEANS_PP_MAX_ROWS = 1 << 16  # k-means++ samples from at most this many rows, for speed


def init_centroids(x: torch.Tensor, k: int, method: str, seed: int = 0) -> torch.Tensor:
    """x [g, m, d] -> centroids [g, k, d] in x's dtype."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    method = Init(method)
    if method is Init.LINEAR:  # all groups at once (the same values as one group at a time)
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        return lo + torch.linspace(0, 1, k, dtype=x.dtype, device=x.device).view(1, k, 1) * (hi - lo)
    if method is Init.DENSITY or (method is Init.KMEANS_PP and k > _KMEANS_PP_MAX_K):
        q = ((torch.arange(k, dtype=torch.float64) + 0.5) / k).to(x.device)
        return torch.quantile(x.double(), q, dim=1).transpose(0, 1).to(x.dtype)
    if method is Init.KMEANS_PP and x.shape[0] > 1:
        return _kmeans_pp_groups(x, k, gen)
    fn = _INITS[method]
    return torch.stack([fn(xg, k, gen) for xg in x])


def init_centroids_masked(x: torch.Tensor, mask: torch.Tensor, k: int, method: str, seed: int = 0) -> torch.Tensor:
    """x [g, m, d], mask bool [g, m] (True = kept) -> centroids [g, k, d] initialised from the kept vectors
    only (one generator across groups, as `init_centroids`; zeros for a group with no kept vector)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    fn = _INITS[Init(method)]
    return torch.stack([fn(xg[mg], k, gen) if bool(mg.any()) else xg.new_zeros(k, xg.shape[-1])
                        for xg, mg in zip(x, mask)])


def _linear(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = x.amin(0), x.amax(0)
    t = torch.linspace(0, 1, k, dtype=x.dtype, device=x.device).unsqueeze(1)
    return lo + t * (hi - lo)


def _density(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    return torch.quantile(x.double(), q.to(x.device), dim=0).to(x.dtype)


def _random(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    m = x.shape[0]
    idx = torch.randperm(m, generator=gen)[:k]
    if m < k:  # fewer vectors than centroids: repeat some
        idx = torch.cat([idx, torch.randint(m, (k - m,), generator=gen)])
    return x[idx.to(x.device)].clone()


_KMEANS_PP_MAX_K = 1024  # beyond this D^2 sampling is slow and density init is as good


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    if k > _KMEANS_PP_MAX_K:
        return _density(x, k, gen)
    m = x.shape[0]
    if m > _KMEANS_PP_MAX_ROWS:
        x = x[torch.randperm(m, generator=gen)[:_KMEANS_PP_MAX_ROWS].to(x.device)]
        m = x.shape[0]
    xf = x.double()
    first = int(torch.randint(m, (1,), generator=gen))
    chosen = [first]
    d2 = (xf - xf[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            probs = (d2 / total).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:  # every vector already is a centroid: duplicates are unavoidable
            nxt = int(torch.randint(m, (1,), generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (xf - xf[nxt]).pow(2).sum(1))
    return x[torch.tensor(chosen, device=x.device)].clone()


def _kmeans_pp_groups(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ for every group of x [g, m, d] at once: one D^2 draw per group and step ([g, k, d]).

    (Draws from the generator in a different order than one group at a time, so the centroids differ from
    `_kmeans_pp` per group; one group (g = 1) uses `_kmeans_pp`.)"""
    g, m, d = x.shape
    if m > _KMEANS_PP_MAX_ROWS:
        keep = torch.rand(g, m, generator=gen).argsort(1)[:, :_KMEANS_PP_MAX_ROWS].to(x.device)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        m = x.shape[1]
    xf = x.double()
    rows = torch.arange(g, device=x.device)
    chosen = torch.empty(g, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = torch.randint(m, (g,), generator=gen).to(x.device)
    d2 = (xf - xf[rows, chosen[:, 0]].unsqueeze(1)).square().sum(-1)  # [g, m]
    for j in range(1, k):
        total = d2.sum(1, keepdim=True)
        # a group whose vectors all are centroids already draws uniformly (duplicates are unavoidable)
        probs = torch.where(total > 0, d2 / total.clamp_min(torch.finfo(d2.dtype).tiny), 1.0 / m)
        chosen[:, j] = torch.multinomial(probs.cpu(), 1, generator=gen).view(g).to(x.device)
        d2 = torch.minimum(d2, (xf - xf[rows, chosen[:, j]].unsqueeze(1)).square().sum(-1))
    return x.gather(1, chosen.unsqueeze(-1).expand(-1, -1, d)).clone()


_INITS = {Init.KMEANS_PP: _kmeans_pp, Init.LINEAR: _linear, Init.DENSITY: _density, Init.RANDOM: _random}
