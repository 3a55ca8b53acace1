"""Tiny MNIST models and helpers shared by the torch.ao integration tests."""
from __future__ import annotations

import os

import torch
from qat_helpers import train
from torch import nn


class MnistNet(nn.Module):
    """Conv2d+BN+ReLU, depthwise Conv2d, Conv1d with an Embedding (positions), Linear.

    x [n, 1, 28, 28] -> logits [n, 10].
    """

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, bias=not bn)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.emb = nn.Embedding(36, 8)
        self.fc = nn.Linear(8 * 36, 10)
        self.register_buffer("pos", torch.arange(36), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = torch.relu(self.dw(x)).flatten(2)            # [n, 8, 36]
        x = self.conv1d(x + self.emb(self.pos).t())      # [n, 8, 36]
        return self.fc(x.flatten(1))


def fused(model: MnistNet) -> MnistNet:
    """fuse_modules_qat of conv (+bn) + relu, in place."""
    from torch.ao.quantization import fuse_modules_qat

    names = ["conv", "bn", "relu"] if isinstance(model.bn, nn.BatchNorm2d) else ["conv", "relu"]
    return fuse_modules_qat(model.train(), [names], inplace=True)


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One rank of the DDP test: eager QAT of a fused MnistNet for 20 steps on its own data shard."""
    import torch.distributed as dist
    from torch.ao.quantization import prepare_qat
    from torch.nn.parallel import DistributedDataParallel

    from idkm_plugin import ClusterConfig
    from idkm_plugin.integrations.torch_ao import assign_qconfigs, qat_module_mapping

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial weights on every rank
        model = fused(MnistNet())
        assign_qconfigs(model, ClusterConfig(method="idkm", bits=2, max_iter=10), mapping=qat_module_mapping())
        qat = prepare_qat(model, mapping=qat_module_mapping())
        ddp = DistributedDataParallel(qat)
        shard = slice(rank * 32 * 20, (rank + 1) * 32 * 20)
        train(ddp, x[shard], y[shard], steps=20, batch=32)
        state = {k: v for k, v in qat.state_dict().items() if k.endswith("centroids") or k.endswith("weight")}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
