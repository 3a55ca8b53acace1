"""Fused chunk kernels for scalar weights (d = 1): the attention and everything computed from it in one pass.

The eager chunk code (core.kernel, core.implicit) makes ~9 passes over a [g, k, rows] tensor per attention
and ~25 more in the backward; with many LUT groups (an LLM's 16-row groups: 3,072 LUTs on SmolLM2's
embedding) the per-weight work is what a step costs. Compiled with torch.compile (Inductor), the same
functions run as a few fused loops: one thread, 3,072 groups x 16 centroids x 168 rows, the input-gradient
chunk takes 19 ms against 175 ms eager.

The functions below are the definitions; `call` runs them compiled when the problem is large enough to
repay the one-time compilation (~15 s per function, shapes are dynamic) and eagerly otherwise, so the
compiled path computes exactly what the eager one does (up to float rounding order). Any failure to
compile (no C++ compiler, an unsupported platform) warns once and stays eager. IDKM_FUSED=0 turns the
compiled path off, IDKM_FUSED=1 uses it at any size.

Shapes: xt [g, 1, r] rows (transposed), nt [g, 1, r] row weights or None, c [g, k, 1] centroids,
tau [g, 1, 1], grt [g, 1, r] gradients of the output rows, u_bar / f [g, k, 1].
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

FUSED_MIN_ELEMENTS = 1 << 22  # g * r * k at or above which a solve / backward uses the compiled kernels

_compiled: dict = {}
_failed = False


def use_fused(x: torch.Tensor, k: int) -> bool:
    """Whether the rows x [g, r, d] of a clustering with k centroids take the compiled kernels."""
    mode = os.environ.get("IDKM_FUSED", "auto")
    if _failed or mode == "0" or x.shape[-1] != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return False  # inside a user's torch.compile the surrounding graph is compiled anyway
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
    """dX rows [g, 1, r] = (dO/dX)^T G + (dF/dX)^T u (implicit._input_grad)."""
    a = _attention(xt, c, tau, floor)
    fixed = u_bar * xt - (u_bar * f)
    if nt is not None:
        fixed = fixed * nt
    b = c * grt + fixed
    e = a * (b - (a * b).sum(1, keepdim=True))
    pull = (a * u_bar).sum(1, keepdim=True)
    return (2 / tau) * (e * c).sum(1, keepdim=True) + (pull if nt is None else pull * nt)
