"""`SolveStats`: what the last forward and backward solve of one clustering did (filled in place)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class SolveStats:
    """Iteration counts and residuals of the last forward and backward solve.

    forward_iters: accepted solver steps; forward_evals: evaluations of the soft k-means map F
    (the cost: one pass over the weight each), including extrapolations the safeguard rejected;
    forward_rejections: Anderson extrapolations rejected (residual grew, non-finite, or 1-D
    centroid order broken) and replaced by a plain step. Residuals are max |F(C) - C| / max |W|.
    spectral_radius: of dF/dC at C* (idkm, k*d <= 256; NaN otherwise): below 1 the fixed point is
    stable; forward_fallback: Anderson ended at an unstable one and plain iteration was rerun.
    adjoint_iters: GMRES iterations of the idkm adjoint; adjoint_passes: passes over the weight
    the backward made (the output VJP, the explicit Jacobian or each matrix-free product, dX).
    """

    forward_iters: int = 0
    forward_evals: int = 0
    forward_rejections: int = 0
    forward_residual: float = math.nan
    forward_fallback: bool = False
    spectral_radius: float = math.nan
    adjoint_iters: int = 0
    adjoint_passes: int = 0
    adjoint_residual: float = math.nan
    adjoint_converged: Optional[bool] = None
    jfb_fallbacks: int = 0
