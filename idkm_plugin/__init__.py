"""idkm_plugin: differentiable k-means weight clustering (DKM, IDKM, IDKM-JFB) for QAT toolkits.

Names are imported on first use, so that loading a saved model (`idkm_plugin.export`, `idkm_plugin.nn`) imports no
training code.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {"ClusterConfig": ".config", "Granularity": ".config", "Init": ".config", "Method": ".config",
            "ModelConfig": ".config", "Solver": ".config", "Uniquify": ".config", "SolveStats": ".core",
            "soft_kmeans": ".core", "plan": ".selection"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
