"""Import torchao quietly: on CPU it logs a harmless "Failed to load ... .so" per CUDA extension."""
from __future__ import annotations

import contextlib
import logging
from types import ModuleType
from typing import Iterator

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_loggers(names: tuple[str, ...] = _NOISY_LOGGERS) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_torchao() -> ModuleType:
    """`import torchao` (and its quantization API) with its import-time warnings silenced.

    Raises ImportError with an install hint when torchao is missing.
    """
    try:
        with _quiet_loggers():
            import torchao
            import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise ImportError("idkm_plugin.integrations.torchao needs torchao: pip install 'idkm-plugin[torchao]'") from err
    return torchao
