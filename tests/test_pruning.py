"""Magnitude pruning with clustering (Deep Compression's first stage), in the core and through every flow.

Pruned weights are exactly zero in the parameter, in every output and gradient, left out of the clustering,
kept by conversion (converted == eval QAT exactly) and by state_dict round trips and resumed training.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, plan
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.core import magnitude_mask, num_pruned
from idkm_plugin.export import size_report
from idkm_plugin.layers import palettize_module
from idkm_plugin.nn import PalettizedTensor, pack_codes, palettized_parameters
from qat_helpers import converted_layers, palettized_linear

FAST = dict(bits=2, max_iter=5)
ignore_torch_ao_deprecation = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated")


# ---- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("sparsity", -0.1, r"sparsity=-0.1 is not allowed; expected a float in \[0, 1\)"),
    ("sparsity", 1.0, r"sparsity=1.0 is not allowed"),
    ("sparsity", "0.5", r"sparsity='0.5' is not allowed"),
    ("sparsity", math.nan, r"sparsity=nan is not allowed"),
    ("prune_start", -1, r"prune_start=-1 is not allowed; expected None \(= start_step\) or an integer >= 0"),
    ("prune_start", 1.5, r"prune_start=1.5 is not allowed"),
    ("prune_steps", -2, r"prune_steps=-2 is not allowed; expected an integer >= 0 \(0: one-shot pruning\)"),
])
def test_bad_pruning_values_raise_naming_field_value_and_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**{field: value})


def test_pruning_fields_round_trip_through_dicts_and_model_config():
    cfg = ClusterConfig(bits=3, sparsity=0.9, prune_start=7, prune_steps=100)
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    mc = ModelConfig.from_dict({"default": {"bits": 2, "sparsity": 0.5},
                                "by_type": {"Linear": {"prune_steps": 10}}})
    assert mc.default.sparsity == 0.5 and mc.by_type["Linear"] == ClusterConfig(bits=2, sparsity=0.5, prune_steps=10)
    assert ModelConfig.from_dict(mc.to_dict()) == mc


def test_schedule_one_shot_and_cubic_ramp():
    one_shot = ClusterConfig(sparsity=0.8, start_step=3)
    assert one_shot.pruning_start == 3  # None: the first clustered step
    assert [one_shot.sparsity_at(t) for t in range(6)] == [0, 0, 0, 0.8, 0.8, 0.8]
    ramp = ClusterConfig(sparsity=0.8, prune_start=2, prune_steps=4)
    want = [0, 0] + [0.8 * (1 - (1 - i / 4) ** 3) for i in range(4)] + [0.8, 0.8]
    assert [ramp.sparsity_at(t) for t in range(8)] == pytest.approx(want, abs=0)
    assert ClusterConfig().sparsity_at(100) == 0


def test_plan_counts_the_mask_bit():
    base, pruned = ClusterConfig(bits=2, dim=2), ClusterConfig(bits=2, dim=2, sparsity=0.5)
    assert pruned.palettized_nbytes((10, 12)) - base.palettized_nbytes((10, 12)) == math.ceil(60 / 8)
    row = plan(nn.Sequential(nn.Linear(12, 10)), ModelConfig(default=pruned)).rows[0]
    assert row.nbytes == pruned.palettized_nbytes((10, 12)) and "sparsity 0.5" in plan(
        nn.Sequential(nn.Linear(12, 10)), ModelConfig(default=pruned)).to_markdown()


# ---- the clusterer -------------------------------------------------------------------------------------
def _norms(weight, cfg):
    return WeightClusterer(cfg).vectors(weight.detach()).norm(dim=-1)  # [groups, m]


LAYERS = {"Linear": lambda: nn.Linear(12, 10), "Conv2d": lambda: nn.Conv2d(4, 6, 3),
          "Embedding": lambda: nn.Embedding(20, 8)}
SHAPES = {"dim 1": dict(dim=1), "dim 2": dict(dim=2),
          "groups 2, dim 2": dict(dim=2, granularity="per_grouped_channel", group_size=2)}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_one_shot_prunes_exactly_the_smallest_vectors(kind, shape, sparsity):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    cfg = ClusterConfig(**FAST, **SHAPES[shape], sparsity=sparsity)
    clusterer = WeightClusterer(cfg, kind)
    before = _norms(layer.weight, cfg)
    out = clusterer(layer.weight)
    mask = clusterer.mask
    total = mask.numel()
    assert mask.dtype == torch.bool and mask.shape == before.shape
    assert int((~mask).sum()) == round(sparsity * total) == num_pruned(sparsity, total)
    assert before[~mask].max() <= before[mask].min()  # by magnitude
    pruned_w = ~clusterer._weight_mask(layer.weight)
    assert int(pruned_w.sum()) == int((~mask).sum()) * cfg.dim
    assert torch.equal(layer.weight[pruned_w], torch.zeros(int(pruned_w.sum())))  # the parameter itself
    assert bool((out[pruned_w] == 0).all()) and bool((out[~pruned_w] != 0).all())


def test_ties_are_broken_by_position_and_pruning_is_monotone():
    x = torch.tensor([[[1.0], [0.5], [0.5], [0.5], [2.0], [-0.5]]])
    assert magnitude_mask(x, 2).tolist() == [[True, False, False, True, True, True]]
    previous = torch.tensor([[True, True, True, True, False, True]])  # the largest one was pruned earlier
    assert magnitude_mask(x, 2, previous).tolist() == [[True, False, True, True, False, True]]
    assert magnitude_mask(x, 0, previous).tolist() == previous.tolist()  # never un-prunes


def test_gradual_ramp_reaches_each_scheduled_count_monotonically():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    cfg = ClusterConfig(**FAST, sparsity=0.9, prune_start=1, prune_steps=5)
    clusterer = WeightClusterer(cfg, "fc")
    previous = None
    for t in range(9):
        clusterer(layer.weight).sum().backward()  # (a backward ends the step: see the tied-weight memo)
        expected = num_pruned(cfg.sparsity_at(t), 128)
        assert (int((~clusterer.mask).sum()) if clusterer.pruned else 0) == expected, t
        if previous is not None:
            assert not bool((clusterer.mask & ~previous).any())  # pruned stays pruned
        previous = clusterer.mask.clone() if clusterer.pruned else None
    assert int((~clusterer.mask).sum()) == round(0.9 * 128)


@pytest.mark.parametrize("prune_steps", [0, 4])
@pytest.mark.parametrize("frozen", [False, True])
def test_pruned_weights_stay_exactly_zero_through_sgd_with_momentum_and_weight_decay(prune_steps, frozen):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    cfg = ClusterConfig(**FAST, sparsity=0.5, prune_steps=prune_steps)
    clusterer = WeightClusterer(cfg, "fc")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(32, 16)
    for step in range(8):
        if frozen and step == 5:
            clusterer.freeze_lut()
        opt.zero_grad()
        w_hat = clusterer(layer.weight)
        F.linear(x, w_hat, layer.bias).square().mean().backward()
        if clusterer.pruned:
            pruned = ~clusterer._weight_mask(layer.weight)
            assert bool((layer.weight[pruned] == 0).all()) and bool((w_hat[pruned] == 0).all())
            assert bool((layer.weight.grad[pruned] == 0).all())
        opt.step()
        if prune_steps == 0:  # one-shot at the first step: momentum never saw them, the parameter stays 0
            assert bool((layer.weight[pruned] == 0).all())
    assert int((~clusterer.mask).sum()) == 64


def test_clustering_runs_on_the_survivors_only():
    # bimodal weights around +-1 and half of them tiny: pruned, no centroid is spent on zero
    gen = torch.Generator().manual_seed(0)
    big = torch.where(torch.rand(64, generator=gen) < 0.5, -1.0, 1.0) + 0.05 * torch.randn(64, generator=gen)
    tiny = 1e-3 * torch.randn(64, generator=gen)
    weight = nn.Parameter(torch.stack([big, tiny], 1).reshape(16, 8))
    for init in ("kmeans++", "linear", "density"):
        clusterer = WeightClusterer(ClusterConfig(bits=2, max_iter=10, sparsity=0.5, init=init), "w")
        out = clusterer(weight.detach().clone().requires_grad_())
        assert bool((clusterer.centroids.abs() > 0.5).all()), (init, clusterer.centroids.flatten())
        assert int((out == 0).sum()) == 64
    unpruned = WeightClusterer(ClusterConfig(bits=2, max_iter=10), "w")
    unpruned(weight)
    assert bool((unpruned.centroids.abs() < 0.5).any())  # without pruning zero takes a centroid


def test_centroids_initialised_before_pruning_are_reinitialised_from_the_survivors():
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.cat([torch.randn(32, generator=gen).sign() * 2, 1e-3 * torch.randn(32, generator=gen)]))
    clusterer = WeightClusterer(ClusterConfig(bits=1, sparsity=0.5, init="linear"), "w")
    clusterer.eval()(weight)  # eval initialises from every weight
    clusterer.train()(weight)
    assert bool((clusterer.centroids.abs() > 1).all())


def test_eval_snaps_survivors_to_the_lut_and_zeroes_the_pruned():
    torch.manual_seed(0)
    cfg = ClusterConfig(**FAST, dim=2, granularity="per_grouped_channel", group_size=4, sparsity=0.4)
    weight = nn.Parameter(torch.randn(8, 6))
    clusterer = WeightClusterer(cfg, "w")
    clusterer(weight)
    out = clusterer.eval()(weight)
    lut = clusterer.lut()
    codes = clusterer._codes(weight, lut)
    assert bool((codes[~clusterer.mask] == 0).all())
    vectors = clusterer.vectors(out)
    assert bool((vectors[~clusterer.mask] == 0).all())
    expected = torch.gather(lut, 1, codes.unsqueeze(-1).expand(-1, -1, 2))
    assert torch.equal(vectors[clusterer.mask], expected[clusterer.mask])


def test_gradient_of_the_masked_clustered_weight_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    tight = dict(max_iter=5000, tol=1e-14, adjoint_max_iter=200, adjoint_tol=1e-13)
    for cfg in (ClusterConfig(method="idkm", bits=1, tau=0.05, sparsity=0.25, **tight),
                ClusterConfig(method="dkm", bits=2, tau=0.05, sparsity=0.25, max_iter=5, tol=0),
                ClusterConfig(method="idkm", bits=1, dim=2, tau=0.05, sparsity=0.3, granularity="per_grouped_channel",
                              group_size=2, **tight)):
        weight = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        clusterer = WeightClusterer(cfg, "w")
        clusterer(weight)  # prunes and initialises
        c0 = clusterer.centroids.clone()

        def clustered(w):
            clusterer.centroids = c0.clone()  # the same start every evaluation
            return clusterer(w)

        w = weight.clone().requires_grad_()
        assert torch.autograd.gradcheck(clustered, (w,), eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=1e-10,
                                         check_undefined_grad=False)
        (grad,) = torch.autograd.grad(clustered(w).sum(), w)
        assert bool((grad[~clusterer._weight_mask(w)] == 0).all())


def test_tied_weight_is_pruned_once_with_one_mask():
    torch.manual_seed(0)
    embed = nn.Embedding(16, 8)
    head = nn.Linear(8, 16, bias=False)
    head.weight = embed.weight
    cfg = ClusterConfig(**FAST, sparsity=0.5)
    first, second = WeightClusterer(cfg, "embed"), WeightClusterer(cfg, "head")
    a, b = first(embed.weight), second(head.weight)
    assert a is b and second.mask is first.mask and int((~first.mask).sum()) == 64
    embed_p, head_p = palettize_module(embed, first), palettize_module(head, second)
    assert head_p.weight.mask is embed_p.weight.mask and head_p.weight.codes is embed_p.weight.codes


# ---- the converted module ---------------------------------------------------------------------------
def _converted_linear(cfg, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(12, 10)
    clusterer = WeightClusterer(cfg, "fc")
    clusterer(layer.weight)
    pal = palettize_module(layer, clusterer)
    assert type(pal) is nn.Linear and isinstance(pal.weight, PalettizedTensor)
    return layer, clusterer, pal


def test_palettized_mask_is_packed_one_bit_per_vector_and_codes_of_pruned_are_zero():
    cfg = ClusterConfig(**FAST, dim=2, sparsity=0.5)
    layer, clusterer, pal = _converted_linear(cfg)
    w = pal.weight
    assert w.mask.dtype == torch.uint8 and w.mask.numel() == math.ceil(60 / 8)
    assert torch.equal(w.mask, pack_codes(clusterer.mask.to(torch.int64), 1))
    assert torch.equal(w.unpacked_mask(), clusterer.mask) and w.sparsity == 0.5
    assert bool((w.unpacked_codes()[~clusterer.mask] == 0).all())
    assert torch.equal(w.dequantize(), clusterer.eval()(layer.weight))
    again = palettized_linear(12, 10, w.codes, w.lut, 2, mask=w.mask)  # packed form accepted
    assert torch.equal(again.weight.dequantize(), w.dequantize())
    with pytest.raises(ValueError, match=r"mask torch.bool \[3\] does not match 60 codes: "
                                         r"expected bool \(60 values\) or packed uint8 \[8\]"):
        palettized_linear(12, 10, w.codes, w.lut, 2, mask=torch.ones(3, dtype=torch.bool))
    unpruned = _converted_linear(ClusterConfig(**FAST, dim=2))[2].weight
    assert unpruned.mask is None and "mask" not in unpruned.inner_tensors()
    assert bool(unpruned.unpacked_mask().all()) and unpruned.sparsity == 0


def test_the_weight_cache_follows_the_mask_and_torch_export_decodes_it():
    cfg = ClusterConfig(**FAST, sparsity=0.5)
    _, clusterer, pal = _converted_linear(cfg)
    x = torch.randn(3, 12)
    masked = pal(x)
    pal.weight.mask.zero_()  # every vector pruned, written in place
    assert not torch.equal(pal(x), masked) and bool((pal.weight.dense() == 0).all())
    _, _, pal = _converted_linear(cfg)
    program = torch.export.export(pal, (x,))
    assert torch.equal(program.module()(x), pal(x))
    inner = {n.args[1] for n in program.graph.nodes
             if n.op == "call_function" and "access_subclass_inner_tensor" in str(n.target)}
    assert "mask" in inner  # the program reads the packed mask and decodes it


def test_converted_state_dict_round_trip_restores_the_mask():
    cfg = ClusterConfig(**FAST, sparsity=0.6, per_channel_scale=True)
    _, _, pal = _converted_linear(cfg)
    _, _, fresh = _converted_linear(cfg, seed=1)  # another mask
    assert not torch.equal(fresh.weight.mask, pal.weight.mask)
    fresh.load_state_dict(pal.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(fresh.weight.mask, pal.weight.mask) and torch.equal(fresh(x), pal(x))
    _, _, unpruned = _converted_linear(ClusterConfig(**FAST, per_channel_scale=True), seed=1)  # no mask
    with pytest.raises(RuntimeError, match="palettized weight .* does not match this one"):  # torch wraps the error
        unpruned.load_state_dict(pal.state_dict())
    unpruned.load_state_dict(pal.state_dict(), assign=True)  # takes the saved weight as it is
    assert torch.equal(unpruned.weight.mask, pal.weight.mask) and torch.equal(unpruned(x), pal(x))


def test_size_report_counts_the_mask_bytes():
    cfg = ClusterConfig(**FAST, sparsity=0.5)
    _, _, pal = _converted_linear(cfg)
    model = nn.Sequential(pal)
    layer = size_report(model).layers[0]
    assert layer.code_bytes == pal.weight.codes.numel() + pal.weight.mask.numel() == 30 + 15
    assert layer.code_bytes + layer.lut_bytes + layer.scale_bytes == cfg.palettized_nbytes((10, 12))
    stored = sum(t.nbytes_stored if isinstance(t, PalettizedTensor) else t.numel() * t.element_size()
                 for t in model.state_dict().values())
    assert size_report(model).total_bytes == stored


# ---- every flow ---------------------------------------------------------------------------------------
class Net(nn.Module):
    """Embedding, Conv2d and two Linears; forward(ids [N, 4], img [N, 2, 6, 6]) -> [N, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(2, 8, 3)
        self.fc = nn.Linear(8 + 8 * 4 * 4, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids, img):
        a = self.emb(ids).mean(1)
        b = self.conv(img).flatten(1)
        return self.head(F.relu(self.fc(torch.cat([a, b], 1))))


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (4, 4), generator=g), torch.randn(4, 2, 6, 6, generator=g)


