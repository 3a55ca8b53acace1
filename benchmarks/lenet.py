"""LeNet-300-100 and LeNet-5 (Caffe layout) for the Deep Compression benchmark, trained from scratch on MNIST.

The float models are trained once per seed and cached (``~/.cache/idkm_plugin/lenet/<name>-seed<k>.pt``).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin.workloads.mnist import evaluate, load_mnist

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "idkm_plugin", "lenet")


class LeNet300(nn.Module):
    """LeNet-300-100: 784 -> 300 -> 100 -> 10 (266,200 weights + 410 biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, 1, 28, 28] -> logits [n, 10]
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv 20@5x5, max-pool, conv 50@5x5, max-pool, fc 500, fc 10 (430,500 weights + 580 biases).

    (ReLU after the convolutions too; Caffe's prototxt has it after fc 500 only. The weights are the same.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, 1, 28, 28] -> logits [n, 10]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


NETS = {"lenet300": LeNet300, "lenet5": LeNet5}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: float, lr: float, batch_size: int = 128,
          seed: int = 0, after_step=None, desc: str = "train", params=None) -> float:
    """Adam with a cosine learning-rate decay over `epochs` passes of (x, y); returns seconds.

    after_step(model) runs after every optimizer step (e.g. to re-apply a pruning mask).
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    per_epoch = len(y) // batch_size
    steps = max(1, int(epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    start, order, pos = time.perf_counter(), torch.randperm(len(y), generator=gen), 0
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=2)
    for _ in bar:
        if pos + batch_size > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(model)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return time.perf_counter() - start


FLOAT_EPOCHS = {"lenet300": 20, "lenet5": 8}
QUICK_IMAGES = 2048  # a smoke run's float model: one epoch of this many training images, not cached


def float_model(name: str, seed: int = 0, quick: bool = False) -> nn.Module:
    """The float `name` network trained from scratch on the 50k MNIST training images (cached); `quick`: one
    epoch of the first QUICK_IMAGES, not cached (for a smoke run)."""
    torch.manual_seed(seed)
    model = NETS[name]()
    if quick:
        train(model, *load_mnist("train", QUICK_IMAGES), epochs=1, lr=1e-3, seed=seed, desc=f"{name} float (quick)")
        return model.eval()
    epochs = FLOAT_EPOCHS[name]
    path = os.path.join(CACHE, f"{name}-seed{seed}-e{epochs:g}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    x, y = load_mnist("train")
    seconds = train(model, x, y, epochs=epochs, lr=1e-3, seed=seed, desc=f"{name} float")
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    print(f"{name}: trained {epochs:g} epochs in {seconds:.0f} s, test error "
          f"{100 - evaluate(model, *load_mnist('test')):.2f}%")
    return model.eval()
