"""DKM: soft k-means unrolled under autograd (memory grows with the number of iterations)."""
from __future__ import annotations

import torch

from .soft_step import attention, soft_step
from .stats import SolveStats


def unrolled_soft_kmeans(x: torch.Tensor, c0: torch.Tensor, tau: torch.Tensor, max_iter: int, tol: float,
                         stats: SolveStats) -> tuple[torch.Tensor, torch.Tensor]:
    """x [g, m, d] (compute dtype), c0 [g, k, d] -> (x_hat [g, m, d], C_t [g, k, d] detached).

    Every iteration stays on the autograd tape, as in the DKM paper; the initial centroids are a
    warm start and receive no gradient.
    """
    c = c0.detach().clone()  # the caller may update its centroid buffer in place after forward
    scale = x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    stats.forward_iters = 0
    for it in range(1, max_iter + 1):
        c_new = soft_step(x, None, c, tau, rows=x.shape[1])
        stats.forward_iters = stats.forward_evals = it
        stats.forward_residual = float((c_new - c).detach().abs().amax() / scale)
        c = c_new
        if stats.forward_residual <= tol:
            break
    x_hat = torch.bmm(attention(x, c, tau), c)
    return x_hat, c.detach()
