"""The windowed 1-D map (core.window) against the dense plain step, and inside soft_kmeans."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import SolveStats, init_centroids, window
from idkm_plugin.core.soft_step import default_tau, soft_step
from idkm_plugin.core.window import sort_rows, window_soft_map


def _problem(g, m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, m, 1, generator=gen, dtype=dtype) * 0.02
    return x, init_centroids(x, k, "kmeans++"), default_tau(x, k)


@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("counts", [False, True])
def test_window_map_equals_the_dense_step_float64(k, counts):
    x, c, tau = _problem(3, 5000, k, torch.float64)
    n = torch.rand(3, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3 if counts else None
    got = window_soft_map(sort_rows(x, n), c, tau)
    torch.testing.assert_close(got, soft_step(x, n, c, tau, 5000), rtol=1e-12, atol=1e-15)


def test_window_map_is_accurate_in_float32_at_8_bits():
    x, c, tau = _problem(1, 200_000, 256, torch.float32)
    exact = soft_step(x.double(), None, c.double(), tau.double(), 200_000)
    got = window_soft_map(sort_rows(x, None), c, tau).double()
    assert (got - exact).abs().max() / exact.abs().max() < 1e-6


def test_window_map_edge_cases():
    """Repeated centroids, empty clusters, centroids beyond the weights, equal weights, a large tau."""
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 5.0]], dtype=torch.float64).unsqueeze(-1)
    c = torch.linspace(-3, 8, 64, dtype=torch.float64).view(1, 64, 1)
    c[0, 10:14] = 1.0  # four equal centroids
    for t in (1e-3, 0.3, 100.0):  # hard, medium, and soft enough for the dense fallback
        tau = torch.tensor(t, dtype=torch.float64).view(1, 1, 1)
        torch.testing.assert_close(window_soft_map(sort_rows(x, None), c, tau), soft_step(x, None, c, tau, 7),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["idkm", "idkm_jfb"])
def test_soft_kmeans_with_the_window_matches_the_dense_kernel(method, monkeypatch):
    # 64 separated modes: a stable fixed point that both kernels reach (on a saddle, ~1e-16 differences of
    # the map grow over the iterations)
    gen = torch.Generator().manual_seed(3)
    modes = torch.randint(0, 64, (1, 20_000, 1), generator=gen).double()
    x = (modes + 0.15 * torch.randn(1, 20_000, 1, generator=gen, dtype=torch.float64)) * 0.01
    c0 = ((torch.arange(64, dtype=torch.float64) + 0.2 * torch.rand(64, generator=gen, dtype=torch.float64)) * 0.01
          ).view(1, 64, 1)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def run():
        xg = x.clone().requires_grad_()
        stats = SolveStats()
        out, c = soft_kmeans(xg, c0, method=method, max_iter=200, tol=1e-9, uniquify="off", stats=stats)
        out.backward(grad)
        assert stats.forward_residual <= 1e-9
        return out, c, xg.grad, stats.forward_evals

    windowed = run()
    monkeypatch.setattr(window, "WINDOW_MIN_K", 10 ** 9)
    dense = run()
    assert windowed[3] == dense[3]
    for a, b in zip(windowed[:3], dense[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # both converged to tol 1e-9
