"""Memory held for backward, measured exactly with saved_tensors_hooks."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import init_centroids
from idkm_plugin.profiling import SavedTensorBytes


def saved_bytes(method, max_iter, m=4096, k=16, d=1, **kw):
    x = torch.randn(1, m, d, generator=torch.Generator().manual_seed(0)).requires_grad_()
    c0 = init_centroids(x.detach(), k, "linear")
    with SavedTensorBytes() as saved:
        soft_kmeans(x, c0, method=method, max_iter=max_iter, tol=0, **kw)
    return saved.bytes


@pytest.mark.parametrize("method", ["idkm", "idkm_jfb"])
def test_implicit_methods_hold_the_same_bytes_at_any_iteration_count(method):
    assert saved_bytes(method, 3) == saved_bytes(method, 100)
    assert saved_bytes(method, 3) < 2 * 4096 * 4  # about the weight: X, C*, S, F(C*)


def test_dkm_grows_linearly_with_iterations():
    b = [saved_bytes("dkm", t) for t in (1, 2, 3, 10)]
    per_iter = b[1] - b[0]
    assert per_iter > 4096 * 16 * 4  # at least the [m, k] attention per iteration
    assert b[2] - b[1] == per_iter and b[3] - b[2] == 7 * per_iter


def test_keeping_the_attention_holds_m_times_k():
    kept = saved_bytes("idkm", 3, chunk_size=0)
    assert kept >= 4096 * 16 * 4 and kept > 4 * saved_bytes("idkm", 3)


def test_memory_bounded_idkm_at_one_million_weights_8_bits():
    m = 1_000_000
    held = saved_bytes("idkm", 1, m=m, k=256)
    assert held <= 3 * m * 4
