"""Fused kernels for scalar weights (d = 1): the attention and everything computed from it in one pass.

The eager chunk code (core.kernel, core.implicit) makes ~9 passes over a [g, k, rows] tensor per attention
and ~25 more in the backward; with many LUT groups (an LLM's 16-row groups: 3,072 LUTs on SmolLM2's
embedding) the per-weight work is what a step costs. Two fused backends compute the same functions:
- native: the C++ ops `torch.ops.idkm_plugin.soft_kmeans_*` (csrc/soft_kmeans.cpp), one pass over the whole
  problem with no [g, k, r] intermediate. One thread, AVX-512, 3,072 groups x 16 centroids x 200 rows:
  0.31-0.36 ns per (row, centroid) pair (3.1-3.6 ms a pass); its portable scalar path ~5 ns;
- compiled: the chunk functions below through torch.compile (Inductor), where the native ops are not built:
  3.1-5.5 ns per pair (eager: 16-34 ns). Compiled once per process (~15 s per function, dynamic shapes);
  a failure to compile warns once and stays eager.

`map_sums`, `output_vjp` and `input_grad` take the whole problem and pick the backend (`use_fused`): the native
ops for every problem with several LUT groups; otherwise (one LUT, or no native build) only problems large enough
to repay a compilation, so a small per-tensor clustering keeps the eager code's rounding order. IDKM_FUSED=0
turns the fused path off, IDKM_FUSED=1 uses it at any size.

Chunk shapes: xt [g, 1, r] rows (transposed), nt [g, 1, r] row weights or None, c [g, k, 1] centroids,
tau [g, 1, 1], grt [g, 1, r] gradients of the output rows, u_bar / f [g, k, 1].
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from .. import native
from .soft_step import row_chunks

FUSED_MIN_ELEMENTS = 1 << 22  # g * r * k at or above which a solve / backward uses the fused kernels
USE_NATIVE = True  # False: the compiled backend even where the native ops are built (tests compare the two)

_compiled: dict = {}
_failed = False


def use_fused(x: torch.Tensor, k: int) -> bool:
    """Whether the rows x [g, r, d] of a clustering with k centroids take the fused kernels."""
    mode = os.environ.get("IDKM_FUSED", "auto")
    if _failed or mode == "0" or x.shape[-1] != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return False  # inside a user's torch.compile the surrounding graph is compiled anyway
    if _native_ops() is not None and x.shape[0] > 1:
        return True  # no compilation to repay: faster than the eager chunks at every size
    # one LUT below the size bar keeps the eager rounding order: the tiny 2-bit Brevitas MNIST training
    # (tests/integrations/brevitas) is sensitive to it (see kernel.contract_rows)
    return mode == "1" or x.shape[0] * x.shape[1] * k >= FUSED_MIN_ELEMENTS


def call(fn: Callable, *args):
    """fn(*args), compiled (dynamic shapes, compiled once per function); eager if compiling fails."""
    global _failed
    if not _failed:
        try:
            compiled = _compiled.get(fn)
            if compiled is None:
                compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
            # compile in this process: Inductor's worker pool re-imports __main__, which runs an unguarded script
            from torch._inductor import config as inductor_config
            with inductor_config.patch(compile_threads=1):
                return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same eager code
            _failed = True
            warnings.warn(f"idkm_plugin: fused clustering kernels unavailable ({type(err).__name__}: {err}); "
                          "using the eager path", RuntimeWarning, stacklevel=2)
    return fn(*args)


def columns(rows: Optional[torch.Tensor], s: slice) -> Optional[torch.Tensor]:
    """Rows s of x [g, r, 1] or of row weights [g, r] in the kernels' [g, 1, rows] layout (None stays None)."""
    if rows is None:
        return None
    return rows[:, s].transpose(1, 2) if rows.dim() == 3 else rows[:, s].unsqueeze(1)


def _attention(xt: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, floor: float) -> torch.Tensor:
    """A^T [g, k, r]: softmax over k of -(x - c)^2 / tau, shifted logits floored at `floor` (kernel.shifted_exp)."""
    d2 = (xt - c).square()
    e = ((d2 - d2.amin(1, keepdim=True)) * (-1 / tau)).clamp_min(floor).exp()
    return e / e.sum(1, keepdim=True)


def map_sums_chunk(xt: torch.Tensor, nt: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
                   floor: float) -> torch.Tensor:
    """[g, k, 2]: (sum_i n_i A_ij x_i, sum_i n_i A_ij) over the chunk's rows."""
    a = _attention(xt, c, tau, floor)
    if nt is not None:
        a = a * nt
    return torch.stack([(a * xt).sum(2), a.sum(2)], -1)


