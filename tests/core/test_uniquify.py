"""eDKM uniquification gives the plain computation's results."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import init_centroids
from idkm_plugin.core.uniquify import gather_rows, grid_rows, scatter_rows, uniquify_rows


def test_uniquify_rows_round_trip():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0, 4.0]]).unsqueeze(-1)
    rows, counts, inv = uniquify_rows(x)
    assert torch.equal(gather_rows(rows, inv), x)
    assert counts.tolist() == [[2, 1, 2], [1, 4, 0]]  # group 2 padded with a zero-count row
    assert torch.equal(scatter_rows(torch.ones_like(x), inv, rows.shape[1]).squeeze(-1), counts)


@pytest.mark.parametrize("method", ["idkm", "idkm_jfb"])
@pytest.mark.parametrize("d", [1, 2])
def test_uniquified_equals_plain_values_centroids_and_gradients(method, d):
    x = (torch.randn(3, 900, d, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16).double()
    c0 = init_centroids(x, 8, "kmeans++")
    probe = torch.sin(torch.arange(x.numel(), dtype=torch.float64)).view_as(x)
    results = []
    for uniquify in ["off", "on"]:
        xg = x.clone().requires_grad_()
        out, c = soft_kmeans(xg, c0, tau=1e-4, method=method, max_iter=200, tol=1e-13, uniquify=uniquify,
                             adjoint_tol=1e-12, adjoint_max_iter=200, chunk_size=64, solver="picard")
        (out * probe).sum().backward()
        results.append((out.detach(), c, xg.grad))
    for plain, unique in zip(*results):
        torch.testing.assert_close(unique, plain, rtol=1e-9, atol=1e-11)


def test_bf16_weight_4bit_uniquified_centroids_match_plain():
    """A bf16 weight at 4 bits: same centroids within 1e-5 relative (scaled-down version of the benchmark)."""
    w = (torch.randn(512, 512, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    x = w.reshape(1, -1, 1)
    c0 = init_centroids(x.float(), 16, "kmeans++")
    # plain iteration: 30 unconverged steps follow the same path up to rounding in both computations
    cents = [soft_kmeans(x, c0, method="idkm", max_iter=30, uniquify=u, solver="picard")[1] for u in ["off", "on"]]
    # norm-wise relative error: a centroid near zero makes elementwise ratios meaningless at float32
    assert torch.linalg.norm(cents[1] - cents[0]) / torch.linalg.norm(cents[0]) < 1e-5


def test_auto_uniquifies_only_half_precision_scalars():
    from idkm_plugin.core import use_uniquify

    assert use_uniquify("auto", "idkm", torch.bfloat16, 1)
    assert not use_uniquify("auto", "idkm", torch.float32, 1)
    assert not use_uniquify("auto", "idkm", torch.float16, 2)
    assert not use_uniquify("auto", "dkm", torch.bfloat16, 1)
    with pytest.raises(ValueError, match="uniquify='on' is not allowed with method='dkm'"):
        use_uniquify("on", "dkm", torch.bfloat16, 1)


def test_half_precision_histogram_equals_torch_unique():
    x = (torch.randn(2, 5000, 1, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.float16)
    rows, counts, inv = uniquify_rows(x)
    assert torch.equal(gather_rows(rows, inv), x)
    for g in range(2):
        vals, cnt = torch.unique(x[g].reshape(-1), return_counts=True)
        got = rows[g, counts[g] > 0, 0]
        order = got.argsort()
        assert torch.equal(got[order], vals) and torch.equal(counts[g, counts[g] > 0][order], cnt.float())


def test_grid_rounding_error_bound_and_at_most_65536_values():
    x = torch.randn(1, 300_000, 1, generator=torch.Generator().manual_seed(4)) * 0.02
    rows, counts, inv = grid_rows(x)
    span = float(x.max() - x.min())
    assert rows.shape[1] <= 1 << 16 and int(counts.sum()) == x.shape[1]
    assert float((gather_rows(rows, inv) - x).abs().max()) <= span / 131070 * 1.01


def test_grid_uniquified_idkm_is_close_to_exact_float32():
    """Straight-through rounding to the 16-bit grid: centroids, output and gradient near exact (4 bits)."""
    x = torch.randn(1, 1 << 18, 1, generator=torch.Generator().manual_seed(5)) * 0.02
    c0 = init_centroids(x, 16, "kmeans++")
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    results = {}
    for uniquify in ["off", "grid"]:
        xg = x.clone().requires_grad_()
        out, c = soft_kmeans(xg, c0, method="idkm", uniquify=uniquify, max_iter=2000, tol=1e-6)
        (out * probe).sum().backward()
        results[uniquify] = (out.detach(), c, xg.grad)
    # centroids: each float32 solve is itself 2e-5 to 7e-5 from the float64 fixed point (tol 1e-6 is below
    # float32's noise), so the two sit ~1e-4 apart
    for (exact, grid), bound in zip(zip(results["off"], results["grid"]), [1e-3, 2e-4, 3e-2]):
        assert torch.linalg.norm(grid - exact) / torch.linalg.norm(exact) < bound


def test_auto_rounds_only_large_float32_scalar_layers_with_a_fine_grid():
    from idkm_plugin.core import uniquify_mode

    big = 1 << 18
    assert uniquify_mode("auto", "idkm", torch.float32, 1, big, 0.004).value == "grid"
    assert uniquify_mode("auto", "idkm", torch.float32, 1, big, 0.05).value == "off"  # 8 bits: too coarse
    assert uniquify_mode("auto", "idkm", torch.float32, 1, big - 1, 0.004).value == "off"
    assert uniquify_mode("auto", "idkm", torch.float64, 1, big, 0.004).value == "off"
    assert uniquify_mode("auto", "idkm", torch.bfloat16, 1, 10).value == "on"
    assert uniquify_mode("grid", "idkm", torch.bfloat16, 1).value == "grid"
    with pytest.raises(ValueError, match="uniquify='grid' is not allowed with method='dkm'"):
        uniquify_mode("grid", "dkm", torch.float32, 1)
