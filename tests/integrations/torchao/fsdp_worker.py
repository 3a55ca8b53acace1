"""The FSDP2 test's worker (a module of its own so that `torch.multiprocessing.spawn` can pickle it)."""
import os

import torch
import torch.nn.functional as F
from torch import nn


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def data(steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, 16, generator=gen), torch.randint(0, 8, (steps, batch), generator=gen)


def prepared(config) -> nn.Module:
    from torchao.quantization import quantize_

    from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable

    model = tiny_mlp()
    quantize_(model, IDKMQATConfig(config), filter_fn=clusterable)
    return model


def result(model: nn.Module, full_weight) -> dict[str, torch.Tensor]:
    """Every layer's LUT and hard codes of its (full) weight."""
    out = {}
    for i in (0, 2):
        clusterer = model[i].weight_clusterer
        codes, lut = clusterer.codes_and_lut(full_weight(model[i].weight))
        out[f"{i}.lut"], out[f"{i}.codes"] = lut, codes
    return out


def train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def single_process(config, steps: int, batch: int) -> dict[str, torch.Tensor]:
    model = prepared(config)
    train(model, *data(steps, batch))
    return result(model, lambda w: w.detach())


def fsdp_worker(rank: int, world: int, init_file: str, out_dir: str, config, steps: int, batch: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = prepared(config)
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        xs, ys = data(steps, batch)
        share = batch // world  # each rank its slice of the same global batch
        train(model, xs[:, rank * share:(rank + 1) * share], ys[:, rank * share:(rank + 1) * share])
        out = result(model, lambda w: w.full_tensor().detach())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
