"""A small GMRES for the IDKM adjoint system (I - J^T) u = v, J = dF/dC at the fixed point.

The plain Neumann iteration u <- v + J^T u converges at the rate of the forward soft k-means,
which is slow exactly when clusters overlap; GMRES needs far fewer operator applications
(each one a pass over the weight) and its memory is max_iter vectors of the centroids' size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def gmres(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, max_iter: int, tol: float
          ) -> tuple[torch.Tensor, int, float]:
    """Solve matvec(x) = b. Returns (x, iterations, relative residual ||b - A x|| / ||b||)."""
    beta = float(b.norm())
    if beta == 0.0:
        return torch.zeros_like(b), 0, 0.0
    basis = [b / beta]
    hess = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)
    rhs = torch.zeros(max_iter + 1, dtype=torch.float64)
    rhs[0] = beta
    y, residual, it = torch.zeros(0, dtype=torch.float64), math.inf, 0
    for it in range(1, max_iter + 1):
        j = it - 1
        w = matvec(basis[j])
        for i, v in enumerate(basis):  # modified Gram-Schmidt
            hess[i, j] = float((w * v).sum())
            w = w - hess[i, j].item() * v
        hess[j + 1, j] = float(w.norm())
        h, r = hess[: it + 1, :it], rhs[: it + 1]
        y = torch.linalg.lstsq(h, r.unsqueeze(1)).solution.squeeze(1)
        residual = float((r - h @ y).norm()) / beta
        if residual <= tol or hess[j + 1, j] <= 1e-14 * beta or not math.isfinite(residual):
            break
        basis.append(w / hess[j + 1, j].item())
    x = sum(coef * v for coef, v in zip(y.tolist(), basis))
    return x, it, residual
