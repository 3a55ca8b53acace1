"""Scoped silencing of third-party import noise around our own calls (never global).

torchao logs "Failed to load ... .so" for every CUDA extension on a CPU machine; coremltools logs eight
"Failed to load _ML...Proxy" lines (no macOS runtime here) and version warnings at import. `quiet_imports()`
raises those loggers to ERROR for the duration of a `with` block and restores them after.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["NOISY_LOGGERS", "quiet_imports"]

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "coremltools", "executorch")


@contextlib.contextmanager
def quiet_imports(names: tuple[str, ...] = NOISY_LOGGERS) -> Iterator[None]:
    """Within the block, the named loggers (and their children) only pass errors."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
