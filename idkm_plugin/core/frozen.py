"""Soft assignment to a frozen LUT: X~ = A(C, X) C with C fixed, differentiable w.r.t. X only.

Used once the LUT is frozen (torch.ao's `disable_observer`, or `freeze_lut` in any toolkit): the
weights keep training against fixed centroids. Computed in row chunks that the backward recomputes,
so autograd holds only X, C and tau.
"""
from __future__ import annotations

from typing import Optional

import torch

from .soft_step import as_tau, attention, chunk_rows, compute_dtype, row_chunks


class FrozenSoftAssign(torch.autograd.Function):
    """(x [g, m, d], c [g, k, d] no grad, tau [g, 1, 1], rows) -> x_hat [g, m, d]."""

    @staticmethod
    def forward(ctx, x, c, tau, rows: int):
        x_hat = torch.empty_like(x)
        for s in row_chunks(x.shape[1], rows):
            x_hat[:, s] = torch.bmm(attention(x[:, s], c, tau), c)
        ctx.save_for_backward(x, c, tau)
        ctx.rows = rows
        return x_hat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, c, tau = ctx.saved_tensors
        dx = torch.empty_like(x)
        for s in row_chunks(x.shape[1], ctx.rows):
            a = attention(x[:, s], c, tau)
            b = torch.bmm(grad[:, s], c.transpose(1, 2))  # B_ij = g_i . c_j
            e = a * (b - (a * b).sum(-1, keepdim=True))  # d(sum A*B)/dL
            dx[:, s] = (2 / tau) * torch.bmm(e, c)
        return dx, None, None, None


def frozen_soft_assign(x: torch.Tensor, c: torch.Tensor, *, tau: float | torch.Tensor | None = None,
                       chunk_size: Optional[int] = None) -> torch.Tensor:
    """x [g, m, d] (any float dtype), frozen centroids c [g, k, d] -> A(C, x) C [g, m, d] in x's dtype.

    tau: temperature (None: the weight-derived default); chunk_size: rows per chunk (None or 0: automatic).
    """
    cdtype = compute_dtype(x.dtype)
    xc, cc = x.to(cdtype), c.detach().to(cdtype)
    tau3 = as_tau(tau, xc.detach(), cc.shape[1])
    rows = chunk_rows(chunk_size or None, *xc.shape[:2], cc.shape[1], xc.shape[2])
    return FrozenSoftAssign.apply(xc, cc, tau3, rows).to(x.dtype)
