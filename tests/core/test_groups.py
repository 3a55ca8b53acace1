"""Many LUTs per layer go through the kernels in one batched call: equal to one group at a time."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import init_centroids
from idkm_plugin.core.uniquify import gather_rows, grid_rows, scatter_rows, uniquify_rows


def _weights(g: int, m: int, dtype=torch.float64) -> torch.Tensor:
    torch.manual_seed(0)
    scale = torch.linspace(0.5, 2.0, g).view(g, 1, 1)  # groups of different spread
    return (torch.randn(g, m, 1) * scale).round(decimals=2).to(dtype)  # repeated values: uniquify matters


@pytest.mark.parametrize("fn", [uniquify_rows, grid_rows])
def test_batched_uniquify_equals_one_group_at_a_time(fn):
    x = _weights(5, 700, torch.float32)
    rows, counts, inv = fn(x)
    assert torch.equal(scatter_rows(torch.ones_like(x), inv, rows.shape[1])[..., 0], counts)
    for gi in range(x.shape[0]):
        r1, c1, i1 = fn(x[gi:gi + 1])  # (one grid: every level is a row; batched: the occupied ones)
        assert torch.equal(gather_rows(rows, inv)[gi], gather_rows(r1, i1)[0])  # each weight's row value
        occupied = c1[0] > 0
        n = int(occupied.sum())
        assert torch.equal(rows[gi, :n], r1[0][occupied]) and torch.equal(counts[gi, :n], c1[0][occupied])
        assert not counts[gi, n:].any()  # padding rows carry no weight


def test_batched_half_uniquify_round_trips():
    x = torch.randn(4, 3000, 1).half()
    rows, counts, inv = uniquify_rows(x)
    assert torch.equal(gather_rows(rows, inv), x) and torch.equal(counts.sum(1), torch.full((4,), 3000.0))


@pytest.mark.parametrize("init", ["kmeans++", "linear", "density", "random"])
def test_batched_init_gives_centroids_of_each_group(init):
    x = _weights(6, 400)
    c = init_centroids(x, 8, init, seed=1)
    assert c.shape == (6, 8, 1)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    assert bool(((c >= lo) & (c <= hi)).all())  # each group's centroids come from its own range
    if init in ("linear", "density"):  # deterministic: equal to one group at a time
        for gi in range(6):
            torch.testing.assert_close(c[gi:gi + 1], init_centroids(x[gi:gi + 1], 8, init), rtol=0, atol=0)
    if init == "kmeans++":
        assert all(bool(torch.isin(c[gi, :, 0], x[gi, :, 0]).all()) for gi in range(6))  # drawn from the group


@pytest.mark.parametrize("method", ["idkm_jfb", "idkm"])
@pytest.mark.parametrize("uniquify,k", [("off", 8), ("on", 8), ("off", 64)])
def test_batched_groups_equal_the_per_group_loop(method, uniquify, k):
    """Output, centroids and the weight gradient of g groups in one call = g calls of one group (k = 64: the
    windowed kernel; 'on': distinct values with counts)."""
    x = _weights(4, 500).requires_grad_()
    c0 = init_centroids(x.detach(), k, "density")
    kw = dict(method=method, uniquify=uniquify, tol=1e-13, max_iter=3000, solver="picard", adjoint_tol=1e-10)
    g_out = torch.randn_like(x)
    x_hat, c = soft_kmeans(x, c0, **kw)
    (grad,) = torch.autograd.grad(x_hat, x, g_out)
    for gi in range(4):
        xi = x.detach()[gi:gi + 1].clone().requires_grad_()
        x_hat_i, c_i = soft_kmeans(xi, c0[gi:gi + 1], **kw)
        (grad_i,) = torch.autograd.grad(x_hat_i, xi, g_out[gi:gi + 1])
        torch.testing.assert_close(c[gi], c_i[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(x_hat[gi], x_hat_i[0].detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(grad[gi], grad_i[0], rtol=1e-6, atol=1e-8)


def test_groups_at_their_fixed_point_keep_it_and_the_rest_are_solved():
    """idkm_jfb warm start where one group already is at its fixed point: that group keeps C* = c0 (one pass);
    output, centroids and gradient of every group equal solving it alone."""
    x = _weights(3, 600).requires_grad_()
    kw = dict(method="idkm_jfb", tol=1e-11, max_iter=3000, solver="picard")
    c_far = init_centroids(x.detach(), 8, "density")
    _, fixed = soft_kmeans(x.detach()[:1], c_far[:1], **dict(kw, tol=1e-14))
    c0 = torch.cat([fixed, c_far[1:]])
    g_out = torch.randn_like(x)
    x_hat, c = soft_kmeans(x, c0, **kw)
    (grad,) = torch.autograd.grad(x_hat, x, g_out)
    assert torch.equal(c[0], c0[0])
    for gi in range(3):
        xi = x.detach()[gi:gi + 1].clone().requires_grad_()
        x_hat_i, c_i = soft_kmeans(xi, c0[gi:gi + 1], **kw)
        (grad_i,) = torch.autograd.grad(x_hat_i, xi, g_out[gi:gi + 1])
        # (the same iterates up to the rounding of differently chunked sums, amplified by slow contraction)
        torch.testing.assert_close(c[gi], c_i[0], rtol=0, atol=1e-8)
        torch.testing.assert_close(x_hat[gi], x_hat_i[0].detach(), rtol=0, atol=1e-8)
        torch.testing.assert_close(grad[gi], grad_i[0], rtol=1e-6, atol=1e-8)