def map_sums_output_chunk(xt: torch.Tensor, nt: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
                          floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """map_sums_chunk and the output rows A(C) C [g, 1, r]."""
    a = _attention(xt, c, tau, floor)
    x_hat = (a * c).sum(1, keepdim=True)
    if nt is not None:
        a = a * nt
    return torch.stack([(a * xt).sum(2), a.sum(2)], -1), x_hat


def output_vjp_chunk(xt: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, grt: torch.Tensor,
                     floor: float) -> torch.Tensor:
    """The chunk's part of v = (dO/dC)^T G for O = A(C) C (implicit._output_vjp_c). [g, k, 1]."""
    a = _attention(xt, c, tau, floor)
    b = c * grt
    e = a * (b - (a * b).sum(1, keepdim=True))
    return (2 / tau) * ((e * xt).sum(2, keepdim=True) - c * e.sum(2, keepdim=True)) + (a * grt).sum(2, keepdim=True)


def input_grad_chunk(xt: torch.Tensor, nt: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
                     grt: torch.Tensor, u_bar: torch.Tensor, f: torch.Tensor, floor: float) -> torch.Tensor:
    """dX rows [g, 1, r] = (dO/dX)^T G + (dF/dX)^T u (implicit._input_grad).

    The logit term 2/tau sum_j E_j c_j is taken as 2/tau sum_j E_j (c_j - x_hat) (equal: sum_j E_j = 0), so that
    G = 1, u = 0 gives the output Jacobian 2/tau sum_j A_j (c_j - x_hat)^2 without cancellation."""
    a = _attention(xt, c, tau, floor)
    fixed = u_bar * xt - (u_bar * f)
    if nt is not None:
        fixed = fixed * nt
    b = c * grt + fixed
    e = a * (b - (a * b).sum(1, keepdim=True))
    pull = (a * u_bar).sum(1, keepdim=True)
    x_hat = (a * c).sum(1, keepdim=True)
    return (2 / tau) * (e * (c - x_hat)).sum(1, keepdim=True) + (pull if nt is None else pull * nt)


# ---- whole problems: x [g, r, 1], n [g, r] or None, c [g, k, 1], tau [g, 1, 1], grad_rows [g, r, 1] ----------

def _native_ops():
    """torch.ops.idkm_plugin where the soft k-means ops are built (and USE_NATIVE), else None."""
    return torch.ops.idkm_plugin if USE_NATIVE and native.has_op("soft_kmeans_sums") else None


def _flat(t: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """[g, rows] float32 contiguous view / copy of a [g, rows, ...] tensor (None stays None)."""
    return None if t is None else t.reshape(t.shape[0], rows).to(torch.float32).contiguous()


def map_sums(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor, rows: int,
             floor: float, with_output: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(sums [g, k, 2] float64: sum_i n_i A_ij x_i and sum_i n_i A_ij; the output rows A(C) C [g, r, 1] or None)."""
    g, r, _ = x.shape
    k = c.shape[1]
    ops = _native_ops()
    if ops is not None:
        sums, x_hat = ops.soft_kmeans_sums(_flat(x, r), _flat(n, r), _flat(c, k), _flat(tau, 1), floor, with_output)
        return sums, (x_hat.view(g, r, 1) if with_output else None)
    acc = torch.zeros(g, k, 2, dtype=torch.float64, device=x.device)
    x_hat = torch.empty_like(x) if with_output else None
    for s in row_chunks(r, rows):
        if with_output:
            part, x_hat_t = call(map_sums_output_chunk, columns(x, s), columns(n, s), c, tau, floor)
            x_hat[:, s] = x_hat_t.transpose(1, 2)
        else:
            part = call(map_sums_chunk, columns(x, s), columns(n, s), c, tau, floor)
        acc += part
    return acc, x_hat


def output_vjp(x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, grad_rows: torch.Tensor, rows: int,
               floor: float) -> torch.Tensor:
    """v = (dO/dC)^T G for O = A(C) C, [g, k, 1] (output_vjp_chunk over all rows)."""
    g, r, _ = x.shape
    k = c.shape[1]
    ops = _native_ops()
    if ops is not None:
        v = ops.soft_kmeans_output_vjp(_flat(x, r), _flat(c, k), _flat(tau, 1), _flat(grad_rows, r), floor)
        return v.view(g, k, 1).to(c.dtype)
    v = torch.zeros_like(c)
    for s in row_chunks(r, rows):
        v += call(output_vjp_chunk, columns(x, s), c, tau, columns(grad_rows, s), floor)
    return v


def input_grad(x: torch.Tensor, n: Optional[torch.Tensor], c: torch.Tensor, tau: torch.Tensor,
               grad_rows: torch.Tensor, u_bar: torch.Tensor, f: torch.Tensor, rows: int, floor: float) -> torch.Tensor:
    """dX [g, r, 1] = (dO/dX)^T G + (dF/dX)^T u (input_grad_chunk over all rows)."""
    g, r, _ = x.shape
    k = c.shape[1]
    ops = _native_ops()
    if ops is not None:
        dx = ops.soft_kmeans_input_grad(_flat(x, r), _flat(n, r), _flat(c, k), _flat(tau, 1), _flat(grad_rows, r),
                                        _flat(u_bar, k), _flat(f, k), floor)
        return dx.view(g, r, 1).to(x.dtype)
    dx = torch.empty_like(x)
    for s in row_chunks(r, rows):
        dx[:, s] = call(input_grad_chunk, columns(x, s), columns(n, s), c, tau, columns(grad_rows, s), u_bar, f,
                        floor).transpose(1, 2)
    return dx
