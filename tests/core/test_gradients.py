"""Gradients of the three methods: gradcheck, finite differences at the fixed point, idkm vs unrolled dkm."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import SolveStats, init_centroids

TIGHT = dict(max_iter=5000, tol=1e-14, adjoint_max_iter=200, adjoint_tol=1e-13)


def problem(groups, m, k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, m, d, generator=gen, dtype=torch.float64)
    c0 = init_centroids(x, k, "kmeans++", seed)
    return x, c0


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("k,d", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_gradcheck_idkm(groups, k, d):
    x, c0 = problem(groups, 16, k, d)
    tau = 0.05  # soft at the cluster boundaries, and the fixed point converges in tens of iterations
    fn = lambda z: soft_kmeans(z, c0, tau=tau, method="idkm", **TIGHT)[0]
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=1e-10)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("k,d", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_gradcheck_dkm(groups, k, d):
    x, c0 = problem(groups, 16, k, d)
    fn = lambda z: soft_kmeans(z, c0, tau=0.05, method="dkm", max_iter=5, tol=0)[0]
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=1e-10)


def test_idkm_matches_central_finite_differences_of_converged_output():
    x, c0 = problem(1, 64, 4, 1, seed=1)
    gen = torch.Generator().manual_seed(2)
    probe = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def loss(z):
        return (soft_kmeans(z, c0, tau=0.3, method="idkm", **TIGHT)[0] * probe).sum()

    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(xg), xg)
    eps = 1e-6
    fd = torch.empty_like(x)
    for i in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[0, i, 0] = eps
        fd[0, i, 0] = (loss(x + e) - loss(x - e)) / (2 * eps)
    assert torch.linalg.norm(grad - fd) / torch.linalg.norm(fd) < 1e-5


@pytest.mark.parametrize("solver", ["anderson", "picard"])
@pytest.mark.parametrize("d", [1, 2])
def test_idkm_matches_dkm_unrolled_300_iterations(d, solver):
    """The implicit gradient equals DKM's unrolled one, at the fixed point DKM's iteration reaches.

    At d = 2 this problem has several fixed points; Anderson can end at an unstable one (a saddle,
    which plain iteration never reaches), detects it from the Jacobian's spectral radius and reruns
    plain iteration, so both solvers agree with DKM.
    """
    x, c0 = problem(3, 64, 4, d, seed=3)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    xg = x.clone().requires_grad_()
    stats = SolveStats()
    out, c_star = soft_kmeans(xg, c0, tau=0.3, method="idkm", solver=solver, stats=stats, **TIGHT)
    (out * probe).sum().backward()
    assert stats.spectral_radius < 1
    xd = x.clone().requires_grad_()
    out_dkm, c_dkm = soft_kmeans(xd, c0, tau=0.3, method="dkm", max_iter=300, tol=0)
    (out_dkm * probe).sum().backward()
    torch.testing.assert_close(c_star, c_dkm, rtol=0, atol=1e-10)
    rel = torch.linalg.norm(xg.grad - xd.grad) / torch.linalg.norm(xd.grad)
    assert rel < 1e-4


def test_jfb_is_one_vjp_and_differs_from_idkm():
    x, c0 = problem(1, 64, 4, 1, seed=5)
    grads, stats = {}, {}
    for method in ["idkm", "idkm_jfb"]:
        xg = x.clone().requires_grad_()
        stats[method] = SolveStats()
        out, _ = soft_kmeans(xg, c0, tau=0.3, method=method, stats=stats[method], **TIGHT)
        (out * torch.arange(64.0, dtype=torch.float64).view(1, 64, 1)).sum().backward()
        grads[method] = xg.grad
    assert stats["idkm_jfb"].adjoint_iters == 0 and stats["idkm"].adjoint_iters > 0
    assert stats["idkm"].adjoint_converged
    cos = torch.nn.functional.cosine_similarity(grads["idkm"].flatten(), grads["idkm_jfb"].flatten(), dim=0)
    assert 0.5 < cos < 1 - 1e-6  # an approximation: aligned, not equal


def test_chunked_and_kept_attention_give_the_same_gradients():
    x, c0 = problem(2, 200, 8, 2, seed=6)
    results = []
    for chunk in [None, 0, 7]:  # plain iteration: the same path up to rounding, isolating the backward
        xg = x.clone().requires_grad_()
        out, c = soft_kmeans(xg, c0, tau=0.3, method="idkm", chunk_size=chunk, solver="picard", **TIGHT)
        (out.square()).sum().backward()
        results.append((out.detach(), c, xg.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adjoint_failure_falls_back_to_jfb_with_a_warning():
    x, c0 = problem(1, 256, 16, 1, seed=7)
    stats = SolveStats()
    xg = x.clone().requires_grad_()
    out, _ = soft_kmeans(xg, c0, tau=0.05, method="idkm", max_iter=50, tol=0, adjoint_max_iter=1,
                         adjoint_tol=1e-12, stats=stats)
    with pytest.warns(RuntimeWarning, match="adjoint solve did not converge"):
        out.sum().backward()
    assert stats.adjoint_converged is False and stats.jfb_fallbacks == 1 and stats.adjoint_iters == 1
    xj = x.clone().requires_grad_()
    soft_kmeans(xj, c0, tau=0.05, method="idkm_jfb", max_iter=50, tol=0)[0].sum().backward()
    torch.testing.assert_close(xg.grad, xj.grad)
