"""IDKM and IDKM-JFB: soft k-means differentiated at its fixed point, in bounded memory.

Forward: iterate C <- F(C, X) without autograd to the fixed point C*, output X~ = A(C*, X) C*.
Backward, for the incoming gradient G = dL/dX~:
    v  = (dO/dC)^T G                       (O(C, X) = A(C, X) C)
    u  = v + (dF/dC)^T u                   (adjoint, solved by GMRES to adjoint_tol; JFB: u = v)
    dX = (dO/dX)^T G + (dF/dX)^T u
Every product above is a sum over rows of closed-form terms of the attention A, so the passes run
over row chunks that recompute A: autograd holds only X, C*, the cluster masses and F(C*),
O(m*d + k*d), whatever the number of iterations. With chunk_size=0 the attention at C* is kept
instead (the IDKM paper's O(m*k) memory, no recomputation).

Closed forms used (L = -||x_i - c_j||^2 / tau, A = softmax_j L): for f = sum_ij A_ij B_ij,
E = A * (B - rowsum(A * B)) is df/dL, and df/dx_i = 2/tau (E C)_i, df/dc_j = 2/tau (E^T X - C colsum E)_j.
With F_j = N_j / S_j, u^T dF equals the differential of sum_i n_i sum_j A_ij ubar_j . (x_i - F_j),
ubar_j = u_j / S_j, with ubar and F held fixed: that is B_ij = n_i ubar_j . (x_i - F_j) plus the
explicit x term n_i (A ubar)_i.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .gmres import gmres
from .soft_step import (attention, chunk_rows, compute_dtype, mass_floor, row_chunks, soft_step, update_centroids,
                        weighted)
from .uniquify import gather_rows, scatter_rows, uniquify_rows


@dataclass
class SolveStats:
    """Iteration counts and residuals of the last forward and backward solve (filled in place)."""

    forward_iters: int = 0
    forward_residual: float = math.nan
    adjoint_iters: int = 0
    adjoint_residual: float = math.nan
    adjoint_converged: Optional[bool] = None
    jfb_fallbacks: int = 0


class SolveOptions(NamedTuple):
    max_iter: int
    tol: float
    chunk_size: Optional[int]  # None: automatic bound; 0: keep the attention; n: rows per chunk
    uniquify: bool
    jfb: bool
    adjoint_max_iter: int
    adjoint_tol: float


def fixed_point(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
                max_iter: int, tol: float, rows: int) -> tuple[torch.Tensor, int, float]:
    """Iterate C <- F(C) until max|dC| <= tol * max|x|. Returns (C [g, k, d], iterations, residual)."""
    scale = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    residual, it = math.inf, 0
    for it in range(1, max_iter + 1):
        c_new = soft_step(x, n, c, tau, rows)
        residual = float((c_new - c).abs().amax() / scale)
        c = c_new
        if residual <= tol:
            break
    return c, it, residual


def output_pass(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor, rows: int,
                keep_attention: bool):
    """X~ = A(C) C [g, r, d], cluster masses S [g, k], F(C) [g, k, d], and A [g, r, k] if kept."""
    x_hat = torch.empty_like(x)
    num = torch.zeros(c.shape, dtype=torch.float64, device=c.device)
    mass = torch.zeros(c.shape[:2], dtype=torch.float64, device=c.device)
    kept = []
    for s in row_chunks(x.shape[1], rows):
        a = attention(x[:, s], c, tau)
        x_hat[:, s] = torch.bmm(a, c)
        aw = weighted(a, None if n is None else n[:, s])
        num += torch.bmm(aw.transpose(1, 2), x[:, s]).double()
        mass += aw.sum(1).double()
        if keep_attention:
            kept.append(a)
    mass = mass.to(c.dtype)
    f = update_centroids(c, num.to(c.dtype), mass)
    return x_hat, mass, f, (torch.cat(kept, 1) if keep_attention else None)


def _logit_vjp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E = d(sum A*B)/dL for A = softmax(L): A * (B - rowsum(A * B)). [g, r, k]."""
    return a * (b - (a * b).sum(-1, keepdim=True))


