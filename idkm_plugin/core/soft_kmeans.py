"""`soft_kmeans`: the one entry point to the three differentiable clusterings."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .enums import Method, Solver, Uniquify
from .implicit import SolveOptions, implicit_soft_kmeans
from .soft_step import as_tau, compute_dtype
from .stats import SolveStats
from .uniquify import GRID_LEVELS
from .unrolled import unrolled_soft_kmeans

_HALF = (torch.float16, torch.bfloat16)
# auto rounds float32 d = 1 weights to the 16-bit grid (see README, "Training speed") when a LUT has at
# least GRID_AUTO_MIN_ROWS weights (below it most values stay distinct and the grid saves little) and
# the grid step is at most GRID_AUTO_MAX_STEP times the soft-assignment width sqrt(tau). Measured on
# 1M weights against exact float32 (relative norms): step/sqrt(tau) 0.0035 (normal, 4 bits): centroids
# 8e-6, output 1.8e-4, gradient 8e-3; 0.007 (Laplace, 4 bits): 2.5e-5, 5e-4, 3e-2; 0.0009 (normal,
# 2 bits): 3e-7, 1.4e-4, 1.2e-3. At 8 bits (0.055) the grid is too coarse and auto stays exact.
GRID_AUTO_MIN_ROWS = 1 << 18
GRID_AUTO_MAX_STEP = 0.01


def uniquify_mode(uniquify: Uniquify | str, method: Method | str, dtype: torch.dtype, d: int, m: int = 0,
                  grid_step: float = math.inf) -> Uniquify:
    """Resolve the uniquify option to ON (exact distinct values), GRID (float32 rounded to 16 bits) or OFF.

    auto, under idkm / idkm_jfb with d == 1: ON for float16/bfloat16 weights; GRID for float32 weights
    with m >= GRID_AUTO_MIN_ROWS weights per LUT and grid_step (the 16-bit grid's step over
    sqrt(tau), see grid_step_ratio) <= GRID_AUTO_MAX_STEP; else OFF. float64 is never rounded.
    """
    uniquify, method = Uniquify(uniquify), Method(method)
    if method is Method.DKM:
        if uniquify in (Uniquify.ON, Uniquify.GRID):
            raise ValueError(f"uniquify={uniquify.value!r} is not allowed with method='dkm'; use 'idkm' or 'idkm_jfb'")
        return Uniquify.OFF
    if uniquify is Uniquify.GRID and d != 1:
        raise ValueError(f"uniquify='grid' needs dim 1 (scalar weights); got dim {d}")
    if uniquify is Uniquify.AUTO:
        if d != 1:
            return Uniquify.OFF
        if dtype in _HALF:
            return Uniquify.ON
        fine = m >= GRID_AUTO_MIN_ROWS and grid_step <= GRID_AUTO_MAX_STEP
        return Uniquify.GRID if dtype == torch.float32 and fine else Uniquify.OFF
    return uniquify


def grid_step_ratio(x: torch.Tensor, tau: torch.Tensor) -> float:
    """x [g, m, 1], tau [g, 1, 1] -> max over groups of (16-bit grid step) / sqrt(tau)."""
    span = (x.amax(dim=(1, 2)) - x.amin(dim=(1, 2))).double()
    return float((span / (GRID_LEVELS - 1) / tau.view(-1).double().sqrt()).max())


def use_uniquify(uniquify: Uniquify | str, method: Method | str, dtype: torch.dtype, d: int, m: int = 0) -> bool:
    """Whether the clustering runs on distinct (or grid-rounded) values; see uniquify_mode."""
    return uniquify_mode(uniquify, method, dtype, d, m) is not Uniquify.OFF


def soft_kmeans(x: torch.Tensor, init_centroids: torch.Tensor, *, tau: float | torch.Tensor | None = None,
                method: Method | str = Method.IDKM, max_iter: int = 30, tol: float = 1e-5,
                chunk_size: Optional[int] = None, uniquify: Uniquify | str = Uniquify.AUTO,
                adjoint_max_iter: int = 100, adjoint_tol: float = 1e-4,
                solver: Solver | str = Solver.ANDERSON, stats: Optional[SolveStats] = None,
                weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable soft k-means of the rows of x.

    Args:
        x: [m, d] or [g, m, d] vectors (g independent problems), any float dtype.
        init_centroids: [k, d] or [g, k, d] starting centroids (a warm start; no gradient).
        tau: temperature (float, or [g] tensor), or None for the weight-derived default.
        method: "dkm" (unrolled), "idkm" (implicit) or "idkm_jfb" (Jacobian-free).
        max_iter: dkm: iterations unrolled; idkm / idkm_jfb: at most this many map evaluations.
        tol: stop when max |F(C) - C| <= tol * max |x|.
        chunk_size: rows per chunk for idkm / idkm_jfb; None: automatic memory bound;
            0: keep the attention matrix for backward.
        uniquify: "auto", "on", "off" or "grid" (see uniquify_mode).
        adjoint_max_iter, adjoint_tol: GMRES of the idkm adjoint (JFB fallback if unconverged).
        solver: "anderson" (default) or "picard", the fixed-point solver of idkm / idkm_jfb.
        stats: a SolveStats filled with iteration counts and residuals.
        weights: [m] or [g, m] non-negative weight of each row (idkm / idkm_jfb), e.g. Fisher sensitivities:
            C*_j = sum_i w_i a_ij x_i / sum_i w_i a_ij; no gradient flows to them. None: all 1.

    Returns:
        x_hat: the soft-clustered x = A(C*, x) C*, same shape and dtype as x.
        centroids: C*, [k, d] or [g, k, d] in float32 (float64 for float64 x).
    """
    method = Method(method)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    c3 = init_centroids.unsqueeze(0) if init_centroids.dim() == 2 else init_centroids
    _check_shapes(x3, c3)
    if tau is not None and not bool(torch.all((torch.as_tensor(tau) > 0) & torch.isfinite(torch.as_tensor(tau)))):
        raise ValueError(f"soft_kmeans: tau={tau!r} is not allowed; expected a finite positive temperature or None")
    w3 = None if weights is None else _checked_weights(weights, x3, method, squeeze)
    stats = SolveStats() if stats is None else stats
    cdtype = compute_dtype(x.dtype)
    tau3 = as_tau(tau, x3.detach().to(cdtype), c3.shape[1])
    maybe_grid = Uniquify(uniquify) is Uniquify.AUTO and x.dtype == torch.float32 and x3.shape[1] >= GRID_AUTO_MIN_ROWS
    step = grid_step_ratio(x3.detach(), tau3) if maybe_grid else math.inf
    mode = uniquify_mode(uniquify, method, x.dtype, x3.shape[-1], x3.shape[1], step)
    if method is Method.DKM:
        x_hat, c = unrolled_soft_kmeans(x3.to(cdtype), c3.to(cdtype), tau3, max_iter, tol, stats)
        x_hat = x_hat.to(x.dtype)
    else:
        opts = SolveOptions(max_iter, tol, chunk_size, mode, method is Method.IDKM_JFB, adjoint_max_iter,
                            adjoint_tol, Solver(solver))
        x_hat, c = implicit_soft_kmeans(x3, c3, tau3, opts, stats, w3)
    return (x_hat[0], c[0]) if squeeze else (x_hat, c)


