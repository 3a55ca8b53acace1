"""The fused d = 1 kernels (native C++ ops and the compiled chunks) against the eager path and float64."""
import warnings

import pytest
import torch

from idkm_plugin import native
from idkm_plugin.core import fused, kernel, soft_kmeans

BACKENDS = ["compiled"] + (["native"] if native.has_op("soft_kmeans_sums") else [])


def _problem(g=3, r=700, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, r, 1, generator=gen) * 0.02
    c = torch.sort(torch.randn(g, k, 1, generator=gen) * 0.02, 1)[0]
    tau = torch.full((g, 1, 1), 4e-5)
    n = torch.rand(g, r, generator=gen) + 0.5
    return x, c, tau, n


@pytest.fixture(params=BACKENDS)
def fused_mode(request, monkeypatch):
    """set_mode("0") / set_mode("1"): eager / the fused backend of this parametrization."""
    def set_mode(mode):
        monkeypatch.setenv("IDKM_FUSED", mode)
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "USE_NATIVE", request.param == "native")
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
@pytest.mark.parametrize("uniquify", ["off", "on"])
def test_backward_fused_equal_eager(fused_mode, method, weighted, uniquify):
    """The same forward state, differentiated by the eager and by the fused backward (uniquified: the
    per-distinct-row Jacobian and fixed-point terms)."""
    x0, c, _, n = _problem(g=4, r=900, k=16, seed=1)
    if uniquify == "on":
        x0 = (x0 * 300).round() / 300  # ~30 distinct values per group, each repeated
    grad = torch.randn_like(x0)
    grads = []
    for mode in ("0", "1"):
        fused_mode("0")
        x = x0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unconverged idkm adjoint falls back to JFB: the same in both
            x_hat, _ = soft_kmeans(x, c, method=method, tol=1e-4, uniquify=uniquify, weights=n if weighted else None)
            fused_mode(mode)
            x_hat.backward(grad)
        grads.append(x.grad)
    # uniquified: eager, compiled and native each land 2e-6 to 6e-6 from the float64 gradient (measured, unweighted)
    assert _rel(grads[1], grads[0]) < (1e-5 if uniquify == "off" else 3e-5)


def test_small_problems_stay_eager(monkeypatch):
    monkeypatch.setenv("IDKM_FUSED", "auto")
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(fused, "USE_NATIVE", False)
    assert not fused.use_fused(torch.zeros(4, 1000, 1), 16)
    assert fused.use_fused(torch.zeros(64, 4096, 1), 16)
    assert not fused.use_fused(torch.zeros(64, 4096, 1, dtype=torch.float64), 16)
    assert not fused.use_fused(torch.zeros(64, 4096, 2), 16)
    monkeypatch.setenv("IDKM_FUSED", "0")
    assert not fused.use_fused(torch.zeros(64, 4096, 1), 16)
    if "native" in BACKENDS:  # native: every multi-group problem; one small LUT keeps the eager rounding order
        monkeypatch.setattr(fused, "USE_NATIVE", True)
        monkeypatch.setenv("IDKM_FUSED", "auto")
        assert fused.use_fused(torch.zeros(2, 10, 1), 16)
        assert not fused.use_fused(torch.zeros(1, 1000, 1), 16)
        assert fused.use_fused(torch.zeros(1, 1 << 18, 1), 16)


def test_compile_failure_warns_once_and_falls_back(fused_mode, monkeypatch):
    monkeypatch.setattr(fused, "USE_NATIVE", False)  # without the native ops, fused means compiled

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


@pytest.mark.skipif("native" not in BACKENDS, reason="the native ops are not built")
@pytest.mark.parametrize("k,r", [(16, 37), (4, 100), (256, 33), (16, 1040)])
def test_native_ops_match_float64(k, r):
    """Every ISA of the C++ ops against the PyTorch definitions in float64: row counts off the 16-row vector
    width, k from 2 to 8 bits, weighted sums, more rows than one float32 flush block."""
    ops = torch.ops.idkm_plugin
    gen = torch.Generator().manual_seed(k + r)
    g = 5
    x = torch.randn(g, 1, r, generator=gen) * 0.05
    c = torch.sort(torch.randn(g, k, 1, generator=gen) * 0.05, 1)[0]
    tau = torch.rand(g, 1, 1, generator=gen) * 1e-4 + 1e-5
    n = torch.rand(g, 1, r, generator=gen) * 3
    grad, u, f = torch.randn(g, 1, r, generator=gen), torch.randn(g, k, 1, generator=gen), torch.randn(g, k, 1, generator=gen)
    floor = -36.0
    f64 = [t.double() for t in (x, n, c, tau, grad, u, f)]
    sums_ref, x_hat_ref = fused.map_sums_output_chunk(f64[0], f64[1], f64[2], f64[3], floor)
    v_ref = fused.output_vjp_chunk(f64[0], f64[2], f64[3], f64[4], floor)[..., 0]
    dx_ref = fused.input_grad_chunk(*f64, floor)[:, 0]
    flat = dict(x=x[:, 0], n=n[:, 0], c=c[..., 0], tau=tau.view(-1), grad=grad[:, 0], u=u[..., 0], f=f[..., 0])
    for isa in ops.soft_kmeans_isas():
        sums, x_hat = ops.soft_kmeans_sums(flat["x"], flat["n"], flat["c"], flat["tau"], floor, True, isa)
        v = ops.soft_kmeans_output_vjp(flat["x"], flat["c"], flat["tau"], flat["grad"], floor, isa)
        dx = ops.soft_kmeans_input_grad(flat["x"], flat["n"], flat["c"], flat["tau"], flat["grad"], flat["u"],
                                        flat["f"], floor, isa)
        unweighted, _ = ops.soft_kmeans_sums(flat["x"], None, flat["c"], flat["tau"], floor, False, isa)
        ones = torch.ones_like(f64[1])
        assert _rel(sums, sums_ref) < 1e-6, isa
        assert _rel(unweighted, fused.map_sums_chunk(f64[0], ones, f64[2], f64[3], floor)) < 1e-6, isa
        assert _rel(x_hat, x_hat_ref[:, 0]) < 1e-6, isa
        assert _rel(v, v_ref) < 1e-5, isa
        assert _rel(dx, dx_ref) < 1e-5, isa


@pytest.mark.skipif("native" not in BACKENDS, reason="the native ops are not built")
def test_native_ops_reject_bad_input():
    ops = torch.ops.idkm_plugin
    x, c, tau = torch.zeros(2, 8), torch.zeros(2, 4), torch.ones(2)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU tensor"):
        ops.soft_kmeans_sums(x.double(), None, c, tau, -36.0, False)
    with pytest.raises(RuntimeError, match=r"expected x \[g, r\], c \[g, k\], tau \[g\]"):
        ops.soft_kmeans_sums(x, None, torch.zeros(3, 4), tau, -36.0, False)
    with pytest.raises(RuntimeError, match="unknown isa"):
        ops.soft_kmeans_sums(x, None, c, tau, -36.0, False, 7)
