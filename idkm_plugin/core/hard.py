"""Hard nearest-centroid assignment, for conversion and eval-mode fake quantization."""
from __future__ import annotations

import torch

from .soft_step import chunk_rows, row_chunks, squared_distances


def hard_assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [g, m, d], c [g, k, d] -> codes [g, m] (int64) of the nearest centroid, in row chunks."""
    x, c = x.detach(), c.detach().to(x.dtype)
    g, m, d = x.shape
    codes = torch.empty(g, m, dtype=torch.long, device=x.device)
    for s in row_chunks(m, chunk_rows(None, g, m, c.shape[1], d)):
        codes[:, s] = squared_distances(x[:, s], c).argmin(-1)
    return codes


def lookup(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """codes [g, m], lut [g, k, d] -> vectors [g, m, d]."""
    return torch.gather(lut, 1, codes.unsqueeze(-1).expand(-1, -1, lut.shape[-1]))
