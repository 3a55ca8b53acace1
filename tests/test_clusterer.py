import io

import pytest
import torch

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer


def test_lazy_init_then_warm_start_from_previous_step():
    w = torch.randn(16, 8, requires_grad=True)
    clusterer = WeightClusterer(ClusterConfig(bits=2, max_iter=1, tol=0))
    assert not clusterer.initialized
    clusterer(w)
    first = clusterer.centroids.clone()
    assert first.shape == (1, 4, 1)
    clusterer(w)  # one more iteration from where the last step ended
    cont = WeightClusterer(ClusterConfig(bits=2, max_iter=2, tol=0))
    cont(w)
    torch.testing.assert_close(clusterer.centroids, cont.centroids)
    assert not torch.equal(first, clusterer.centroids)


def test_eval_is_hard_assignment_with_at_most_k_values():
    w = torch.randn(32, 32)
    clusterer = WeightClusterer(ClusterConfig(bits=3, lut_dtype="float16"))
    clusterer(w)
    hard = clusterer.eval()(w)
    lut = clusterer.centroids.half().float().flatten()
    assert set(hard.unique().tolist()) <= set(lut.tolist())
    nearest = lut[(w.reshape(-1, 1) - lut).abs().argmin(1)].view_as(w)
    assert torch.equal(hard, nearest)


def test_disabled_and_start_step_pass_the_weight_through():
    w = torch.randn(8, 8)
    clusterer = WeightClusterer(ClusterConfig(bits=1, start_step=2))
    assert torch.equal(clusterer(w), w) and torch.equal(clusterer(w), w)
    assert not torch.equal(clusterer(w), w)  # third training step: clustering is on
    assert int(clusterer.step) == 3
    clusterer.enabled = False
    assert torch.equal(clusterer(w), w) and int(clusterer.step) == 3


def test_gradient_flows_to_the_weight():
    w = torch.randn(8, 8, requires_grad=True)
    for method in ["dkm", "idkm", "idkm_jfb"]:
        w.grad = None
        WeightClusterer(ClusterConfig(method=method, bits=2))(w).square().sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_state_dict_round_trip_through_torch_save():
    w = torch.randn(12, 12)
    clusterer = WeightClusterer(ClusterConfig(bits=4, dim=2))
    clusterer(w)
    buf = io.BytesIO()
    torch.save(clusterer.state_dict(), buf)
    buf.seek(0)
    restored = WeightClusterer(ClusterConfig(bits=4, dim=2))
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(restored.centroids, clusterer.centroids) and int(restored.step) == 1
    assert torch.equal(restored.eval()(w), clusterer.eval()(w))


def test_bad_weight_is_named():
    clusterer = WeightClusterer(ClusterConfig(dim=3), name="classifier.0.weight")
    with pytest.raises(ValueError, match="classifier.0.weight: cluster dim=3 does not divide the 16 weights"):
        clusterer.check_weight(torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="no centroids yet"):
        clusterer.lut()
