"""`idkm_plugin.plan(model, model_config)` and the rule that no layer is palettized into more bytes than its float32 weight."""
import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, plan as plan_of
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.layers import palettize_module, resolve_layers
from idkm_plugin.nn import PalettizedTensor


def readme_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))


README_MP = ModelConfig(default=ClusterConfig(bits=4), by_type={"Linear": ClusterConfig(bits=4, dim=4)},
                        small_layer_params=1000, small_layer=ClusterConfig(bits=8))
TOO_BIG = r"layer '0' \(Conv2d\): palettized with bits=8, dim=1 it would take 1,096 B \(121.8 bits per weight"


def test_plan_of_the_readme_example_leaves_the_small_conv_float():
    with pytest.warns(UserWarning, match=TOO_BIG + r".*not less than its 288 B in float32; leaving it float"):
        plan = plan_of(readme_model(), README_MP)
    conv, fc = plan.rows
    assert (conv.name, conv.kind, conv.rule, conv.config, conv.weights, conv.nbytes) == (
        "0", "Conv2d", "small_layer", None, 72, 288)
    assert conv.note == "8 bit would not shrink it"
    assert (fc.rule, fc.config, fc.weights) == ("by_type:Linear", ClusterConfig(bits=4, dim=4), 54_080)
    assert fc.nbytes == 54_080 // 4 * 4 // 8 + 16 * 4 * 4  # codes + LUT
    assert fc.bits_per_weight == pytest.approx(8 * 7016 / 54_080)
    table = plan.to_markdown()
    assert "| 0 | Conv2d | small_layer | float (8 bit would not shrink it) | 72 | 32.00 | 288 | 288 |" in table
    assert "| 3 | Linear | by_type:Linear | idkm 4 bit, dim 4 | 54,080 | 1.04 | 7,016 | 216,320 |" in table


def test_keep_float_if_larger_false_palettizes_anyway_and_round_trips():
    mp = ModelConfig(default=README_MP.default, by_type=dict(README_MP.by_type), small_layer_params=1000,
                     small_layer=README_MP.small_layer, keep_float_if_larger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_of(readme_model(), mp)
    assert plan.rows[0].config == ClusterConfig(bits=8) and plan.rows[0].nbytes == 1096
    assert ModelConfig.from_dict(mp.to_dict()) == mp
    assert ModelConfig.from_dict(README_MP.to_dict()).keep_float_if_larger is True


@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (4, 3), (16, 16), (32, 8, 3, 3), (100, 64), (3, 1, 5)])
def test_planned_size_never_exceeds_float32_and_equals_the_converted_size(shape):
    layer = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else (
        nn.Conv1d(shape[1], shape[0], shape[2]) if len(shape) == 3 else nn.Linear(shape[1], shape[0]))
    model = nn.Sequential(layer)
    for bits, per_channel, lut_dtype in itertools.product((1, 2, 4, 8), (False, "max_abs"), ("float32", "int8")):
        cfg = ClusterConfig(bits=bits, max_iter=2, per_channel_scale=per_channel, lut_dtype=lut_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (row,) = plan_of(model, ModelConfig(default=cfg)).rows
            (_, _, resolved), = resolve_layers(model, cfg)
        assert row.nbytes <= row.float32_bytes
        assert row.config == resolved  # the plan is what the flows will do
        if resolved is None:
            assert cfg.palettized_nbytes(shape) >= 4 * row.weights
            continue
        assert row.nbytes < row.float32_bytes
        fresh = copy.deepcopy(layer)  # one clusterer per Parameter (a Parameter seen twice is a tied weight)
        clusterer = WeightClusterer(cfg)
        clusterer(fresh.weight)
        converted = palettize_module(fresh, clusterer)
        assert type(converted) is type(layer) and isinstance(converted.weight, PalettizedTensor)
        stored = sum(t.numel() * t.element_size() for t in converted.weight.inner_tensors().values())
        assert row.nbytes == stored


def _decisions_in_every_flow(model_fn, mp):
    """{flow: {layer: config or None}} from each adapter's own layer selection."""
    tq = pytest.importorskip("torch.ao.quantization")
    pytest.importorskip("torchao")
    pytest.importorskip("brevitas")
    from idkm_plugin.integrations import brevitas as ib
    from idkm_plugin.integrations import torch_ao as ita
    from idkm_plugin.integrations import torchao as ito

    out = {}
    model = ita.assign_qconfigs(model_fn(), mp)
    out["torch.ao"] = {n: None if m.qconfig is None else m.qconfig.weight().config for n, m in model.named_children()
                       if isinstance(m, (nn.Conv2d, nn.Linear))}
    out["fx"] = {n: None if q is None else q.weight().config
                 for n, q in ita.qconfig_mapping(mp, model_fn()).module_name_qconfigs.items()}
    out["torchao"] = {n: None if c is None else c.cluster_config
                      for n, c in ito.fqn_to_config(mp, model_fn()).fqn_to_config.items()}
    configs, skipped = ib.resolve_layers(model_fn(), mp)
    out["brevitas"] = {**configs, **{n: None for n in skipped}}
    exported = torch.export.export(model_fn(), (torch.rand(2, 1, 28, 28),)).module()
    ita.IDKMQuantizer(mp).annotate(exported)
    found = {"0": None, "3": None}
    for node in exported.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        for spec in ([] if annotation is None else annotation.input_qspec_map.values()):
            if spec is not None:
                keywords = spec.observer_or_fake_quant_ctr.p.keywords
                found[keywords["name"]] = keywords["config"]
    out["pt2e"] = found
    del tq
    return out


def test_every_flow_leaves_the_layer_float_with_the_same_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decisions = _decisions_in_every_flow(readme_model, README_MP)
    expected = {"0": None, "3": ClusterConfig(bits=4, dim=4)}
    for flow, got in decisions.items():
        assert got == expected, flow
    ours = [str(w.message) for w in caught if "leaving it float" in str(w.message)]
    assert len(ours) >= len(decisions) and len(set(ours)) == 1


def test_converted_readme_model_keeps_the_small_conv_float():
    tq = pytest.importorskip("torch.ao.quantization")
    from idkm_plugin.export import size_report
    from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_of(readme_model(), README_MP)
        qat = tq.prepare_qat(assign_qconfigs(readme_model(), README_MP).train())
        qat(torch.rand(4, 1, 28, 28))
        deployed = tq.convert(qat.eval(), mapping=palettize_mapping())
    assert type(deployed[0]) is nn.Conv2d
    (layer,) = size_report(deployed).layers
    assert layer.name == "3" and layer.code_bytes + layer.lut_bytes + layer.scale_bytes == plan.rows[1].nbytes
