"""benchmarks/minilm_embedding_bits.py: its k-means settings on a small random matrix (the MiniLM run itself is a
benchmark, not a test)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import minilm_embedding_bits as meb  # noqa: E402


@pytest.fixture
def weight():
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("d, k", [(1, 2), (2, 4), (4, 16)])
def test_at_most_k_distinct_vectors_and_the_bits(weight, d, k):
    q, bits = meb.quantize(weight, f"{d},{k}", torch.zeros(64), iters=10)
    assert q.shape == weight.shape and bits == math.log2(k) / d
    assert len(torch.unique(q.reshape(-1, d), dim=0)) <= k
    assert (q - weight).norm() < weight.norm()  # nearest centroids, not noise


def test_one_lut_per_block_of_rows(weight):
    q, _ = meb.quantize(weight, "2,4,rows=16", torch.zeros(64), iters=10)
    assert all(len(torch.unique(q[i:i + 16].reshape(-1, 2), dim=0)) <= 4 for i in range(0, 64, 16))
    assert len(torch.unique(q.reshape(-1, 2), dim=0)) > 4


def test_rms_scales_cost_16_bits_per_row(weight):
    q, bits = meb.quantize(weight * torch.linspace(0.1, 10, 64)[:, None], "1,2,rms", torch.zeros(64), iters=10)
    assert bits == 1 + 16 / 16
    assert all(len(torch.unique(row)) <= 2 for row in q)


def test_frequent_tokens_pull_the_centroids(weight):
    counts = torch.zeros(64)
    counts[0] = 1e6
    q, _ = meb.quantize(weight, "16,2,freq", counts, iters=10)
    assert torch.allclose(q[0], weight[0], atol=1e-4)  # a row weighing 1e6 x the others is its own centroid
    with pytest.raises(ValueError, match="unknown variant"):
        meb.quantize(weight, "4,16,bogus", counts, iters=1)


def test_split_clusters_the_most_frequent_rows_with_their_own_setting(weight):
    """split=8:1,4: the 8 most counted rows at 2 bits (4 values among them), the other 56 as 4-vectors x 2."""
    counts = torch.zeros(64)
    counts[torch.arange(8) * 7] = torch.arange(8, 0, -1).float()
    q, bits = meb.quantize(weight, "4,2,split=8:1,4", counts, iters=10)
    frequent = torch.arange(8) * 7
    rare = torch.ones(64, dtype=torch.bool)
    rare[frequent] = False
    assert len(torch.unique(q[frequent])) <= 4
    assert len(torch.unique(q[rare].reshape(-1, 4), dim=0)) <= 2
    assert bits == (8 * 2 + 56 * 0.25 + 16 * 8 / 16) / 64
