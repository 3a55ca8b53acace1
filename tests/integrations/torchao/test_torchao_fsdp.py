"""FSDP2 (`fully_shard`, gloo, 2 CPU ranks) through the torchao flow: every rank ends with identical LUTs and codes,
equal to one process training on the same global batch (dkm, whose step is a plain autograd function).

On GPUs the same code runs under `torchrun --nproc_per_node N` with the "nccl" backend (see docs/llm.md).
"""
import pytest
import torch

pytest.importorskip("torchao")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from fsdp_worker import fsdp_worker, single_process  # noqa: E402
from idkm_plugin import ClusterConfig  # noqa: E402

STEPS, BATCH = 4, 8


@pytest.mark.parametrize("method", ["dkm", "idkm_jfb"])
def test_fsdp2_ranks_agree_and_match_one_process(tmp_path, method):
    config = ClusterConfig(method=method, bits=2, max_iter=4)
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), config, STEPS, BATCH), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # every rank: the same LUTs and codes, bit for bit
    if method != "dkm":
        return
    single = single_process(config, STEPS, BATCH)
    for key, value in single.items():
        if key.endswith(".codes"):
            assert torch.equal(r0[key], value), key
        else:  # the ranks' gradients are summed in another order than one process sums its batch
            torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-6)
