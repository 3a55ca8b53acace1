"""The IDKM adjoint: solve (I - J^T) u = v, J = dF/dC at the fixed point C*.

For k * d <= EXPLICIT_JACOBIAN_MAX, J is formed explicitly in the forward's output pass (held for
backward: (k d)^2 float64, independent of m and of the iterations), so GMRES runs on a small dense
matrix and costs no passes over the weight (previously one pass per GMRES iteration, ~16 per step).
Larger LUTs use the matrix-free product (one pass per iteration). J's spectral radius also tells
whether the fixed point is stable (< 1: plain iteration converges to it).

J in closed form (L = -||x_i - c_j||^2 / tau, A = softmax_j L, w_i the row counts, S_j = sum_i w_i A_ij):
    dF_j/dc_l = 2 / (tau S_j) [delta_jl sum_i w_i A_ij (x_i - F_j)(x_i - c_j)^T
                               - sum_i w_i A_ij A_il (x_i - F_j)(x_i - c_l)^T],
the second term one [k d, r] x [r, k d] product of P_(j,a),i = w_i A_ij (x_ia - F_ja) and
Q_(l,b),i = A_il (x_ib - c_lb). Empty clusters (S_j ~ 0) keep c_j and get J rows of zero, as in the
matrix-free product (their ubar is zero).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

from .gmres import gmres
from .soft_step import empty_clusters

EXPLICIT_JACOBIAN_MAX = 1024  # k * d up to which J is formed ([g, kd, kd] float64, 8 MiB per group)


def use_explicit_jacobian(k: int, d: int) -> bool:
    return k * d <= EXPLICIT_JACOBIAN_MAX


def jacobian_chunk(a: torch.Tensor, x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor,
                   f: torch.Tensor) -> torch.Tensor:
    """One chunk's sum_i of the bracket above (without the 2 / (tau S_j) factor), [g, kd, kd]."""
    g, k, r = a.shape
    d = x.shape[-1]
    if d == 1:  # differences in units of the weights' scale, so that products stay normal numbers
        scale = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
        xt = x.transpose(1, 2) / scale  # [g, 1, r]
        dxc = xt - c / scale
        q = a * dxc
        p = a * (xt - f / scale)
        if n is not None:
            p.mul_(n.unsqueeze(1))
        return (torch.diag_embed((p * dxc).sum(2)) - torch.bmm(p, q.transpose(1, 2))) * scale.square()
    dxc = x.unsqueeze(1) - c.unsqueeze(2)  # [g, k, r, d]
    p = a.unsqueeze(-1) * (x.unsqueeze(1) - f.unsqueeze(2))
    if n is not None:
        p = p * n.view(g, 1, r, 1)
    q = a.unsqueeze(-1) * dxc
    off = torch.bmm(p.transpose(2, 3).reshape(g, k * d, r), q.transpose(2, 3).reshape(g, k * d, r).transpose(1, 2))
    diag = torch.einsum("gkra,gkrb->gkab", p, dxc)  # [g, k, d, d]
    jac = -off.view(g, k, d, k, d)
    idx = torch.arange(k, device=a.device)
    jac[:, idx, :, idx, :] += diag.transpose(0, 1)
    return jac.view(g, k * d, k * d)


def scale_jacobian(sums: torch.Tensor, mass: torch.Tensor, tau: torch.Tensor, d: int) -> torch.Tensor:
    """J [g, kd, kd] from the accumulated bracket sums: rows of cluster j times 2 / (tau S_j), 0 if empty."""
    empty = empty_clusters(mass)
    coef = torch.where(empty, torch.zeros_like(mass), 2 / (tau.view(-1, 1) * torch.where(empty, 1, mass)))
    return sums * coef.repeat_interleave(d, dim=1).unsqueeze(-1)


def solve_adjoint(jt_matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, max_iter: int, tol: float,
                  stats) -> torch.Tensor:
    """Solve (I - J^T) u = v by GMRES ([g, k, d]); fall back to JFB (u = v) if it does not converge."""
    u, stats.adjoint_iters, stats.adjoint_residual = gmres(lambda w: w - jt_matvec(w), v, max_iter, tol)
    stats.adjoint_converged = stats.adjoint_residual <= tol
    if stats.adjoint_converged:
        return u
    stats.jfb_fallbacks += 1
    warnings.warn(f"idkm: the adjoint solve did not converge ({stats.adjoint_iters} iterations, relative residual "
                  f"{stats.adjoint_residual:.3g} > adjoint_tol {tol:g}); using the Jacobian-free (JFB) "
                  "gradient for this step. Raise adjoint_max_iter, or max_iter so the forward converges.",
                  RuntimeWarning, stacklevel=4)
    return v


SPECTRAL_RADIUS_MAX_DIM = 256  # eigenvalues of larger J cost more than they tell; reported as NaN


def spectral_radius(jac: torch.Tensor) -> float:
    """max |eigenvalue| of J [g, kd, kd] over groups (NaN when kd > SPECTRAL_RADIUS_MAX_DIM)."""
    if jac.shape[-1] > SPECTRAL_RADIUS_MAX_DIM or not bool(torch.isfinite(jac).all()):
        return math.nan
    return float(torch.linalg.eigvals(jac).abs().amax())


def dense_matvec(jac: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """w [g, k, d] -> J^T w [g, k, d] for an explicit J [g, kd, kd] (float64)."""
    def matvec(w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(w.shape[0], -1, 1).to(jac.dtype)
        return torch.bmm(jac.transpose(1, 2), flat).view_as(w).to(w.dtype)
    return matvec
