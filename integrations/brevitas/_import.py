"""Import Brevitas with an install hint when it is missing."""
from __future__ import annotations

from types import ModuleType


def import_brevitas() -> ModuleType:
    try:
        import brevitas
        import brevitas.nn  # noqa: F401
    except ImportError as err:
        raise ImportError("idkm_plugin.integrations.brevitas needs Brevitas: "
                          "pip install 'idkm-plugin[brevitas]'") from err
    return brevitas
