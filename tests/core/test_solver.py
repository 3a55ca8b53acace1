"""The fixed-point solvers: Anderson and plain iteration reach the same fixed point; counts in SolveStats."""
import pytest
import torch

from idkm_plugin import ClusterConfig, soft_kmeans
from idkm_plugin.core import SolveStats, init_centroids
from idkm_plugin.core.fixed_point import anderson, picard
from idkm_plugin.core.kernel import soft_map
from idkm_plugin.core.soft_step import default_tau


def normal_problem(m=20000, k=16, seed=0, dtype=torch.float64):
    x = torch.randn(1, m, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.02
    return x, init_centroids(x, k, "kmeans++", seed), default_tau(x, k)


def test_anderson_and_picard_reach_the_same_fixed_point_anderson_in_fewer_evaluations():
    x, c0, tau = normal_problem()
    fmap = lambda c: soft_map(x, None, c, tau, 4096)  # noqa: E731
    scale = x.abs().amax()
    fast = anderson(fmap, c0, 2000, 1e-12, scale)
    slow = picard(fmap, c0, 2000, 1e-12, scale)
    assert fast.residual <= 1e-12 and slow.residual <= 1e-12
    torch.testing.assert_close(fast.c, slow.c, rtol=0, atol=1e-9 * float(scale))
    assert fast.evals < slow.evals


def test_one_million_weights_cold_start_within_40_evaluations():
    """The issue's acceptance: 1M normal weights, 16 clusters, k-means++ start, residual 1e-5."""
    x, c0, tau = normal_problem(m=1 << 20, dtype=torch.float32)
    fmap = lambda c: soft_map(x, None, c, tau, 8192)  # noqa: E731
    sol = anderson(fmap, c0, 40, 1e-5, x.abs().amax())
    assert sol.residual <= 1e-5 and sol.evals <= 40


@pytest.mark.parametrize("seed", range(5))
def test_one_dimensional_centroids_keep_their_order_and_permutations_commute(seed):
    x, c0, tau = normal_problem(m=3000, k=8, seed=seed)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
    c = soft_kmeans(x, c0, tau=tau.item(), max_iter=3000, tol=1e-12)[1]
    c_perm = soft_kmeans(x, c0[:, perm], tau=tau.item(), max_iter=3000, tol=1e-12)[1]
    assert torch.equal(c.argsort(1), c0.argsort(1))  # centroid j stays the j-th smallest
    torch.testing.assert_close(c_perm, c[:, perm], rtol=0, atol=1e-12)  # the caller's indices keep meaning


@pytest.mark.parametrize("solver", ["anderson", "picard"])
@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm_jfb"])
def test_stats_report_map_evaluations(method, solver):
    x, c0, _ = normal_problem(m=500, k=4)
    stats = SolveStats()
    soft_kmeans(x, c0, method=method, solver=solver, max_iter=7, tol=0, stats=stats)
    assert stats.forward_evals == 7  # tol 0: the whole budget
    converged = SolveStats()
    soft_kmeans(x, c0, method=method, solver=solver, max_iter=1000, tol=1e-6, stats=converged)
    assert converged.forward_residual <= 1e-6 and 1 < converged.forward_evals < 1000
    assert converged.forward_iters <= converged.forward_evals


def test_idkm_reports_a_stable_fixed_point_and_two_backward_passes():
    x, c0, _ = normal_problem(m=2000, k=4)
    stats = SolveStats()
    out, _ = soft_kmeans(x.requires_grad_(), c0, method="idkm", max_iter=500, tol=1e-10, stats=stats)
    out.sum().backward()
    assert 0 < stats.spectral_radius < 1 and not stats.forward_fallback
    assert stats.adjoint_converged and stats.adjoint_passes == 2


def test_solver_config_field_validated_and_round_trips():
    assert ClusterConfig(solver="picard").solver.value == "picard"
    assert ClusterConfig().solver.value == "anderson"
    with pytest.raises(ValueError, match=r"solver='newton' is not allowed; use one of 'anderson', 'picard'"):
        ClusterConfig(solver="newton")
    cfg = ClusterConfig(solver="picard", uniquify="grid")
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="uniquify='grid' is not allowed with dim=2"):
        ClusterConfig(uniquify="grid", dim=2)
    with pytest.raises(ValueError, match="uniquify='grid' is not allowed with method='dkm'"):
        ClusterConfig(uniquify="grid", method="dkm")