def _grad_c(e: torch.Tensor, x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Centroid gradient through the logits: 2/tau (E^T X - C colsum(E)). [g, k, d]."""
    return (2 / tau) * (torch.bmm(e.transpose(1, 2), x) - c * e.sum(1).unsqueeze(-1))


def _grad_x(e: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Row gradient through the logits: 2/tau E C. [g, r, d]."""
    return (2 / tau) * torch.bmm(e, c)


def _fixed_point_b(x: torch.Tensor, n: Optional[torch.Tensor], u_bar: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """B_ij = n_i ubar_j . (x_i - F_j) for the VJP of F. [g, r, k]."""
    b = torch.bmm(x, u_bar.transpose(1, 2)) - (u_bar * f).sum(-1).unsqueeze(1)
    return weighted(b, n)


class _Saved(NamedTuple):
    x: torch.Tensor  # [g, r, d] clustered rows (distinct rows when uniquified), compute dtype
    n: Optional[torch.Tensor]  # [g, r] counts, or None
    inv: Optional[torch.Tensor]  # [g, m] row -> distinct row, or None
    c: torch.Tensor  # [g, k, d] C*
    mass: torch.Tensor  # [g, k] S(C*)
    f: torch.Tensor  # [g, k, d] F(C*)
    tau: torch.Tensor  # [g, 1, 1]
    a: Optional[torch.Tensor]  # [g, r, k] attention at C*, only with chunk_size=0


class ImplicitSoftKMeans(torch.autograd.Function):
    """(x [g, m, d], c0 [g, k, d], tau [g, 1, 1]) -> (x_hat [g, m, d] in x's dtype, C* [g, k, d])."""

    @staticmethod
    def forward(ctx, x, c0, tau, opts: SolveOptions, stats: SolveStats):
        cdtype = compute_dtype(x.dtype)
        if opts.uniquify:
            rows_x, n, inv = uniquify_rows(x.detach(), cdtype)
            rows_x = rows_x.to(cdtype)
        else:
            rows_x, n, inv = x.detach().to(cdtype), None, None
        g, r, d = rows_x.shape
        k = c0.shape[1]
        keep = opts.chunk_size == 0
        rows = r if keep else chunk_rows(opts.chunk_size, g, r, k, d)
        tau = tau.to(cdtype)
        c, stats.forward_iters, stats.forward_residual = fixed_point(
            rows_x, n, c0.detach().to(cdtype), tau, opts.max_iter, opts.tol, rows)
        x_hat, mass, f, a = output_pass(rows_x, n, c, tau, rows, keep)
        if inv is not None:
            x_hat = gather_rows(x_hat, inv)
        tensors = [rows_x, c, mass, f, tau] + [t for t in (n, inv, a) if t is not None]
        ctx.save_for_backward(*tensors)
        ctx.layout = (n is not None, inv is not None, a is not None)
        ctx.opts, ctx.stats, ctx.rows, ctx.x_dtype = opts, stats, rows, x.dtype
        ctx.mark_non_differentiable(c)
        return x_hat.to(x.dtype), c

    @staticmethod
    def backward(ctx, grad_x_hat, _grad_c_out):
        saved = _unpack(ctx)
        opts, stats = ctx.opts, ctx.stats
        grad = grad_x_hat.to(saved.x.dtype)
        if saved.inv is not None:
            grad_rows = scatter_rows(grad, saved.inv, saved.x.shape[1])
        else:
            grad_rows = grad
        v = _output_vjp_c(saved, grad_rows, ctx.rows)
        u = v if opts.jfb else _solve_adjoint(saved, v, ctx.rows, opts, stats)
        u_bar = _divide_by_mass(u, saved.mass)
        if saved.inv is None:
            dx = _input_grad(saved, grad_rows, u_bar, ctx.rows)
        else:
            dx = _input_grad_uniquified(saved, grad, u_bar, ctx.rows)
        return dx.to(ctx.x_dtype), None, None, None, None


def _unpack(ctx) -> _Saved:
    tensors = list(ctx.saved_tensors)
    x, c, mass, f, tau = tensors[:5]
    rest = iter(tensors[5:])
    has_n, has_inv, has_a = ctx.layout
    n = next(rest) if has_n else None
    inv = next(rest) if has_inv else None
    a = next(rest) if has_a else None
    return _Saved(x, n, inv, c, mass, f, tau, a)


def _chunks(saved: _Saved, rows: int):
    """Yield (slice, attention chunk), recomputed unless kept from the forward."""
    for s in row_chunks(saved.x.shape[1], rows):
        a = saved.a[:, s] if saved.a is not None else attention(saved.x[:, s], saved.c, saved.tau)
        yield s, a


def _divide_by_mass(u: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """ubar = u / S, zero for empty clusters (which F leaves unchanged). [g, k, d]."""
    empty = mass <= mass_floor(mass.dtype)
    return torch.where(empty.unsqueeze(-1), torch.zeros_like(u), u / torch.where(empty, 1, mass).unsqueeze(-1))


def _output_vjp_c(saved: _Saved, grad_rows: torch.Tensor, rows: int) -> torch.Tensor:
    """v = (dO/dC)^T G for O = A(C) C. [g, k, d]."""
    v = torch.zeros_like(saved.c)
    for s, a in _chunks(saved, rows):
        g = grad_rows[:, s]
        e = _logit_vjp(a, torch.bmm(g, saved.c.transpose(1, 2)))
        v += _grad_c(e, saved.x[:, s], saved.c, saved.tau) + torch.bmm(a.transpose(1, 2), g)
    return v


def _fixed_point_vjp_c(saved: _Saved, u: torch.Tensor, rows: int) -> torch.Tensor:
    """(dF/dC)^T u at C*. [g, k, d]."""
    u_bar = _divide_by_mass(u, saved.mass)
    out = torch.zeros_like(saved.c)
    for s, a in _chunks(saved, rows):
        n = None if saved.n is None else saved.n[:, s]
        e = _logit_vjp(a, _fixed_point_b(saved.x[:, s], n, u_bar, saved.f))
        out += _grad_c(e, saved.x[:, s], saved.c, saved.tau)
    return out


def _solve_adjoint(saved: _Saved, v: torch.Tensor, rows: int, opts: SolveOptions, stats: SolveStats) -> torch.Tensor:
    """Solve (I - (dF/dC)^T) u = v with GMRES; fall back to JFB (u = v) if it does not converge."""
    u, stats.adjoint_iters, stats.adjoint_residual = gmres(
        lambda w: w - _fixed_point_vjp_c(saved, w, rows), v, opts.adjoint_max_iter, opts.adjoint_tol)
    stats.adjoint_converged = stats.adjoint_residual <= opts.adjoint_tol
    if stats.adjoint_converged:
        return u
    stats.jfb_fallbacks += 1
    warnings.warn(f"idkm: the adjoint solve did not converge ({stats.adjoint_iters} iterations, relative residual "
                  f"{stats.adjoint_residual:.3g} > adjoint_tol {opts.adjoint_tol:g}); using the Jacobian-free (JFB) "
                  "gradient for this step. Raise adjoint_max_iter, or max_iter so the forward converges.",
                  RuntimeWarning, stacklevel=3)
    return v


def _input_grad(saved: _Saved, grad_rows: torch.Tensor, u_bar: torch.Tensor, rows: int) -> torch.Tensor:
    """dX = (dO/dX)^T G + (dF/dX)^T u, row by row. [g, m, d]."""
    dx = torch.empty_like(saved.x)
    for s, a in _chunks(saved, rows):
        x = saved.x[:, s]
        b = torch.bmm(grad_rows[:, s], saved.c.transpose(1, 2)) + _fixed_point_b(x, None, u_bar, saved.f)
        dx[:, s] = _grad_x(_logit_vjp(a, b), saved.c, saved.tau) + torch.bmm(a, u_bar)
    return dx


def _input_grad_uniquified(saved: _Saved, grad: torch.Tensor, u_bar: torch.Tensor, rows: int) -> torch.Tensor:
    """dX_i = J(x_i) G_i + q(x_i), with J and q computed once per distinct row. [g, m, d].

    J(x) = 2/tau sum_j A_j (c_j - x~)(c_j - x~)^T is the output Jacobian (symmetric),
    q(x) the fixed-point term for one occurrence of x.
    """
    g, r, d = saved.x.shape
    jac = torch.empty(g, r, d, d, dtype=saved.x.dtype, device=saved.x.device)
    q = torch.empty_like(saved.x)
    for s, a in _chunks(saved, rows):
        x = saved.x[:, s]
        delta = saved.c.unsqueeze(1) - torch.bmm(a, saved.c).unsqueeze(2)  # [g, rows, k, d]
        jac[:, s] = (2 / saved.tau.unsqueeze(-1)) * torch.einsum("grk,grkd,grke->grde", a, delta, delta)
        e = _logit_vjp(a, _fixed_point_b(x, None, u_bar, saved.f))
        q[:, s] = _grad_x(e, saved.c, saved.tau) + torch.bmm(a, u_bar)
    jac_rows = gather_rows(jac.flatten(2), saved.inv).unflatten(2, (d, d))  # [g, m, d, d]
    return torch.einsum("gmde,gme->gmd", jac_rows, grad) + gather_rows(q, saved.inv)


def implicit_soft_kmeans(x: torch.Tensor, c0: torch.Tensor, tau: torch.Tensor, opts: SolveOptions,
                         stats: SolveStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-function form of ImplicitSoftKMeans (x [g, m, d], c0 [g, k, d], tau [g, 1, 1])."""
    return ImplicitSoftKMeans.apply(x, c0, tau, opts, stats)