def _torch_ao(cfg):
    import torch.ao.quantization as tq

    from idkm_plugin.integrations import torch_ao as ita

    model = ita.assign_qconfigs(Net(), ModelConfig(default=cfg), mapping=ita.qat_module_mapping())
    qat = tq.prepare_qat(model.train(), mapping=ita.qat_module_mapping())
    return qat, lambda m: tq.convert(m, mapping=ita.palettize_mapping())


def _torchao(cfg):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from idkm_plugin.integrations import torchao as ito

    model = Net()
    quantize_(model, ito.IDKMQATConfig(cfg), filter_fn=ito.clusterable)

    def convert(m):
        quantize_(m, ito.IDKMQATConfig(step="convert"), filter_fn=ito.clusterable)
        return m

    return model.train(), convert


def _brevitas(cfg):
    pytest.importorskip("brevitas")
    from idkm_plugin.integrations import brevitas as ib

    return ib.quantize_model(Net(), ModelConfig(default=cfg)).train(), ib.palettize


FLOWS = {"torch.ao": _torch_ao, "torchao": _torchao, "brevitas": _brevitas}
CONFIGS = {"one-shot": ClusterConfig(**FAST, sparsity=0.5),
           "ramp, dim 2, grouped, scale": ClusterConfig(**FAST, dim=2, sparsity=0.7, prune_start=1, prune_steps=2,
                                                        granularity="per_grouped_channel", group_size=2,
                                                        per_channel_scale=True)}


