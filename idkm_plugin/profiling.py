"""Exact measurement of the memory autograd holds for backward."""
from __future__ import annotations

import torch


class SavedTensorBytes:
    """Context manager: bytes of the unique storages autograd saves for backward inside it.

    Deterministic (counts storages, not allocator state), so it can be asserted in tests.

        with SavedTensorBytes() as saved:
            loss = model(x).sum()
        saved.bytes  # held until loss.backward()
    """

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
