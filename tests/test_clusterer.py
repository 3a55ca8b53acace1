import io

import pytest
import torch

from idkm_plugin import ClusterConfig, soft_kmeans
from idkm_plugin.clusterer import COLD_START_BUDGET, WeightClusterer


def test_lazy_init_then_warm_start_from_previous_step():
    """The first (cold) solve gets COLD_START_BUDGET x max_iter evaluations, each later step max_iter from where the
    last one ended: with plain iteration, 10 + 1 steps equal one run of 11."""
    w = torch.randn(16, 8, requires_grad=True)
    clusterer = WeightClusterer(ClusterConfig(bits=2, max_iter=1, tol=0, solver="picard"))
    assert not clusterer.initialized
    clusterer(w)
    assert clusterer.last_stats.forward_evals == COLD_START_BUDGET
    init = WeightClusterer(ClusterConfig(bits=2))
    init.initialize(w)
    first = clusterer.centroids.clone()
    assert first.shape == (1, 4, 1)
    clusterer(w)  # one more iteration from where the last step ended
    assert clusterer.last_stats.forward_evals == 1
    _, expected = soft_kmeans(w.detach().reshape(-1, 1), init.centroids[0], method="idkm", solver="picard",
                              max_iter=COLD_START_BUDGET + 1, tol=0)
    torch.testing.assert_close(clusterer.centroids[0], expected)
    assert not torch.equal(first, clusterer.centroids)
    clusterer.centroids = first.clone()  # centroids set from outside (init_luts): cold again
    clusterer(w)
    assert clusterer.last_stats.forward_evals == COLD_START_BUDGET


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


# ---- eval-mode cache ------------------------------------------------------------------------------
def _uncached_eval(clusterer: WeightClusterer, w: torch.Tensor) -> torch.Tensor:
    """The eval output recomputed from scratch by a fresh clusterer holding the same state."""
    fresh = WeightClusterer(clusterer.config)
    fresh.load_state_dict(clusterer.state_dict())
    return fresh.eval()(w.detach().clone())


def _trained_clusterer(w: torch.nn.Parameter, **cfg) -> WeightClusterer:
    clusterer = WeightClusterer(ClusterConfig(bits=3, **cfg))
    clusterer(w).square().sum().backward()
    return clusterer.eval()


def test_eval_output_is_cached_until_the_weight_changes():
    w = torch.nn.Parameter(torch.randn(16, 8))
    clusterer = _trained_clusterer(w)
    first = clusterer(w)
    assert clusterer(w) is first  # the same weight version: no re-clustering
    assert torch.equal(first, _uncached_eval(clusterer, w))
    with torch.no_grad():
        w[0, 0] += 1.0  # an in-place write bumps the version
    second = clusterer(w)
    assert second is not first and torch.equal(second, _uncached_eval(clusterer, w))
    assert not torch.equal(second, first)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.5),
                                      lambda p: torch.optim.Adam(p, lr=0.5, foreach=True),
                                      lambda p: torch.optim.AdamW(p, lr=0.5, foreach=False)])
def test_optimizer_step_invalidates_the_eval_cache(make_opt):
    w = torch.nn.Parameter(torch.randn(16, 8))
    clusterer = _trained_clusterer(w)
    opt = make_opt([w])
    before = clusterer(w)
    w.grad = torch.randn_like(w)
    opt.step()
    after = clusterer(w)
    assert not torch.equal(after, before) and torch.equal(after, _uncached_eval(clusterer, w))


def test_train_step_eval_and_load_state_dict_invalidate_the_eval_cache():
    w = torch.nn.Parameter(torch.randn(16, 8))
    clusterer = _trained_clusterer(w)
    saved = {k: v.clone() for k, v in clusterer.state_dict().items()}
    before = clusterer(w)
    clusterer.train()(w).sum().backward()  # moves the centroids (written in place), not the weight
    after = clusterer.eval()(w)
    assert not torch.equal(after, before) and torch.equal(after, _uncached_eval(clusterer, w))
    clusterer.load_state_dict(saved)  # back to the first LUT
    assert torch.equal(clusterer(w), before)
    other = torch.nn.Parameter(w.detach().clone() * 2)  # another tensor, even with an equal version
    assert torch.equal(clusterer(other), _uncached_eval(clusterer, other))


def test_module_load_state_dict_of_the_weight_invalidates_the_eval_cache():
    layer = torch.nn.Linear(8, 16)
    clusterer = WeightClusterer(ClusterConfig(bits=2))
    clusterer(layer.weight)
    clusterer.eval()
    before = clusterer(layer.weight)
    layer.load_state_dict({"weight": torch.randn(16, 8), "bias": torch.zeros(16)})
    after = clusterer(layer.weight)
    assert torch.equal(after, _uncached_eval(clusterer, layer.weight)) and not torch.equal(after, before)


def test_eval_cache_never_reaches_state_dict_deepcopy_or_pickle():
    import copy
    import pickle
    w = torch.nn.Parameter(torch.randn(16, 8))
    clusterer = _trained_clusterer(w)
    clusterer(w)
    assert clusterer._eval_cache is not None
    assert set(clusterer.state_dict()) == {"centroids", "step", "mask"}
    assert copy.deepcopy(clusterer)._eval_cache is None
    assert pickle.loads(pickle.dumps(clusterer))._eval_cache is None
    clusterer.train()(w)
    assert clusterer._eval_cache is None  # a training forward frees it


def test_eval_cache_under_inference_mode_is_reusable_with_autograd():
    layer = torch.nn.Linear(8, 16)
    clusterer = WeightClusterer(ClusterConfig(bits=2))
    clusterer(layer.weight)
    clusterer.eval()
    with torch.inference_mode():
        cached = clusterer(layer.weight)
    x = torch.randn(3, 8, requires_grad=True)
    torch.nn.functional.linear(x, clusterer(layer.weight)).sum().backward()  # no inference-tensor error
    assert clusterer(layer.weight) is cached and x.grad is not None


def test_tied_weight_eval_is_cached_once_and_shared():
    w = torch.nn.Parameter(torch.randn(16, 8))
    a, b = WeightClusterer(ClusterConfig(bits=3)), WeightClusterer(ClusterConfig(bits=3))
    (a(w) + b(w)).sum().backward()
    a.eval(), b.eval()
    out = a(w)
    assert b(w) is out and torch.equal(out, _uncached_eval(a, w))
