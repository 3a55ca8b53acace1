"""One soft k-means step, computed in row chunks.

Shapes: x [g, r, d] vectors, n [g, r] counts (None = all ones), c [g, k, d] centroids,
tau [g, 1, 1] temperatures, A [g, r, k] attention.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

# Elements of one [g, rows, k] chunk in the automatic memory bound (32 MiB in float32).
AUTO_CHUNK_ELEMENTS = 1 << 23
# Rows per automatic chunk at most: float32 sums over longer runs of rows lose accuracy
# (partial sums are accumulated across chunks in float64).
AUTO_CHUNK_MAX_ROWS = 8192
# Elements of one [g, k, rows] attention chunk the automatic size aims at, so that the ~6 elementwise
# passes of a map evaluation run in cache (not below AUTO_CHUNK_MIN_ROWS rows, where the per-chunk
# overhead dominates). One evaluation on one thread, 512x512 weight, k = 256: 103 ms at 512 rows,
# 174 ms at 8192; k = 64: 35 ms at 2048 rows, 51 ms at 8192; k = 16 (1M weights): 42 ms at 8192.
AUTO_CHUNK_CACHE_ELEMENTS = 1 << 17
AUTO_CHUNK_MIN_ROWS = 512


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other weight dtype is clustered in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_tau(x: torch.Tensor, k: int) -> torch.Tensor:
    """The weight-derived temperature, x [g, m, d] -> tau [g, 1, 1].

    tau = 0.5 * Var(x) / k**(2/d): proportional to the squared spacing of k centroids spread over
    the weights' range, so one setting gives similarly soft assignments at any weight scale.
    It reproduces the DKM paper's tuned values (ResNet18: 2e-5 at 2 bits, 5e-5 at 1 bit and 4/4)
    for conv weights of standard deviation ~0.02. Treated as a constant in differentiation.
    """
    d = x.shape[-1]
    var = x.detach().var(dim=(1, 2), unbiased=False).clamp_min(torch.finfo(x.dtype).eps)
    return (0.5 * var / k ** (2.0 / d)).view(-1, 1, 1)


def as_tau(tau: float | torch.Tensor | None, x: torch.Tensor, k: int) -> torch.Tensor:
    """Normalise tau (float, [g] tensor or None) to a [g, 1, 1] tensor of x's dtype."""
    if tau is None:
        return default_tau(x, k)
    t = torch.as_tensor(tau, dtype=x.dtype, device=x.device).detach()
    return t.reshape(-1, 1, 1).expand(x.shape[0], 1, 1)


def exp_floor(dtype: torch.dtype) -> float:
    """Lowest shifted logit kept, so that attention values and their products stay normal numbers.

    Subnormal operands or results take a ~50-300x slower path on CPUs (profiled: exp of logits below
    -87 in float32, and the [k, r] x [r, k] product of two attention-weighted terms of the explicit
    Jacobian ran at ~1 GFlop/s). exp(-36) = 2e-16 in float32 (its square times 1e-6 is still normal),
    exp(-300) in float64: changes below 1e-15 (float32) / 1e-130 (float64) of a row's largest term.
    """
    return -300.0 if dtype == torch.float64 else -36.0


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [g, r, d], c [g, k, d] -> ||x_i - c_j||^2 [g, r, k]."""
    if x.shape[-1] == 1:
        return (x - c.transpose(1, 2)).square()
    d2 = x.square().sum(-1, keepdim=True) + c.square().sum(-1).unsqueeze(1) - 2 * torch.bmm(x, c.transpose(1, 2))
    return d2.clamp_min(0)


def attention(x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """A [g, r, k] = softmax_j(-||x_i - c_j||^2 / tau).

    The row minimum is subtracted first (softmax is shift invariant), so a tiny tau saturates to a
    hard assignment instead of producing an all -inf row and NaN.
    The shifted logits are floored at exp_floor (exp(-36) in float32), which keeps exp and later
    products off the slow subnormal path, for a change under 1e-15 of the row's largest term.
    """
    d2 = squared_distances(x, c)
    d2 = d2 - d2.detach().amin(-1, keepdim=True)
    return torch.softmax((-d2 / tau).clamp_min(exp_floor(d2.dtype)), dim=-1)


def chunk_rows(chunk_size: Optional[int], g: int, r: int, k: int, d: int) -> int:
    """Rows per chunk: `chunk_size` if given, else the automatic memory bound."""
    if chunk_size:
        return max(1, min(int(chunk_size), r))
    cached = max(AUTO_CHUNK_MIN_ROWS, AUTO_CHUNK_CACHE_ELEMENTS // max(1, g * k))
    return max(1, min(r, AUTO_CHUNK_MAX_ROWS, cached, AUTO_CHUNK_ELEMENTS // max(1, g * k * max(d, 1))))


def row_chunks(r: int, rows: int) -> Iterator[slice]:
    for start in range(0, r, rows):
        yield slice(start, min(start + rows, r))


def empty_clusters(mass: torch.Tensor) -> torch.Tensor:
    """[g, k] bool: clusters holding (almost) none of the attention mass, which keep their centroid.

    Relative to the group's total mass: with logits floored at exp_floor every cluster gets at least
    exp(floor) of every row, so "empty" means at most 1000 times that share (2e-13 in float32).
    """
    share = 1e3 * math.exp(exp_floor(mass.dtype))
    return mass <= share * mass.sum(-1, keepdim=True)


def weighted(a: torch.Tensor, n: Optional[torch.Tensor]) -> torch.Tensor:
    """a [g, r, k] scaled by counts n [g, r] (n None: unchanged)."""
    return a if n is None else a * n.unsqueeze(-1)


def update_centroids(c: torch.Tensor, num: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """New centroids num / mass (cast to c's dtype first); empty clusters (mass ~ 0) keep their old value. [g, k, d]."""
    num, mass = num.to(c.dtype), mass.to(c.dtype)
    empty = empty_clusters(mass)
    return torch.where(empty.unsqueeze(-1), c, num / torch.where(empty, torch.ones_like(mass), mass).unsqueeze(-1))


def soft_step(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
              rows: int) -> torch.Tensor:
    """F(C) = sum_i n_i A_ij x_i / sum_i n_i A_ij, accumulated over row chunks. Returns [g, k, d]."""
    num, mass = 0, 0
    for s in row_chunks(x.shape[1], rows):
        a = weighted(attention(x[:, s], c, tau), None if n is None else n[:, s])
        num = num + torch.bmm(a.transpose(1, 2), x[:, s]).double()
        mass = mass + a.sum(1).double()
    return update_centroids(c, num, mass)
