"""The native ops (`torch.ops.idkm_plugin.*`, C++ in idkm_plugin/csrc/, built by the package build).

`available()` imports the extension once; where it was not built (no compiler, or a build without torch), it
warns once and every caller takes its PyTorch path.
"""
from __future__ import annotations

import functools
import warnings

__all__ = ["available", "has_op"]


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True if `idkm_plugin._C` is importable (its ops are then registered in torch.ops.idkm_plugin)."""
    try:
        from . import _C  # noqa: F401
    except ImportError as err:
        warnings.warn(f"idkm_plugin: the native ops are not built ({err}); using the PyTorch paths "
                      "(reinstall with a C++ compiler and `pip install --no-build-isolation` to build them)",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def has_op(name: str) -> bool:
    """True if the native op `torch.ops.idkm_plugin.<name>` is registered."""
    import torch

    return available() and hasattr(torch.ops.idkm_plugin, name)
