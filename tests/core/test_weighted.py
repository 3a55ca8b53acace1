"""Weighted soft k-means (row weights, e.g. Fisher sensitivities): the fixed point and its gradients."""
import pytest
import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import init_centroids

TIGHT = dict(max_iter=5000, tol=1e-14, adjoint_max_iter=200, adjoint_tol=1e-13)


def problem(groups, m, k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, m, d, generator=gen, dtype=torch.float64)
    w = torch.randint(1, 4, (groups, m), generator=gen).double()
    return x, w, init_centroids(x, k, "kmeans++", seed)


@pytest.mark.parametrize("uniquify", ["off", "on"])
@pytest.mark.parametrize("method", ["idkm", "idkm_jfb"])
@pytest.mark.parametrize("d", [1, 2])
def test_integer_weights_equal_repeated_rows(d, method, uniquify):
    """Weight 3 on a row is that row three times: same C*, same output, same gradient (summed over the copies)."""
    x, w, c0 = problem(2, 24, 4, d)
    if uniquify == "on":
        x = (x * 2).round() / 2  # repeated values: distinct rows with several occurrences of unequal weights
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reps = w.long()

    xw = x.clone().requires_grad_()
    out_w, c_w = soft_kmeans(xw, c0, tau=0.3, method=method, uniquify=uniquify, weights=w, **TIGHT)
    (out_w * probe).sum().backward()

    grads, outs, cents = [], [], []
    for g in range(2):  # each group alone: its rows repeated
        xg = x[g].clone().requires_grad_()
        out, c = soft_kmeans(xg.repeat_interleave(reps[g], 0), c0[g], tau=0.3, method=method, uniquify=uniquify,
                             **TIGHT)
        first = torch.cumsum(reps[g], 0) - reps[g]  # each row's first copy
        (out[first] * probe[g]).sum().backward()
        outs.append(out[first].detach())
        cents.append(c)
        grads.append(xg.grad)
    assert torch.allclose(c_w, torch.stack(cents), atol=1e-10)
    assert torch.allclose(out_w.detach(), torch.stack(outs), atol=1e-10)
    # the output of a copy depends on the copies only through C*, which sees all copies: the gradient of the
    # weighted form equals the gradient through one copy's output, with C* fed by all copies
    assert torch.allclose(xw.grad, torch.stack(grads), atol=1e-8)


@pytest.mark.parametrize("uniquify", ["off", "on"])
@pytest.mark.parametrize("d", [1, 2])
def test_weighted_idkm_gradcheck(d, uniquify):
    x, w, c0 = problem(2, 16, 3, d, seed=1)
    w = w * 0.37  # non-integer weights
    fn = lambda z: soft_kmeans(z, c0, tau=0.1, method="idkm", uniquify=uniquify, weights=w, **TIGHT)[0]
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=1e-10)


def test_weighted_fixed_point_equation():
    x, w, c0 = problem(1, 200, 4, 1, seed=2)
    tau = 0.2
    _, c = soft_kmeans(x, c0, tau=tau, method="idkm_jfb", weights=w, **TIGHT)
    a = torch.softmax(-(x - c.transpose(1, 2)).square() / tau, dim=-1)  # [1, m, k]
    expected = (w.unsqueeze(-1) * a).transpose(1, 2) @ x / (w.unsqueeze(-1) * a).sum(1).unsqueeze(-1)
    assert torch.allclose(c, expected, atol=1e-12)


def test_bad_weights_raise():
    x, w, c0 = problem(1, 8, 2, 1)
    with pytest.raises(ValueError, match="do not match"):
        soft_kmeans(x, c0, weights=w[:, :4])
    with pytest.raises(ValueError, match=">= 0"):
        soft_kmeans(x, c0, weights=-w)
    with pytest.raises(ValueError, match="dkm"):
        soft_kmeans(x, c0, method="dkm", weights=w)
