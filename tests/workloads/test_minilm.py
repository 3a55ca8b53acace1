"""idkm_plugin.workloads.minilm: the rank correlation and the embedding metrics (torch only, no model needed)."""
import pytest
import torch

from idkm_plugin.workloads.minilm import embedding_metrics, ranks, spearman


def test_spearman_hand_checked_and_with_ties():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert ranks(torch.tensor([3.0, 1, 1, 2])).tolist() == [3.0, 0.5, 0.5, 2.0]
    # with ties: Pearson of the average ranks, by hand: ranks a = [0, 1.5, 1.5, 3], b = [0, 1, 2, 3]
    a, b = torch.tensor([0.1, 0.5, 0.5, 0.9]), torch.tensor([1.0, 2, 3, 4])
    ra, rb = torch.tensor([-1.5, 0, 0, 1.5]), torch.tensor([-1.5, -0.5, 0.5, 1.5])
    assert spearman(a, b) == pytest.approx(float((ra @ rb) / (ra.norm() * rb.norm())))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    b = a + torch.randn(300, generator=g) * 5
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_embedding_metrics():
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    same = embedding_metrics(t, t)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["p5_cosine"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    s = torch.nn.functional.normalize(t + 0.3 * torch.randn(20, 8, generator=g), dim=1)
    got = embedding_metrics(s, t)
    cos = (s * t).sum(1)
    assert got["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert got["p5_cosine"] == pytest.approx(float(torch.quantile(cos.double(), 0.05)), abs=1e-6)
    i, j = torch.triu_indices(20, 20, 1)
    assert got["spearman"] == pytest.approx(spearman((s @ s.T)[i, j], (t @ t.T)[i, j]))
    assert 0 < got["spearman"] < 1
