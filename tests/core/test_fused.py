"""The compiled (fused) d = 1 chunk kernels against the eager path they are compiled from."""
import warnings

import pytest
import torch

from idkm_plugin.core import fused, kernel, soft_kmeans


def _problem(g=3, r=700, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, r, 1, generator=gen) * 0.02
    c = torch.sort(torch.randn(g, k, 1, generator=gen) * 0.02, 1)[0]
    tau = torch.full((g, 1, 1), 4e-5)
    n = torch.rand(g, r, generator=gen) + 0.5
    return x, c, tau, n


@pytest.fixture
def fused_mode(monkeypatch):
    def set_mode(mode):
        monkeypatch.setenv("IDKM_FUSED", mode)
    monkeypatch.setattr(fused, "_failed", False)
    return set_mode


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("weighted", [False, True])
def test_map_sums_fused_equal_eager(fused_mode, weighted):
    x, c, tau, n = _problem()
    n = n if weighted else None
    fused_mode("0")
    eager = kernel.map_sums_and_output(x, n, c, tau, 256) + kernel.map_sums(x, n, c, tau, 256)
    fused_mode("1")
    compiled = kernel.map_sums_and_output(x, n, c, tau, 256) + kernel.map_sums(x, n, c, tau, 256)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("method", ["idkm_jfb", "idkm"])
@pytest.mark.parametrize("weighted", [False, True])
def test_backward_fused_equal_eager(fused_mode, method, weighted):
    """The same forward state, differentiated by the eager and by the compiled backward."""
    x0, c, _, n = _problem(g=4, r=900, k=16, seed=1)
    grad = torch.randn_like(x0)
    grads = []
    for mode in ("0", "1"):
        fused_mode("0")
        x = x0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unconverged idkm adjoint falls back to JFB: the same in both
            x_hat, _ = soft_kmeans(x, c, method=method, tol=1e-4, uniquify="off", weights=n if weighted else None)
            fused_mode(mode)
            x_hat.backward(grad)
        grads.append(x.grad)
    assert _rel(grads[1], grads[0]) < 1e-5


def test_small_problems_stay_eager(monkeypatch):
    monkeypatch.setenv("IDKM_FUSED", "auto")
    monkeypatch.setattr(fused, "_failed", False)
    assert not fused.use_fused(torch.zeros(4, 1000, 1), 16)
    assert fused.use_fused(torch.zeros(64, 4096, 1), 16)
    assert not fused.use_fused(torch.zeros(64, 4096, 1, dtype=torch.float64), 16)
    assert not fused.use_fused(torch.zeros(64, 4096, 2), 16)
    monkeypatch.setenv("IDKM_FUSED", "0")
    assert not fused.use_fused(torch.zeros(64, 4096, 1), 16)


def test_compile_failure_warns_once_and_falls_back(fused_mode, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    x, c, tau, _ = _problem()
    fused_mode("0")
    eager = kernel.map_sums(x, None, c, tau, 256)
    fused_mode("1")
    with pytest.warns(RuntimeWarning, match="fused clustering kernels unavailable.*no compiler here"):
        first = kernel.map_sums(x, None, c, tau, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = kernel.map_sums(x, None, c, tau, 256)
    assert not fused.use_fused(x, c.shape[1])  # after a failure every call takes the eager path
    for a, b, e in zip(first, second, eager):  # first: the uncompiled fused function (the same math, other rounding)
        assert _rel(a, e) < 1e-5 and torch.equal(b, e)
