"""String enums of the clustering options (re-exported by idkm_plugin.config)."""
import enum


class Method(str, enum.Enum):
    """How the clustering is differentiated."""

    DKM = "dkm"  # unrolled soft k-means under autograd
    IDKM = "idkm"  # implicit function theorem at the fixed point
    IDKM_JFB = "idkm_jfb"  # Jacobian-free backprop: one VJP at the fixed point


class Init(str, enum.Enum):
    """Centroid initialisation (Deep Compression's three plus k-means++)."""

    KMEANS_PP = "kmeans++"
    LINEAR = "linear"
    DENSITY = "density"
    RANDOM = "random"


class Uniquify(str, enum.Enum):
    """eDKM weight uniquification: cluster distinct values weighted by their counts."""

    AUTO = "auto"  # see core.soft_kmeans.use_uniquify
    ON = "on"  # exact: the distinct values of the weight
    OFF = "off"
    GRID = "grid"  # float32 d = 1: round to a 16-bit grid for the clustering (straight-through)


class Solver(str, enum.Enum):
    """Fixed-point solver of the implicit methods (dkm always iterates plainly)."""

    ANDERSON = "anderson"  # safeguarded Anderson acceleration
    PICARD = "picard"  # plain iteration C <- F(C)
