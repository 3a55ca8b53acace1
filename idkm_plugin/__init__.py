"""idkm_plugin: differentiable k-means weight clustering (DKM, IDKM, IDKM-JFB) for QAT toolkits."""
from .config import ClusterConfig, Granularity, Init, Method, ModelConfig, Solver, Uniquify
from .core import SolveStats, soft_kmeans
from .selection import plan

__version__ = "0.1.0"
__all__ = ["ClusterConfig", "Granularity", "Init", "Method", "ModelConfig", "SolveStats", "Solver", "Uniquify",
           "plan", "soft_kmeans", "__version__"]
