"""Progress lines for the long exports: one line per stage on stderr, with its time."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["stage"]


@contextmanager
def stage(label: str, progress: bool) -> Iterator[None]:
    """`[label] ...` when the stage starts and `[label] done in S s` when it ends (nothing when not progress)."""
    start = time.perf_counter()
    if progress:
        print(f"[{label}] ...", file=sys.stderr, flush=True)
    yield
    if progress:
        print(f"[{label}] done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
