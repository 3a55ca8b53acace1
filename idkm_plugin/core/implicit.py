"""IDKM and IDKM-JFB: soft k-means differentiated at its fixed point, in bounded memory.

Forward: solve C* = F(C*, X) without autograd (Anderson or plain iteration, core.fixed_point),
output X~ = A(C*, X) C*. Backward, for the incoming gradient G = dL/dX~:
    v  = (dO/dC)^T G                       (O(C, X) = A(C, X) C)
    u  = v + (dF/dC)^T u                   (adjoint, core.adjoint; JFB: u = v)
    dX = (dO/dX)^T G + (dF/dX)^T u
Every product above is a sum over rows of closed-form terms of the attention A, so the passes run
over row chunks that recompute A (core.kernel): autograd holds only X, C*, the cluster masses and
F(C*), O(m*d + k*d), whatever the number of iterations. With chunk_size=0 the attention at C* is
kept instead (the IDKM paper's O(m*k) memory, no recomputation). The forward's output pass also
forms J = dF/dC (k*d <= EXPLICIT_JACOBIAN_MAX), so the backward makes two passes: v, then dX
(plus one per GMRES iteration for larger LUTs).
Without J (idkm_jfb, large LUTs) and for the dense kernel, the output pass and the map's sums share one
attention computation per chunk (kernel.map_sums_and_output), and the solve's first evaluation is such a
pass: a warm start C0 already within tol (max |F(C0) - C0| <= tol * max |x|, the stopping rule) is taken as
C* and the forward costs one pass over the weight (a training step after the LUT has converged).

Closed forms used (A^T is [g, k, r]): for f = sum_ij A_ij B_ij, E = A * (B - colsum_k(A * B)) is
df/dL, and df/dx_i = 2/tau (E^T C)_i, df/dc_j = 2/tau (E X - C rowsum E)_j. With F_j = N_j / S_j,
u^T dF is the differential of sum_i n_i sum_j A_ij ubar_j . (x_i - F_j), ubar_j = u_j / S_j, with
ubar and F held fixed: B_ji = n_i ubar_j . (x_i - F_j) plus the explicit x term n_i (A ubar)_i.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from .adjoint import (dense_matvec, jacobian_chunk, scale_jacobian, solve_adjoint, spectral_radius,
                      use_explicit_jacobian)
from . import fused
from .enums import Solver, Uniquify
from .fixed_point import solve_fixed_point
from .kernel import (attention_chunks, contract_clusters, contract_rows, map_sums, map_sums_and_output,
                     outer_rows)
from .soft_step import chunk_rows, compute_dtype, empty_clusters, exp_floor, row_chunks, update_centroids
from .stats import SolveStats
from .uniquify import gather_rows, grid_rows, scatter_rows, uniquify_rows
from .window import SortedRows, sort_rows, use_window, window_map_sums


SumsAt = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # C -> (num [g, k, d], mass [g, k])
UNSTABLE_MARGIN = 1e-4  # spectral radius of dF/dC above 1 + this: an unstable (saddle) fixed point


class SolveOptions(NamedTuple):
    max_iter: int
    tol: float
    chunk_size: Optional[int]  # None: automatic bound; 0: keep the attention; n: rows per chunk
    uniquify: Uniquify  # resolved: ON, GRID or OFF
    jfb: bool
    adjoint_max_iter: int
    adjoint_tol: float
    solver: Solver = Solver.ANDERSON


class _Saved(NamedTuple):
    x: torch.Tensor  # [g, r, d] clustered rows (distinct rows when uniquified), compute dtype
    n: Optional[torch.Tensor]  # [g, r] counts, or None
    inv: Optional[torch.Tensor]  # [g, m] row -> distinct row, or None
    c: torch.Tensor  # [g, k, d] C*
    mass: torch.Tensor  # [g, k] S(C*)
    f: torch.Tensor  # [g, k, d] F(C*)
    tau: torch.Tensor  # [g, 1, 1]
    a: Optional[torch.Tensor]  # [g, k, r] attention at C*, only with chunk_size=0
    jac: Optional[torch.Tensor]  # [g, kd, kd] float64 dF/dC at C*, idkm with k*d <= EXPLICIT_JACOBIAN_MAX
    w: Optional[torch.Tensor] = None  # [g, m] per-occurrence weights of a weighted, uniquified clustering


def _rows_to_cluster(x: torch.Tensor, mode: Uniquify, cdtype: torch.dtype, weights: Optional[torch.Tensor] = None):
    """(rows [g, r, d] in cdtype, row weights [g, r] or None, inverse [g, m] or None).

    A distinct row's weight is its count, or with `weights` [g, m] the sum of its occurrences' weights."""
    w = None if weights is None else weights.detach().to(cdtype)
    if mode is Uniquify.OFF:
        return x.detach().to(cdtype), w, None
    rows, n, inv = (grid_rows if mode is Uniquify.GRID else uniquify_rows)(x.detach(), cdtype)
    if w is not None:
        n = torch.zeros_like(n).scatter_add_(1, inv.long(), w)
    return rows.to(cdtype), n, inv


def output_pass(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor, rows: int,
                keep_attention: bool, with_jacobian: bool, sums_at: SumsAt):
    """Everything the output and backward need at C*, in two passes over the rows.

    sums_at(C) gives (num, mass) as kernel.map_sums (the solve's kernel: windowed for large 1-D LUTs).
    Returns X~ = A(C) C [g, r, d], cluster masses S [g, k], F(C) [g, k, d], J = dF/dC [g, kd, kd]
    (float64) if asked, and A^T [g, k, r] if kept.
    """
    num, mass = sums_at(c)
    mass = mass.to(c.dtype)
    f = update_centroids(c, num, mass)
    g, k, d = c.shape
    x_hat = torch.empty_like(x)
    sums = torch.zeros(g, k * d, k * d, dtype=torch.float64, device=c.device) if with_jacobian else None
    kept = []
    for s, a in attention_chunks(x, c, tau, rows):
        x_hat[:, s] = contract_clusters(a, c)
        if with_jacobian:
            sums += jacobian_chunk(a, x[:, s], None if n is None else n[:, s], c, f)
        if keep_attention:
            kept.append(a)
    jac = scale_jacobian(sums, mass.double(), tau.double(), d) if with_jacobian else None
    return x_hat, mass, f, jac, (torch.cat(kept, 2) if keep_attention else None)


def _solve(x: torch.Tensor, n: Optional[torch.Tensor], c0: torch.Tensor, tau: torch.Tensor, rows: int,
           opts: SolveOptions, solver: Solver, stats: SolveStats):
    """The fixed point and the output pass at it (see output_pass), filling the forward stats."""
    scale = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    k, d = c0.shape[1:]
    if use_window(k, d):
        sorted_rows = sort_rows(x, n)
        sums_at = lambda c: window_map_sums(sorted_rows, c, tau)  # noqa: E731
        sums_of = lambda c, i: window_map_sums(_pick(sorted_rows, i), c, tau[i])  # noqa: E731
    else:
        sums_at = lambda c: map_sums(x, n, c, tau, rows)  # noqa: E731
        sums_of = lambda c, i: map_sums(x[i], None if n is None else n[i], c, tau[i], rows)  # noqa: E731
    with_jacobian = not opts.jfb and use_explicit_jacobian(k, d)
    fused = not (with_jacobian or opts.chunk_size == 0 or use_window(k, d))
    first: list = []
    if fused:  # the first evaluation also gives the output at c0: a warm start within tol is the fixed point
        num, mass0, x_hat0 = map_sums_and_output(x, n, c0, tau, rows)
        f0 = update_centroids(c0, num, mass0)
        res0_groups = (f0 - c0).abs().flatten(1).amax(1) / scale
        res0 = float(res0_groups.max())
        if res0 <= opts.tol:
            stats.forward_iters, stats.forward_evals = 0, stats.forward_evals + 1
            stats.forward_rejections, stats.forward_residual = 0, res0
            stats.spectral_radius = math.nan
            c = c0.clone()  # c0 may share the caller's centroid buffer, which it updates in place
            return c, (x_hat0, mass0.to(c.dtype), f0, None, None)
        first.append(f0)

    def fmap(c: torch.Tensor) -> torch.Tensor:
        if first and c is c0:  # F(c0), computed above
            return first.pop()
        return update_centroids(c, *sums_at(c))

    fmap_groups = (lambda c, i: update_centroids(c, *sums_of(c, i))) if x.shape[0] > 1 else None  # noqa: E731
    sol = solve_fixed_point(fmap, c0, solver, opts.max_iter, opts.tol, scale, fmap_groups)
    stats.forward_iters, stats.forward_evals = sol.iters, stats.forward_evals + sol.evals
    stats.forward_rejections, stats.forward_residual = sol.rejections, sol.residual
    if fused:
        stats.spectral_radius = math.nan
        return _fused_output(x, n, c0, sol.c, tau, rows, res0_groups <= opts.tol, (x_hat0, mass0, f0))
    out = output_pass(x, n, sol.c, tau, rows, opts.chunk_size == 0, with_jacobian, sums_at)
    stats.spectral_radius = spectral_radius(out[3]) if with_jacobian else math.nan
    return sol.c, out


def _pick(rows: SortedRows, idx: torch.Tensor) -> SortedRows:
    return SortedRows(rows.x[idx], None if rows.n is None else rows.n[idx])


def _fused_output(x: torch.Tensor, n: Optional[torch.Tensor], c0: torch.Tensor, c: torch.Tensor, tau: torch.Tensor,
                  rows: int, at_c0: torch.Tensor, first: tuple):
    """C* and the output pass at it: groups already within tol at the warm start ([g] bool at_c0) keep C* = c0
    and the first evaluation's output, sums and F; the others get one fused pass at the solved C*."""
    if not bool(at_c0.any()):
        num, mass, x_hat = map_sums_and_output(x, n, c, tau, rows)
        mass = mass.to(c.dtype)
        return c, (x_hat, mass, update_centroids(c, num, mass), None, None)
    x_hat, mass, f = first[0], first[1].to(c.dtype), first[2].clone()
    c_star = torch.where(at_c0.view(-1, 1, 1), c0, c)
    idx = (~at_c0).nonzero().view(-1)
    if idx.numel():
        num_i, mass_i, x_hat_i = map_sums_and_output(x[idx], None if n is None else n[idx], c_star[idx], tau[idx], rows)
        mass_i = mass_i.to(c.dtype)
        x_hat[idx], mass[idx], f[idx] = x_hat_i, mass_i, update_centroids(c_star[idx], num_i, mass_i)
    return c_star, (x_hat, mass, f, None, None)


class ImplicitSoftKMeans(torch.autograd.Function):
    """(x [g, m, d], c0 [g, k, d], tau [g, 1, 1], weights [g, m] or None) -> (x_hat [g, m, d] in x's dtype,
    C* [g, k, d]).

    `weights` make the clustering a weighted one (C*_j = sum_i w_i a_ij x_i / sum_i w_i a_ij, e.g. Fisher
    sensitivities); they get no gradient.

    If Anderson converges (residual <= tol) to a fixed point that plain iteration could not reach (spectral radius of
    dF/dC above 1: a saddle of the clustering energy, not a minimum), the solve is redone with plain
    iteration from c0 (SolveStats.forward_fallback); this needs the explicit Jacobian (not JFB).
    """

    @staticmethod
    def forward(ctx, x, c0, tau, opts: SolveOptions, stats: SolveStats, weights: Optional[torch.Tensor] = None):
        cdtype = compute_dtype(x.dtype)
        rows_x, n, inv = _rows_to_cluster(x, opts.uniquify, cdtype, weights)
        g, r, d = rows_x.shape
        k = c0.shape[1]
        rows = chunk_rows(None if opts.chunk_size == 0 else opts.chunk_size, g, r, k, d)
        tau, c0 = tau.to(cdtype), c0.detach().to(cdtype)
        stats.forward_evals, stats.forward_fallback = 0, False
        c, (x_hat, mass, f, jac, a) = _solve(rows_x, n, c0, tau, rows, opts, opts.solver, stats)
        converged = stats.forward_residual <= opts.tol
        if opts.solver is Solver.ANDERSON and converged and stats.spectral_radius > 1 + UNSTABLE_MARGIN:
            stats.forward_fallback = True
            c, (x_hat, mass, f, jac, a) = _solve(rows_x, n, c0, tau, rows, opts, Solver.PICARD, stats)
        if inv is not None:
            x_hat = gather_rows(x_hat, inv)
        w = None if weights is None or inv is None else weights.detach().to(cdtype)  # per occurrence
        tensors = [rows_x, c, mass, f, tau] + [t for t in (n, inv, a, jac, w) if t is not None]
        ctx.save_for_backward(*tensors)
        ctx.layout = (n is not None, inv is not None, a is not None, jac is not None, w is not None)
        ctx.opts, ctx.stats, ctx.rows, ctx.x_dtype = opts, stats, rows, x.dtype
        ctx.mark_non_differentiable(c)
        return x_hat.to(x.dtype), c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x_hat, _grad_c_out):
        saved = _unpack(ctx)
        opts, stats, rows = ctx.opts, ctx.stats, ctx.rows
        grad = grad_x_hat.to(saved.x.dtype)
        grad_rows = grad if saved.inv is None else scatter_rows(grad, saved.inv, saved.x.shape[1])
        v = _output_vjp_c(saved, grad_rows, rows)
        stats.adjoint_passes = 2
        if opts.jfb:
            u = v
        elif saved.jac is not None:
            u = solve_adjoint(dense_matvec(saved.jac), v.double(), opts.adjoint_max_iter, opts.adjoint_tol, stats)
            u = u.to(v.dtype)
        else:
            u = solve_adjoint(lambda w: _fixed_point_vjp_c(saved, w, rows), v, opts.adjoint_max_iter,
                              opts.adjoint_tol, stats)
            stats.adjoint_passes += stats.adjoint_iters
        u_bar = _divide_by_mass(u, saved.mass)
        if saved.inv is None:
            dx = _input_grad(saved, grad_rows, u_bar, rows)
        else:
            dx = _input_grad_uniquified(saved, grad, u_bar, rows)
        return dx.to(ctx.x_dtype), None, None, None, None, None


