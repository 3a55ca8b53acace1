"""Pure tensor math of differentiable k-means clustering (imports torch only)."""
from .hard import hard_assign, lookup
from .init import init_centroids, init_centroids_masked
from .prune import magnitude_mask, num_pruned
from .soft_kmeans import soft_kmeans, uniquify_mode, use_uniquify
from .soft_step import attention, compute_dtype, default_tau, soft_step
from .stats import SolveStats
from .vectors import from_vectors, to_vectors, vector_shape

__all__ = ["SolveStats", "attention", "compute_dtype", "default_tau", "from_vectors", "hard_assign",
           "init_centroids", "init_centroids_masked", "lookup", "magnitude_mask", "num_pruned", "soft_kmeans",
           "soft_step", "to_vectors", "uniquify_mode", "use_uniquify", "vector_shape"]
