"""Soft assignment to a frozen LUT: exact gradient, chunking invisible, memory about the weight's size."""
import torch

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer, freeze_luts
from idkm_plugin.core.frozen import FrozenSoftAssign, frozen_soft_assign
from idkm_plugin.core.soft_step import attention
from idkm_plugin.profiling import SavedTensorBytes


def test_gradcheck_float64_in_chunks():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 2, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, 2, dtype=torch.float64)
    tau = torch.full((2, 1, 1), 0.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: FrozenSoftAssign.apply(x, c, tau, 3), (x,))


def test_equals_dense_autograd_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 300, 1, dtype=torch.float64, requires_grad=True)
    c = torch.linspace(-2, 2, 8, dtype=torch.float64).view(1, 8, 1)
    got = frozen_soft_assign(x, c, tau=0.05, chunk_size=64)
    ref = torch.bmm(attention(x, c, torch.tensor(0.05, dtype=torch.float64).view(1, 1, 1)), c)
    g = torch.randn_like(ref)
    (dx,) = torch.autograd.grad(got, x, g)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)


def test_frozen_clusterer_keeps_its_lut_and_holds_only_the_weight():
    torch.manual_seed(0)
    clusterer = WeightClusterer(ClusterConfig(bits=4, max_iter=5, chunk_size=256)).train()
    weight = torch.randn(64, 64, requires_grad=True)
    clusterer(weight)
    lut = clusterer.centroids.clone()
    freeze_luts(torch.nn.Sequential(clusterer))
    with SavedTensorBytes() as saved:
        out = clusterer(weight * 1.5)
    assert torch.equal(clusterer.centroids, lut)
    assert saved.bytes <= weight.numel() * 4 + 1024  # the weight, C and tau: no [m, k] attention
    out.sum().backward()
    assert weight.grad.abs().sum() > 0
    assert int(clusterer.step) == 2
