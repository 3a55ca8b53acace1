"""Pure tensor math of differentiable k-means clustering (imports torch only)."""
from .hard import hard_assign, lookup
from .implicit import SolveStats
from .init import init_centroids
from .soft_kmeans import soft_kmeans, use_uniquify
from .soft_step import attention, compute_dtype, default_tau, soft_step
from .vectors import from_vectors, to_vectors, vector_shape

__all__ = ["SolveStats", "attention", "compute_dtype", "default_tau", "from_vectors", "hard_assign",
           "init_centroids", "lookup", "soft_kmeans", "soft_step", "to_vectors", "use_uniquify", "vector_shape"]