def _train(model, steps, first=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(first, first + steps):
        opt.zero_grad()
        model(*_inputs(100 + step)).square().mean().backward()
        opt.step()
    return opt


def _clusterers(model):
    return [m for m in model.modules() if isinstance(m, WeightClusterer)]


@ignore_torch_ao_deprecation
@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_equals_eval_qat_exactly_with_pruning(flow, name):
    cfg = CONFIGS[name]
    qat, convert = FLOWS[flow](cfg)
    _train(qat, 4)
    clusterers = _clusterers(qat)
    assert len(clusterers) == 4
    for c in clusterers:
        assert int((~c.mask).sum()) == round(cfg.sparsity * c.mask.numel()), c.name
    expected = qat.eval()(*_inputs())
    masks = {c.name: c.mask.clone() for c in clusterers}
    deployed = convert(qat)
    layers = converted_layers(deployed)
    assert len(layers) == 4
    for n, m in layers.items():
        assert torch.equal(m.weight.unpacked_mask(), masks[n]), n
    assert torch.equal(deployed(*_inputs()), expected)


def test_pt2e_converted_equals_eval_qat_exactly_with_pruning():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from idkm_plugin.integrations.torch_ao import (IDKMQuantizer, convert_pt2e_palettized,
                                                   pt2e_eval, pt2e_train)

    cfg = CONFIGS["ramp, dim 2, grouped, scale"]
    exported = torch.export.export(Net().train(), _inputs()).module()
    qat = pt2e_train(prepare_qat_pt2e(exported, IDKMQuantizer(ModelConfig(default=cfg))))
    _train(qat, 4)
    expected = pt2e_eval(qat)(*_inputs())
    deployed = convert_pt2e_palettized(qat)
    weights = list(palettized_parameters(deployed).values())
    assert len(weights) == 4 and all(w.mask is not None for w in weights)
    assert torch.equal(deployed(*_inputs()), expected)


@ignore_torch_ao_deprecation
@pytest.mark.parametrize("flow", list(FLOWS))
def test_qat_state_dict_round_trip_keeps_the_mask(flow):
    cfg = CONFIGS["one-shot"]
    qat, _ = FLOWS[flow](cfg)
    _train(qat, 2)
    fresh, _ = FLOWS[flow](cfg)  # masks still empty: sized from the state_dict
    fresh.load_state_dict(qat.state_dict())
    for a, b in zip(_clusterers(qat), _clusterers(fresh)):
        assert torch.equal(a.mask, b.mask)
    assert torch.equal(fresh.eval()(*_inputs()), qat.eval()(*_inputs()))


def test_a_state_dict_saved_without_a_mask_still_loads_strictly():
    weight = nn.Parameter(torch.randn(8, 4))
    old = WeightClusterer(ClusterConfig(**FAST), "w")
    old(weight)
    state = {k: v for k, v in old.state_dict().items() if k != "mask"}  # as saved before pruning existed
    new = WeightClusterer(ClusterConfig(**FAST), "w")
    new.load_state_dict(state)
    assert torch.equal(new.centroids, old.centroids) and not new.pruned


@ignore_torch_ao_deprecation
@pytest.mark.parametrize("flow", list(FLOWS))
def test_resume_5_plus_5_equals_10_bit_exact_while_pruning_ramps(flow, tmp_path):
    cfg = ClusterConfig(**FAST, sparsity=0.8, prune_start=2, prune_steps=6)  # the ramp spans the checkpoint
    straight, _ = FLOWS[flow](cfg)
    _train(straight, 10)

    first, _ = FLOWS[flow](cfg)
    opt = _train(first, 5)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, _ = FLOWS[flow](cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt.load_state_dict(ckpt["opt"])
    for step in range(5, 10):
        opt.zero_grad()
        resumed(*_inputs(100 + step)).square().mean().backward()
        opt.step()
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and any(k.endswith("mask") for k in want)
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_every_flow_reaches_the_pruning_fields():
    pytest.importorskip("brevitas")
    import brevitas.nn as qnn

    from idkm_plugin.integrations import brevitas as ib
    from idkm_plugin.integrations import torch_ao as ita

    cfg = ClusterConfig(bits=2, sparsity=0.9, prune_start=3, prune_steps=20)
    layer = qnn.QuantLinear(16, 4, weight_quant=ib.IDKMWeightQuant, weight_bit_width=2, weight_sparsity=0.9,
                            weight_prune_start=3, weight_prune_steps=20)
    assert layer.weight_quant.cluster_config == cfg
    assert ita.idkm_qconfig(bits=2, sparsity=0.9, prune_start=3, prune_steps=20).weight().config == cfg
    assert ita.IDKMFakeQuantize(bits=2, sparsity=0.9, prune_start=3, prune_steps=20).config == cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"sparsity=1.5 is not allowed"):
            qnn.QuantLinear(16, 4, weight_quant=ib.IDKMWeightQuant, weight_sparsity=1.5).weight_quant.cluster_config


@pytest.mark.parametrize("scale", ["rms", "max_abs"])
def test_a_wholly_pruned_channel_keeps_the_scaled_gradient_finite(scale):
    rest = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    weight = nn.Parameter(torch.cat([1e-3 * torch.ones(2, 8), rest]))  # 16 smallest: channels 0 and 1
    clusterer = WeightClusterer(ClusterConfig(**FAST, sparsity=0.25, per_channel_scale=scale), "w")
    clusterer(weight).square().sum().backward()
    assert bool((weight[:2] == 0).all()) and bool(torch.isfinite(weight.grad).all())
    assert bool((weight.grad[:2] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_converted_equals_eval_qat_exactly_with_pruning(dtype):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from idkm_plugin.integrations import torchao as ito

    model = Net().to(dtype)
    quantize_(model, ito.IDKMQATConfig(ClusterConfig(bits=3, max_iter=5, sparsity=0.6, per_channel_scale="rms")),
              filter_fn=ito.clusterable)
    ids, img = _inputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model.train()(ids, img.to(dtype)).float().square().mean().backward()
        opt.step()
    expected = model.eval()(ids, img.to(dtype))
    quantize_(model, ito.IDKMQATConfig(step="convert"), filter_fn=ito.clusterable)
    assert torch.equal(model(ids, img.to(dtype)), expected)


@ignore_torch_ao_deprecation
def test_fx_with_batchnorm_folding_keeps_the_mask():
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from idkm_plugin.integrations.torch_ao import convert_fx_palettized, qconfig_mapping

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4)).train()
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    mp = ModelConfig(default=ClusterConfig(**FAST, sparsity=0.5))
    qat = prepare_qat_fx(model, qconfig_mapping(mp, model), (x,))
    opt = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # the conv's clustered weight is BN-scaled (not the Parameter): masked all the same
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    expected = qat.eval()(x)
    deployed = convert_fx_palettized(qat)
    layers = list(converted_layers(deployed).values())
    assert len(layers) == 2 and all(m.weight.sparsity == 0.5 for m in layers)
    for m in layers:
        pruned = ~m.weight.unpacked_mask().reshape(-1)
        assert bool((m.weight.dequantize().reshape(pruned.numel(), -1)[pruned] == 0).all())
    torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)  # BN folding: rounding only (as unpruned)