def test_the_clusterer_passes_the_configured_solver():
    from idkm_plugin.clusterer import WeightClusterer

    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    evals = {}
    for solver in ["anderson", "picard"]:
        clusterer = WeightClusterer(ClusterConfig(bits=4, solver=solver, max_iter=1000, tol=1e-5)).train()
        clusterer(w)
        evals[solver] = clusterer.last_stats.forward_evals
    assert evals["anderson"] < evals["picard"]


def test_singular_anderson_history_takes_the_plain_step():
    """A history whose differences vanish (a singular Gram matrix) must not raise (CUDA's solve does): the
    group falls back to the plain step F(x_last)."""
    from idkm_plugin.core.fixed_point import _extrapolate

    x = torch.ones(2, 6)
    fx = torch.full((2, 6), 2.0)
    cand, extrapolated = _extrapolate([x, x, x], [fx, fx, fx], torch.zeros(2, dtype=torch.long), 2)
    assert not extrapolated.any()
    assert torch.equal(cand, fx)


def test_a_warm_start_within_tol_is_the_fixed_point_in_one_evaluation():
    from idkm_plugin.core import attention
    torch.manual_seed(0)
    x = torch.randn(2, 3000, 1, dtype=torch.float64)
    c0 = torch.linspace(-2, 2, 8, dtype=torch.float64).view(1, 8, 1).repeat(2, 1, 1)
    _, converged = soft_kmeans(x, c0, method="idkm_jfb", tol=1e-12, max_iter=2000, solver="picard")
    stats = SolveStats()
    x_hat, c = soft_kmeans(x, converged, method="idkm_jfb", tol=1e-10, stats=stats)
    assert stats.forward_evals == 1 and stats.forward_iters == 0 and stats.forward_residual <= 1e-10
    assert torch.equal(c, converged)  # C* = the warm start
    tau = default_tau(x, 8)
    torch.testing.assert_close(x_hat, torch.bmm(attention(x, converged, tau), converged), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solve", [picard, anderson])
def test_converged_groups_are_not_evaluated_again(solve):
    """Many LUTs: a group within tol stops costing passes; the result equals solving each group alone."""
    torch.manual_seed(0)
    x = torch.randn(3, 4000, 1, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    tau = default_tau(x, 4)
    c_far = init_centroids(x, 4, "linear")
    fixed = picard(lambda c: soft_map(x, None, c, tau, 4000), c_far, 5000, 1e-13, x.abs().amax()).c
    c0 = torch.cat([fixed[:1], c_far[1:]])  # group 0 starts at its fixed point
    evaluated = torch.zeros(3, dtype=torch.long)

    def fmap(c):
        evaluated.add_(1)
        return soft_map(x, None, c, tau, 4000)

    def fmap_groups(c, idx):
        evaluated[idx] += 1
        return soft_map(x[idx], None, c, tau[idx], 4000)

    sol = solve(fmap, c0, 5000, 1e-12, x.abs().amax(), fmap_groups=fmap_groups)
    assert sol.residual <= 1e-12
    assert int(evaluated[0]) == 1 and int(evaluated[1:].min()) > 5  # group 0: only the first (full) pass
    for gi in range(3):
        alone = solve(lambda c: soft_map(x[gi:gi + 1], None, c, tau[gi:gi + 1], 4000), c0[gi:gi + 1], 5000, 1e-12,
                      x.abs().amax())
        torch.testing.assert_close(sol.c[gi], alone.c[0], rtol=0, atol=1e-10)
