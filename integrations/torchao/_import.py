"""Import torchao quietly: on CPU it logs a harmless "Failed to load ... .so" per CUDA extension."""
from __future__ import annotations

from types import ModuleType

from idkm_plugin.quiet import quiet_imports

def import_torchao() -> ModuleType:
    """`import torchao` (and its quantization API) with its import-time warnings silenced.

    Raises ImportError with an install hint when torchao is missing.
    """
    try:
        with quiet_imports():
            import torchao
            import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise ImportError("idkm_plugin.integrations.torchao needs torchao: pip install 'idkm-plugin[torchao]'") from err
    return torchao
