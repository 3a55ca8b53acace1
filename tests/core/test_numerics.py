"""Numerics: dtypes, tiny tau, empty clusters, duplicate centroids, fewer distinct vectors than k."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import init_centroids

METHODS = ["dkm", "idkm", "idkm_jfb"]


def run(x, c0, method, **kw):
    xg = x.clone().requires_grad_()
    out, c = soft_kmeans(xg, c0, method=method, **kw)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, c, xg.grad


def finite(*tensors):
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_output_dtype_follows_input_and_compute_is_float32_or_64(method, dtype):
    x = (torch.randn(2, 300, 1) * 0.05).to(dtype)
    out, c, grad = run(x, init_centroids(x.float(), 4, "linear"), method, max_iter=5)
    assert out.dtype == dtype and grad.dtype == dtype
    assert c.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert finite(out, c, grad)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_tau_saturates_to_hard_assignment_without_nan(method):
    x = torch.randn(1, 200, 2)
    c0 = init_centroids(x, 8, "kmeans++")
    out, c, grad = run(x, c0, method, tau=1e-30, max_iter=5)
    assert finite(out, c, grad)
    nearest = torch.cdist(x[0], c[0]).argmin(1)
    torch.testing.assert_close(out[0], c[0][nearest])


@pytest.mark.parametrize("method", METHODS)
def test_empty_clusters_keep_their_centroid(method):
    x = torch.randn(1, 100, 1) * 0.01
    c0 = torch.tensor([[[-0.01], [0.0], [0.01], [50.0]]])  # the last centroid attracts nothing
    out, c, grad = run(x, c0, method, tau=1e-4, max_iter=10)
    assert finite(out, c, grad)
    assert c[0, 3, 0] == 50.0


@pytest.mark.parametrize("method", METHODS)
def test_duplicate_centroids_and_fewer_distinct_vectors_than_k(method):
    x = torch.tensor([0.1, 0.1, -0.2, 0.3, 0.3, 0.3]).view(1, 6, 1)
    c0 = init_centroids(x, 16, "kmeans++")  # only 3 distinct values for 16 centroids
    out, c, grad = run(x, c0, method, max_iter=20)
    assert finite(out, c, grad)
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)


def test_constant_weight_has_no_nan():
    x = torch.full((1, 50, 1), 0.25)
    out, c, grad = run(x, init_centroids(x, 4, "linear"), "idkm", max_iter=5)
    assert finite(out, c, grad)
    torch.testing.assert_close(out, x)


def test_clustering_quality_sqnr_floor():
    """4-bit soft k-means of a Gaussian weight reaches the SQNR of Lloyd-Max (~20 dB)."""
    x = torch.randn(1, 20000, 1, generator=torch.Generator().manual_seed(0))
    out, c = soft_kmeans(x, init_centroids(x, 16, "kmeans++"), method="idkm", max_iter=100)
    sqnr = 10 * torch.log10(x.square().sum() / (out - x).square().sum())
    assert sqnr > 19.0