def _unpack(ctx) -> _Saved:
    tensors = list(ctx.saved_tensors)
    x, c, mass, f, tau = tensors[:5]
    rest = iter(tensors[5:])
    has_n, has_inv, has_a, has_jac, has_w = ctx.layout
    n = next(rest) if has_n else None
    inv = next(rest) if has_inv else None
    a = next(rest) if has_a else None
    jac = next(rest) if has_jac else None
    w = next(rest) if has_w else None
    return _Saved(x, n, inv, c, mass, f, tau, a, jac, w)


def _chunks(saved: _Saved, rows: int):
    return attention_chunks(saved.x, saved.c, saved.tau, rows, saved.a)


def _divide_by_mass(u: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """ubar = u / S, zero for empty clusters (which F leaves unchanged). [g, k, d]."""
    empty = empty_clusters(mass)
    return torch.where(empty.unsqueeze(-1), torch.zeros_like(u), u / torch.where(empty, 1, mass).unsqueeze(-1))


def _logit_vjp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E = d(sum A*B)/dL for A = softmax over k: A * (B - colsum(A * B)). [g, k, r]."""
    return a * (b - (a * b).sum(1, keepdim=True))


def _grad_c(e: torch.Tensor, x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Centroid gradient through the logits: 2/tau (E X - C rowsum(E)). [g, k, d]."""
    return (2 / tau) * (contract_rows(e, x) - c * e.sum(2, keepdim=True))


def _grad_x(e: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Row gradient through the logits: 2/tau E^T C. [g, r, d]."""
    return (2 / tau) * contract_clusters(e, c)


def _fixed_point_b(x: torch.Tensor, n: Optional[torch.Tensor], u_bar: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """B_ji = n_i ubar_j . (x_i - F_j) for the VJP of F. [g, k, r]."""
    b = outer_rows(u_bar, x) - (u_bar * f).sum(-1, keepdim=True)
    return b if n is None else b * n.unsqueeze(1)


def _output_vjp_c(saved: _Saved, grad_rows: torch.Tensor, rows: int) -> torch.Tensor:
    """v = (dO/dC)^T G for O = A(C) C. [g, k, d]."""
    c, tau = saved.c, saved.tau
    if saved.a is None and fused.use_fused(saved.x, c.shape[1]):
        return fused.output_vjp(saved.x, c, tau, grad_rows, rows, exp_floor(c.dtype))
    v = torch.zeros_like(c)
    for s, a in _chunks(saved, rows):
        gr = grad_rows[:, s]
        e = _logit_vjp(a, outer_rows(c, gr))
        v += _grad_c(e, saved.x[:, s], c, tau) + contract_rows(a, gr)
    return v


def _fixed_point_vjp_c(saved: _Saved, u: torch.Tensor, rows: int) -> torch.Tensor:
    """(dF/dC)^T u at C*, matrix-free (one pass). [g, k, d]."""
    u_bar = _divide_by_mass(u, saved.mass)
    out = torch.zeros_like(saved.c)
    for s, a in _chunks(saved, rows):
        x = saved.x[:, s]
        e = _logit_vjp(a, _fixed_point_b(x, None if saved.n is None else saved.n[:, s], u_bar, saved.f))
        out += _grad_c(e, x, saved.c, saved.tau)
    return out


def _input_grad(saved: _Saved, grad_rows: torch.Tensor, u_bar: torch.Tensor, rows: int) -> torch.Tensor:
    """dX = (dO/dX)^T G + (dF/dX)^T u, row by row. [g, m, d]."""
    if saved.a is None and fused.use_fused(saved.x, saved.c.shape[1]):
        return fused.input_grad(saved.x, saved.n, saved.c, saved.tau, grad_rows, u_bar, saved.f, rows,
                                exp_floor(saved.c.dtype))
    dx = torch.empty_like(saved.x)
    for s, a in _chunks(saved, rows):
        n = None if saved.n is None else saved.n[:, s]  # row weights (no uniquification: one row, one weight)
        b = outer_rows(saved.c, grad_rows[:, s]) + _fixed_point_b(saved.x[:, s], n, u_bar, saved.f)
        pull = contract_clusters(a, u_bar)
        dx[:, s] = _grad_x(_logit_vjp(a, b), saved.c, saved.tau) + (pull if n is None else pull * n.unsqueeze(-1))
    return dx


def _input_grad_uniquified(saved: _Saved, grad: torch.Tensor, u_bar: torch.Tensor, rows: int) -> torch.Tensor:
    """dX_i = J(x_i) G_i + q(x_i), with J and q computed once per distinct row. [g, m, d].

    J(x) = 2/tau sum_j A_j (c_j - x~)(c_j - x~)^T is the output Jacobian (symmetric),
    q(x) the fixed-point term for one occurrence of x (times the occurrence's weight in a weighted clustering).
    """
    g, r, d = saved.x.shape
    if saved.a is None and fused.use_fused(saved.x, saved.c.shape[1]):
        # input_grad is linear in (G, u): G = 1, u = 0 gives J(x) (its E sums to J's spread), G = 0 gives q(x)
        ones, zeros = torch.ones_like(saved.x), torch.zeros_like(saved.x)
        jac = fused.input_grad(saved.x, None, saved.c, saved.tau, ones, torch.zeros_like(u_bar), saved.f, rows,
                               exp_floor(saved.c.dtype))
        q = fused.input_grad(saved.x, None, saved.c, saved.tau, zeros, u_bar, saved.f, rows, exp_floor(saved.c.dtype))
        q_rows = gather_rows(q, saved.inv)
        if saved.w is not None:
            q_rows = q_rows * saved.w.unsqueeze(-1)
        return torch.addcmul(q_rows, gather_rows(jac, saved.inv), grad)
    jac = torch.empty(g, r, d, d, dtype=saved.x.dtype, device=saved.x.device)
    q = torch.empty_like(saved.x)
    two_over_tau = 2 / saved.tau
    for s, a in _chunks(saved, rows):
        x_hat = contract_clusters(a, saved.c)  # [g, rows, d]
        if d == 1:
            spread = (saved.c - x_hat.transpose(1, 2)).square_().mul_(a).sum(1)  # [g, rows]
            jac[:, s] = (two_over_tau.view(g, 1) * spread).view(g, -1, 1, 1)
        else:
            delta = saved.c.unsqueeze(2) - x_hat.unsqueeze(1)  # [g, k, rows, d]
            jac[:, s] = two_over_tau.unsqueeze(-1) * torch.einsum("gkr,gkrd,gkre->grde", a, delta, delta)
        e = _logit_vjp(a, _fixed_point_b(saved.x[:, s], None, u_bar, saved.f))
        q[:, s] = _grad_x(e, saved.c, saved.tau) + contract_clusters(a, u_bar)
    q_rows = gather_rows(q, saved.inv)
    if saved.w is not None:
        q_rows = q_rows * saved.w.unsqueeze(-1)
    if d == 1:
        return torch.addcmul(q_rows, gather_rows(jac.view(g, r, 1), saved.inv), grad)
    jac_rows = gather_rows(jac.flatten(2), saved.inv).unflatten(2, (d, d))  # [g, m, d, d]
    return torch.einsum("gmde,gme->gmd", jac_rows, grad) + q_rows


def implicit_soft_kmeans(x: torch.Tensor, c0: torch.Tensor, tau: torch.Tensor, opts: SolveOptions,
                         stats: SolveStats, weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-function form of ImplicitSoftKMeans (x [g, m, d], c0 [g, k, d], tau [g, 1, 1], weights [g, m])."""
    return ImplicitSoftKMeans.apply(x, c0, tau, opts, stats, weights)