def _checked_weights(weights: torch.Tensor, x3: torch.Tensor, method: Method, squeeze: bool) -> torch.Tensor:
    """Row weights as [g, m], after checking them against x3 [g, m, d]."""
    if method is Method.DKM:
        raise ValueError("soft_kmeans: weights are not allowed with method='dkm'; use 'idkm' or 'idkm_jfb'")
    w3 = weights.unsqueeze(0) if squeeze else weights
    if tuple(w3.shape) != tuple(x3.shape[:2]):
        raise ValueError(f"soft_kmeans: weights {list(weights.shape)} do not match x {list(x3.shape)}; expected one "
                         "weight per row, [m] or [g, m]")
    if not bool(torch.isfinite(w3).all()) or bool((w3 < 0).any()) or not bool((w3.sum(1) > 0).all()):
        raise ValueError("soft_kmeans: weights must be finite and >= 0, with a positive sum in every group")
    return w3


def _check_shapes(x: torch.Tensor, c: torch.Tensor) -> None:
    if x.dim() != 3 or c.dim() != 3:
        raise ValueError(f"soft_kmeans: x must be [m, d] or [g, m, d] and init_centroids [k, d] or [g, k, d]; "
                         f"got x {list(x.shape)} and init_centroids {list(c.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"soft_kmeans: x has dtype {x.dtype}; expected a floating-point tensor")
    if c.shape[0] != x.shape[0] or c.shape[2] != x.shape[2]:
        raise ValueError(f"soft_kmeans: init_centroids {list(c.shape)} do not match x {list(x.shape)} "
                         "(groups and vector dim must agree)")
    if x.shape[1] == 0:
        raise ValueError("soft_kmeans: x has no rows")
