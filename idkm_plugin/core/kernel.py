"""Fused chunk kernels of the soft k-means map, in the centroid-major [g, k, r] layout.

Shapes: x [g, r, d] rows, n [g, r] counts (None = all ones), c [g, k, d] centroids,
tau [g, 1, 1], attention A^T [g, k, r] (A_ij = softmax_j(-||x_i - c_j||^2 / tau)).

Why this layout and these steps (profiled on one thread, 1M rows x 16 centroids, float32):
- the row max / normaliser are reductions over k; over dim 1 of [g, k, r] they vectorise along the
  contiguous rows (amax: 1.6 ms per 1M rows, against 15 ms over the last dim of [g, r, k]);
- logits far below the row max underflow exp into subnormals, which takes a ~50x slower path
  (exp of [-1000, 0]: 261 ms per 16M elements, of [-80, 0]: 3-5 ms); products of such values do too.
  They are floored at soft_step.exp_floor (exp(-36) in float32, exp(-300) in float64);
- for d = 1 the squared distance is formed as (x - c)^2 (exact up to rounding of the small
  differences) rather than x^2 - 2xc + c^2, whose cancellation costs ~5e-5 absolute attention error
  at 4 bits and ~2e-2 at 8 bits in float32; it is also the cheaper form (12 ms vs 17 ms per 1M rows);
- the map needs only the unnormalised exp E and the row sums s: num = E (x / s), mass = E (1 / s),
  one [g, k, r] x [g, r, d + 1] product, so the attention is never normalised in place.
- products of a [g, k, r] attention-shaped tensor with a thin [g, r, p] or [g, k, p] operand (p = d or
  d + 1) put the thin operand first (contract_rows / contract_clusters): MKL's batched GEMM runs
  [g, p, r] x [g, r, k] 2-8x faster than [g, k, r] x [g, r, p], and [g, p, k] x [g, k, r] 2-10x faster
  than [g, r, k] x [g, k, p]; an outer product over p = 1 is a broadcast (30x faster than bmm at 3,072
  groups of 168 rows). Measured on one thread at (g, r) = (1, 65536), (36, 4096), (3072, 168), k = 16.
One map evaluation costs ~30 ms per 1M rows at k = 16 (the previous kernel: ~150 ms).
Per-chunk products are float32 (float64 for float64 weights); chunk partial sums are accumulated in
float64, which bounds the float32 error to one chunk's worth of rows.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import fused
from .soft_step import exp_floor, row_chunks, update_centroids


def shifted_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||x_i - c_j||^2 minus its row minimum over j, [g, k, r] (a fresh tensor)."""
    if x.shape[-1] == 1:
        d2 = x.transpose(1, 2) - c
        d2.square_()
    else:  # ||x_i||^2 is a row constant that the shift removes
        d2 = torch.baddbmm(c.square().sum(-1, keepdim=True), c, x.transpose(1, 2), alpha=-2)
    return d2.sub_(d2.amin(1, keepdim=True))


def shifted_exp(x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """E^T [g, k, r] = exp(L - max_j L), L = -||x_i - c_j||^2 / tau, floored at exp(exp_floor)."""
    e = shifted_distances(x, c).mul_(-1 / tau)
    return e.clamp_min_(exp_floor(e.dtype)).exp_()


def attention_t(x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """A^T [g, k, r], columns summing to one."""
    e = shifted_exp(x, c, tau)
    return e.div_(e.sum(1, keepdim=True))


def contract_rows(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i a[g, j, i] y[g, i, p]: a [g, k, r], y [g, r, p] (thin) -> [g, k, p] (= bmm(a, y)).

    One group keeps bmm(a, y): the tiny 2-bit Brevitas MNIST training (tests/integrations/brevitas) is sensitive
    to this sum's rounding order (the loss ratio after 50 steps moved from 0.48 to 0.77 with the other order,
    although that order is the more accurate one); this keeps it, at the swapped order's speed-up (0.89 against
    0.12 ms per 65,536 rows x 16 centroids) for one group."""
    if a.shape[0] == 1:
        return torch.bmm(a, y)
    return torch.bmm(y.transpose(1, 2).contiguous(), a.transpose(1, 2)).transpose(1, 2)


def contract_clusters(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_j a[g, j, i] m[g, j, p]: a [g, k, r], m [g, k, p] (thin) -> [g, r, p] (= bmm(a^T, m))."""
    return torch.bmm(m.transpose(1, 2), a).transpose(1, 2)


def outer_rows(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_p m[g, j, p] y[g, i, p]: m [g, k, p], y [g, r, p] -> [g, k, r] (= bmm(m, y^T); p = 1: a broadcast)."""
    return m * y.transpose(1, 2) if m.shape[-1] == 1 else torch.bmm(m, y.transpose(1, 2))


def map_sums(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor, rows: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(num [g, k, d], mass [g, k]) = (sum_i n_i A_ij x_i, sum_i n_i A_ij), float64 accumulated."""
    if fused.use_fused(x, c.shape[1]):
        acc, _ = fused.map_sums(x, n, c, tau, rows, exp_floor(x.dtype), with_output=False)
        return acc[..., 0:1], acc[..., 1]
    g, r, d = x.shape
    acc = torch.zeros(g, c.shape[1], d + 1, dtype=torch.float64, device=x.device)
    for s in row_chunks(r, rows):
        e = shifted_exp(x[:, s], c, tau)
        inv = e.sum(1).reciprocal_()  # [g, rows]
        if n is not None:
            inv.mul_(n[:, s])
        inv = inv.unsqueeze(-1)
        acc += contract_rows(e, torch.cat([x[:, s] * inv, inv], -1))
    return acc[..., :d], acc[..., d]


def map_sums_and_output(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
                        rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """map_sums and the output A(C) C [g, r, d] (x's dtype) from one attention computation per chunk."""
    if fused.use_fused(x, c.shape[1]):
        acc, x_hat = fused.map_sums(x, n, c, tau, rows, exp_floor(x.dtype), with_output=True)
        return acc[..., 0:1], acc[..., 1], x_hat
    g, r, d = x.shape
    acc = torch.zeros(g, c.shape[1], d + 1, dtype=torch.float64, device=x.device)
    x_hat = torch.empty_like(x)
    ct = c.transpose(1, 2)
    for s in row_chunks(r, rows):
        e = shifted_exp(x[:, s], c, tau)
        inv = e.sum(1).reciprocal_()  # [g, rows]
        x_hat[:, s] = torch.bmm(ct, e).mul_(inv.unsqueeze(1)).transpose(1, 2)
        if n is not None:
            inv.mul_(n[:, s])
        inv = inv.unsqueeze(-1)
        acc += contract_rows(e, torch.cat([x[:, s] * inv, inv], -1))
    return acc[..., :d], acc[..., d], x_hat


def soft_map(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor, rows: int
             ) -> torch.Tensor:
    """F(C) = sum_i n_i A_ij x_i / sum_i n_i A_ij (empty clusters keep c_j). [g, k, d] in c's dtype."""
    num, mass = map_sums(x, n, c, tau, rows)
    return update_centroids(c, num, mass)


def attention_chunks(x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, rows: int,
                     kept: Optional[torch.Tensor] = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (row slice, A^T chunk [g, k, rows]); recomputed, or sliced from a kept [g, k, r]."""
    for s in row_chunks(x.shape[1], rows):
        yield s, (kept[:, :, s] if kept is not None else attention_t(x[:, s], c, tau))
