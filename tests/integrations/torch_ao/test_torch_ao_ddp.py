"""QAT under DistributedDataParallel (gloo, 2 CPU processes): the centroids agree on every rank."""
import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from mnist_data import mnist  # noqa: E402
from torch_ao_models import ddp_worker  # noqa: E402


def test_ddp_two_ranks_keep_identical_centroids(tmp_path):
    x, y = mnist("train", 2 * 32 * 20)  # each rank trains 20 steps on its own shard
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), x, y), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    centroids = [k for k in r0 if k.endswith("centroids")]
    assert len(centroids) == 5 and all(r0[k].numel() == 4 for k in centroids)
    # the ranks saw different data; gradient averaging keeps the weights, and so the LUTs, identical
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
