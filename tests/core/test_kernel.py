"""The fused centroid-major kernel and the explicit adjoint Jacobian against their plain definitions."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import adjoint, init_centroids
from idkm_plugin.core.kernel import attention_t, soft_map
from idkm_plugin.core.soft_step import attention, soft_step


@pytest.mark.parametrize("d", [1, 3])
def test_fused_map_and_attention_equal_the_plain_step(d):
    x = torch.randn(2, 1000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = init_centroids(x, 8, "kmeans++")
    n = torch.rand(2, 1000, dtype=torch.float64) * 3
    tau = torch.tensor([0.1, 0.3], dtype=torch.float64).view(2, 1, 1)
    torch.testing.assert_close(attention_t(x, c, tau), attention(x, c, tau).transpose(1, 2), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(soft_map(x, n, c, tau, 77), soft_step(x, n, c, tau, 1000), rtol=1e-12, atol=1e-14)


def test_float32_attention_is_accurate_at_8_bits():
    """(x - c)^2, not x^2 - 2xc + c^2: no cancellation when tau is small against the weights' range."""
    x = torch.randn(1, 4096, 1, generator=torch.Generator().manual_seed(1)) * 0.02
    c = init_centroids(x, 256, "kmeans++")
    tau = torch.tensor(0.5 * 0.02 ** 2 / 256 ** 2).view(1, 1, 1)
    exact = attention_t(x.double(), c.double(), tau.double())
    assert (attention_t(x, c, tau).double() - exact).abs().max() < 1e-5


def test_tiny_logits_are_floored_not_subnormal():
    x = torch.tensor([[[0.0], [1.0]]])
    c = torch.tensor([[[0.0], [1.0]]])
    a = attention_t(x, c, torch.tensor(1e-3).view(1, 1, 1))
    assert a.min() > 0 and a.min() >= torch.finfo(torch.float32).tiny  # exp(-80), not a subnormal


@pytest.mark.parametrize("uniquify", ["off", "on"])
@pytest.mark.parametrize("d", [1, 2])
def test_explicit_jacobian_gives_the_matrix_free_gradient(d, uniquify, monkeypatch):
    x = (torch.randn(2, 300, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 4).round() / 4
    c0 = init_centroids(x, 4, "kmeans++")
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for explicit_max in [adjoint.EXPLICIT_JACOBIAN_MAX, 0]:
        monkeypatch.setattr(adjoint, "EXPLICIT_JACOBIAN_MAX", explicit_max)
        xg = x.clone().requires_grad_()
        out, _ = soft_kmeans(xg, c0, tau=0.3, method="idkm", max_iter=2000, tol=1e-14, uniquify=uniquify,
                             adjoint_tol=1e-13, adjoint_max_iter=200, solver="picard")
        (out * probe).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)
