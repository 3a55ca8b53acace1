"""Per-output-channel scales and int8 LUTs (issue 14).

The scale is a function of the weight inside the clusterer, so (1) the gradient flows through it in every
method (float64 gradcheck), (2) eval-mode QAT and the converted model agree bit for bit in every flow,
(3) the scales and int8 LUTs survive save / load exactly and are counted by the size report.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ChannelScale
from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.layers import palettize_module
from idkm_plugin.nn import PalettizedTensor, palettized_parameters
from qat_helpers import converted_layers


def _uneven(shape, seed=0):
    """A weight whose output channels differ in scale by orders of magnitude (as depthwise convs do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    return w * torch.logspace(-2, 1, shape[0], dtype=torch.float64).view(-1, *([1] * (len(shape) - 1)))


@pytest.mark.parametrize("method", ["dkm", "idkm", "idkm_jfb"])
@pytest.mark.parametrize("scale", ["max_abs", "rms"])
def test_clustered_weight_is_differentiable_through_the_channel_scales(method, scale):
    # fixed starting LUT and tau: the map W -> s * cluster(W / s) * ... is then a function of W alone
    cfg = ClusterConfig(method=method, bits=2, tau=0.3, max_iter=200 if method != "dkm" else 4, tol=1e-13,
                        per_channel_scale=scale, uniquify="off", adjoint_tol=1e-12, adjoint_max_iter=500)
    w0 = _uneven((3, 5))
    c0 = torch.tensor([[[-0.8], [-0.2], [0.3], [0.9]]], dtype=torch.float64)

    def clustered(w):
        clusterer = WeightClusterer(cfg)
        clusterer.centroids = c0.clone()
        return clusterer(w)

    w = w0.clone().requires_grad_()
    if method == "idkm_jfb":  # Jacobian-free: approximate by design; check the scale path with a frozen LUT
        frozen = WeightClusterer(cfg).freeze_lut()
        frozen.centroids = c0.clone()
        assert torch.autograd.gradcheck(frozen, (w,), eps=1e-6, atol=1e-6, check_undefined_grad=False)
        out = clustered(w)
        out.sum().backward()
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
        return
    assert torch.autograd.gradcheck(clustered, (w,), eps=1e-6, atol=1e-5, rtol=1e-4, check_undefined_grad=False,
                                    nondet_tol=1e-9)  # the iterative adjoint solve of idkm


def test_the_gradient_really_includes_the_scale_term():
    cfg = ClusterConfig(method="dkm", bits=2, tau=0.05, max_iter=3, per_channel_scale="max_abs")
    w = _uneven((3, 5)).requires_grad_()
    c0 = torch.tensor([[[-0.8], [-0.2], [0.3], [0.9]]], dtype=torch.float64)
    clusterer = WeightClusterer(cfg)
    clusterer.centroids = c0.clone()
    clusterer(w).square().sum().backward()
    with_scale = w.grad.clone()
    # the same map with the scale held constant
    s = w.detach().abs().amax(1, keepdim=True)
    plain = WeightClusterer(cfg.replace(per_channel_scale=False))
    plain.centroids = c0.clone()
    v = w.detach().clone().requires_grad_()
    (plain(v / s) * s).square().sum().backward()
    assert not torch.allclose(with_scale, v.grad)


def test_per_channel_scale_values_and_true_means_max_abs():
    assert ClusterConfig(per_channel_scale=True).per_channel_scale is ChannelScale.MAX_ABS
    assert ClusterConfig(per_channel_scale=None).per_channel_scale is False
    rms = ClusterConfig(per_channel_scale="rms")
    assert ClusterConfig.from_dict(rms.to_dict()).per_channel_scale is ChannelScale.RMS
    with pytest.raises(ValueError, match="per_channel_scale='max'"):
        ClusterConfig(per_channel_scale="max")
    w = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    assert torch.equal(WeightClusterer(ClusterConfig(per_channel_scale="max_abs")).channel_scale(w),
                       torch.tensor([4.0, 1.0]))  # an all-zero channel gets scale 1
    assert torch.allclose(WeightClusterer(ClusterConfig(per_channel_scale="rms")).channel_scale(w),
                          torch.tensor([12.5 ** 0.5, 1.0]))


def test_per_channel_scale_clusters_uneven_channels_better():
    w = _uneven((16, 8, 3, 3)).float()

    def sqnr(cfg):
        clusterer = WeightClusterer(cfg)
        clusterer(w)
        clusterer.eval()
        q = clusterer(w)
        # per-channel error relative to each channel: what one LUT for all channels cannot serve
        return (10 * torch.log10(w.square().sum((1, 2, 3)) / (w - q).square().sum((1, 2, 3)))).mean()

    base = ClusterConfig(bits=3, max_iter=20)
    assert sqnr(base.replace(per_channel_scale="max_abs")) > sqnr(base) + 5


def test_int8_lut_is_what_eval_mode_uses():
    clusterer = WeightClusterer(ClusterConfig(bits=3, lut_dtype="int8", max_iter=5))
    w = torch.randn(8, 6)
    clusterer(w)
    q, scale = clusterer.quantized_lut()
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (1,)
    assert torch.equal(clusterer.lut(), q.float() * scale.view(-1, 1, 1))
    clusterer.eval()
    assert set(torch.unique(clusterer(w)).tolist()) <= set(clusterer.lut().flatten().tolist())


class Net(nn.Module):
    """One layer of every kind; forward(ids [N, 4], img [N, 2, 6, 6]) -> [N, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.conv1 = nn.Conv1d(8, 6, 3)
        self.conv2 = nn.Conv2d(2, 8, 3)
        self.fc = nn.Linear(6 * 2 + 8 * 4 * 4, 16)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():  # channels of very different scales
            for m in (self.emb, self.conv1, self.conv2, self.fc):
                m.weight.mul_(torch.logspace(-2, 0, m.weight.shape[0]).view(-1, *([1] * (m.weight.dim() - 1))))

    def forward(self, ids, img):
        a = self.conv1(self.emb(ids).transpose(1, 2)).flatten(1)
        b = self.conv2(img).flatten(1)
        return self.head(F.relu(self.fc(torch.cat([a, b], 1))))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 10, (4, 4), generator=g), torch.randn(4, 2, 6, 6, generator=g)


CONFIGS = {
    "scale": ClusterConfig(bits=2, max_iter=5, per_channel_scale="max_abs"),
    "int8 LUT": ClusterConfig(bits=3, max_iter=5, lut_dtype="int8"),
    "rms scale + int8 LUT + grouped": ClusterConfig(bits=2, max_iter=5, per_channel_scale="rms", lut_dtype="int8",
                                                    granularity="per_grouped_channel", group_size=2),
    "float16 scale": ClusterConfig(bits=2, max_iter=5, per_channel_scale="max_abs", scale_dtype="float16"),
    # blocks of 4 weights per scale (3 in conv2's 18-weight rows)
    "float16 block scales": ClusterConfig(bits=2, max_iter=5, per_channel_scale="max_abs", scale_dtype="float16",
                                          scale_block_size=4),
}


def _train(model, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model.train()(*_inputs()).square().mean().backward()
        opt.step()
    return model


def _check_converted(deployed, cfg, n_layers=5):
    layers = [m.weight for m in converted_layers(deployed).values()]
    assert len(layers) == n_layers
    for m in layers:
        assert (m.channel_scale is not None) == bool(cfg.per_channel_scale)
        assert m.channel_scale is None or m.channel_scale.dtype == cfg.scale_torch_dtype
        assert (m.lut.dtype == torch.int8) == cfg.lut_quantized
        assert (m.lut_scale is not None) == cfg.lut_quantized


def _torch_ao(cfg):
    tq = pytest.importorskip("torch.ao.quantization")
    from idkm_plugin.integrations import torch_ao as ita

    model = ita.assign_qconfigs(Net(), ModelConfig(default=cfg), mapping=ita.qat_module_mapping())
    qat = _train(tq.prepare_qat(model, mapping=ita.qat_module_mapping()))
    expected = qat.eval()(*_inputs())
    return tq.convert(qat, mapping=ita.palettize_mapping()), expected


def _torchao(cfg):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from idkm_plugin.integrations import torchao as ito

    model = Net()
    quantize_(model, ito.IDKMQATConfig(cfg), filter_fn=ito.clusterable)
    expected = _train(model).eval()(*_inputs())
    quantize_(model, ito.IDKMQATConfig(step="convert"), filter_fn=ito.clusterable)
    return model, expected


def _brevitas(cfg):
    pytest.importorskip("brevitas")
    from idkm_plugin.integrations import brevitas as ib

    model = _train(ib.quantize_model(Net(), ModelConfig(default=cfg)))
    expected = model.eval()(*_inputs())
    return ib.palettize(model), expected


@pytest.mark.parametrize("flow", [_torch_ao, _torchao, _brevitas], ids=["torch.ao", "torchao", "brevitas"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_equals_eval_qat_exactly(flow, name):
    cfg = CONFIGS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        deployed, expected = flow(cfg)
    _check_converted(deployed, cfg)
    assert torch.equal(deployed(*_inputs()), expected)


def test_pt2e_converted_equals_eval_qat_exactly():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from idkm_plugin.integrations.torch_ao import (IDKMQuantizer, convert_pt2e_palettized,
                                                   pt2e_eval, pt2e_train)

    cfg = CONFIGS["rms scale + int8 LUT + grouped"]
    exported = torch.export.export(Net().train(), _inputs()).module()
    qat = pt2e_train(prepare_qat_pt2e(exported, IDKMQuantizer(ModelConfig(default=cfg))))
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        qat(*_inputs()).square().mean().backward()
        opt.step()
    expected = pt2e_eval(qat)(*_inputs())
    deployed = convert_pt2e_palettized(qat)
    weights = list(palettized_parameters(deployed).values())
    assert weights and all(w.channel_scale is not None and w.lut.dtype == torch.int8 for w in weights)
    assert torch.equal(deployed(*_inputs()), expected)


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as stored: a palettized weight as its codes, LUT, scales and mask ("fc.weight.codes")."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, PalettizedTensor):
            out.update({f"{key}.{name}": t for name, t in value.inner_tensors().items()})
        else:
            out[key] = value
    return out


def _palettized_net(cfg):
    model = Net()
    for name in ["emb", "conv1", "conv2", "fc", "head"]:
        layer = model.get_submodule(name)
        clusterer = WeightClusterer(cfg, name)
        clusterer(layer.weight)
        setattr(model, name, palettize_module(layer, clusterer))
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_is_exact_and_size_counts_scales(tmp_path, name):
    cfg = CONFIGS[name]
    model = _palettized_net(cfg)
    save_palettized(model, tmp_path / "m.safetensors")
    loaded = load_palettized(tmp_path / "m.safetensors", Net())
    theirs = _stored(loaded)
    for key, value in _stored(model).items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
    assert torch.equal(loaded(*_inputs()), model(*_inputs()))
    report = size_report(model)
    for layer in report.layers:
        m = model.get_submodule(layer.name).weight
        row = math.prod(m.weight_shape[1:])
        scales = m.weight_shape[0] * row // cfg.scale_block(row) * bool(cfg.per_channel_scale)
        assert layer.scale_bytes == cfg.scale_torch_dtype.itemsize * scales + 4 * m.groups_lut * cfg.lut_quantized
        assert layer.lut_bytes == m.lut.numel() * (1 if cfg.lut_quantized else 4)
        # the plan's arithmetic is the converted module's
        assert layer.code_bytes + layer.lut_bytes + layer.scale_bytes == cfg.palettized_nbytes(m.weight_shape)
    stored = sum(t.numel() * t.element_size() for t in _stored(model).values())
    assert report.total_bytes == stored


@pytest.mark.parametrize("name", ["rms scale + int8 LUT + grouped", "float16 scale", "float16 block scales"])
def test_torch_export_decode_applies_the_scales(name):
    from idkm_plugin.export.executorch_export import export_program

    model = _palettized_net(CONFIGS[name])
    program = export_program(model, _inputs())
    assert torch.equal(program.module()(*_inputs()), model(*_inputs()))


@pytest.mark.parametrize("name", ["rms scale + int8 LUT + grouped", "float16 scale"])
def test_coreml_weights_with_scales_and_int8_luts_equal_dequantize_weight(name):
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed (extra: coreml)")
    from coremltools.optimize._utils import lut_to_dense

    from idkm_plugin.export import to_coreml

    model = _palettized_net(CONFIGS[name])
    mlmodel = to_coreml(model, _inputs(), compute_precision=ct.precision.FLOAT32)
    ops = [op for function in mlmodel._mil_program.functions.values() for op in function.operations]
    checked = set()
    for op in ops:
        if op.op_type != "constexpr_lut_to_dense":
            continue
        # coremltools folds the per-channel scale into the LUT (constexpr_blockwise_shift_scale feeding `lut`)
        lut = op.inputs["lut"].val
        if lut is None:
            assert op.inputs["lut"].op.op_type == "constexpr_blockwise_shift_scale"
            lut = op.inputs["lut"].op.materialized_val_inference()
        axis = op.inputs.get("vector_axis")
        name = op.name.split("_weight")[0]
        layer = model.get_submodule(name)
        weight = torch.from_numpy(lut_to_dense(op.inputs["indices"].val, lut, None if axis is None else axis.val))
        assert torch.equal(weight.reshape(layer.weight.weight_shape), layer.weight.dequantize()), name
        checked.add(name)
    assert checked == {"emb", "conv1", "conv2", "fc", "head"}


def test_tied_weight_scales_are_stored_once_and_tied_again(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = Tied()
    clusterer = WeightClusterer(CONFIGS["rms scale + int8 LUT + grouped"], "embed")
    clusterer(model.embed.weight)
    model.embed, model.head = (palettize_module(model.embed, clusterer), palettize_module(model.head, clusterer))
    for name in ("codes", "lut", "channel_scale", "lut_scale"):
        assert getattr(model.head.weight, name) is getattr(model.embed.weight, name), name
    save_palettized(model, tmp_path / "tied.safetensors")
    loaded = load_palettized(tmp_path / "tied.safetensors", Tied())
    assert loaded.head.weight.channel_scale is loaded.embed.weight.channel_scale
    assert loaded.head.weight.lut_scale is loaded.embed.weight.lut_scale
    ids = torch.randint(0, 16, (2, 3))
    assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("name", ["rms scale + int8 LUT + grouped", "float16 scale", "float16 block scales"])
def test_executorch_program_applies_the_scales(tmp_path, name):
    pytest.importorskip("executorch.runtime")
    from executorch.runtime import Runtime

    from idkm_plugin.export import to_executorch

    model = _palettized_net(CONFIGS[name])
    to_executorch(model, _inputs(), tmp_path / "m.pte")
    out = Runtime.get().load_program(tmp_path / "m.pte").load_method("forward").execute(list(_inputs()))[0]
    # XNNPACK's GEMMs sum in another order than PyTorch's: equal up to float32 rounding
    torch.testing.assert_close(out, model(*_inputs()), rtol=1e-5, atol=1e-6)


def test_float16_scales_are_rounded_in_training_and_straight_through():
    w = (torch.randn(6, 10, generator=torch.Generator().manual_seed(5)) * 0.03).requires_grad_()
    half = WeightClusterer(ClusterConfig(bits=2, per_channel_scale="max_abs", scale_dtype="float16"), "fc")
    full = WeightClusterer(ClusterConfig(bits=2, per_channel_scale="max_abs"), "fc")
    scale = half.channel_scale(w)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.half().float())
    assert not torch.equal(scale, full.channel_scale(w))  # really rounded
    scale.sum().backward()
    full_grad = torch.autograd.grad(full.channel_scale(w).sum(), w)[0]
    assert torch.equal(w.grad, full_grad)  # the cast passes the gradient through unchanged
    assert half.scales(w.detach())["channel_scale"].dtype == torch.float16


def test_float16_scale_gradient_beyond_float16_range_stays_exact():
    """A tiny channel (MobileNet's depthwise convs have them) gives its scale a gradient far beyond float16's
    65,504; the straight-through cast must not round or overflow it (it used to pass through float16: NaN)."""
    w = torch.tensor([[1e-3, -4e-4, 2e-4], [0.5, -0.2, 0.1]], requires_grad=True)
    half = WeightClusterer(ClusterConfig(bits=2, per_channel_scale="max_abs", scale_dtype="float16"), "dw")
    full = WeightClusterer(ClusterConfig(bits=2, per_channel_scale="max_abs"), "dw")
    upstream = torch.tensor([1e6, 1.0])
    (half.channel_scale(w) * upstream).sum().backward()
    full_grad = torch.autograd.grad((full.channel_scale(w) * upstream).sum(), w)[0]
    assert torch.isfinite(w.grad).all() and torch.equal(w.grad, full_grad)
    w.grad = None
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 1e4
    (half(w) * g).sum().backward()
    assert torch.isfinite(w.grad).all()


def test_float16_scale_overflow_names_the_layer():
    clusterer = WeightClusterer(ClusterConfig(bits=2, per_channel_scale="max_abs", scale_dtype="float16"), "big.fc")
    with pytest.raises(ValueError, match=r"big\.fc.*1e\+05.*scale_dtype='float16'"):
        clusterer.channel_scale(torch.full((2, 3), 1e5))
    with pytest.raises(ValueError, match="scale_dtype"):
        ClusterConfig(scale_dtype="bfloat16")


# ---- block scales (scale_block_size) ----------------------------------------------------------------------------
def test_scale_block_is_the_largest_divisor_not_above_the_size():
    cfg = ClusterConfig(per_channel_scale="max_abs", scale_block_size=128)
    assert [cfg.scale_block(n) for n in (2048, 1536, 576, 100)] == [128, 128, 96, 100]
    assert ClusterConfig(per_channel_scale="max_abs").scale_block(576) == 576  # 0: the whole row
    with pytest.raises(ValueError, match="scale_block_size=32 is not allowed with per_channel_scale=False"):
        ClusterConfig(scale_block_size=32)
    with pytest.raises(ValueError, match="scale_block_size=-1"):
        ClusterConfig(per_channel_scale="max_abs", scale_block_size=-1)


@pytest.mark.parametrize("kind", ["max_abs", "rms"])
def test_block_scales_are_the_max_or_rms_of_each_block(kind):
    w = _uneven((3, 12)).float()
    clusterer = WeightClusterer(ClusterConfig(bits=2, per_channel_scale=kind, scale_block_size=4), "fc")
    scale = clusterer.channel_scale(w)
    blocks = w.view(3, 3, 4)
    expected = blocks.abs().amax(2) if kind == "max_abs" else blocks.square().mean(2).sqrt()
    assert scale.shape == (3, 3) and torch.allclose(scale, expected)
    assert clusterer.scales(w)["channel_scale"].shape == (3, 3)
    whole_rows = WeightClusterer(ClusterConfig(bits=2, per_channel_scale=kind, scale_block_size=16), "fc")
    assert torch.equal(whole_rows.channel_scale(w), WeightClusterer(clusterer.config.replace(scale_block_size=0),
                                                                    "fc").channel_scale(w))  # [out]: per channel


def test_a_row_without_a_usable_block_names_the_layer():
    clusterer = WeightClusterer(ClusterConfig(bits=2, per_channel_scale="max_abs", scale_block_size=32), "model.fc")
    with pytest.raises(ValueError, match=r"model\.fc: scale_block_size=32 is not allowed for rows of 37 weights"):
        clusterer(torch.randn(4, 37))


@pytest.mark.parametrize("method", ["dkm", "idkm"])
def test_clustered_weight_is_differentiable_through_the_block_scales(method):
    cfg = ClusterConfig(method=method, bits=2, tau=0.3, max_iter=200 if method != "dkm" else 4, tol=1e-13,
                        per_channel_scale="max_abs", scale_block_size=3, uniquify="off", adjoint_tol=1e-12,
                        adjoint_max_iter=500)
    c0 = torch.tensor([[[-0.8], [-0.2], [0.3], [0.9]]], dtype=torch.float64)

    def clustered(w):
        clusterer = WeightClusterer(cfg)
        clusterer.centroids = c0.clone()
        return clusterer(w)

    w = _uneven((3, 6)).requires_grad_()
    assert torch.autograd.gradcheck(clustered, (w,), eps=1e-6, atol=1e-5, rtol=1e-4, check_undefined_grad=False,
                                    nondet_tol=1e-9)


def test_block_scales_cluster_better_than_channel_scales():
    # rows whose halves differ in scale by 100x: one scale per row wastes the LUT on the large half
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[:, 32:] *= 0.01
    errors = []
    for block in (0, 32):
        clusterer = WeightClusterer(ClusterConfig(bits=2, max_iter=20, per_channel_scale="max_abs",
                                                  scale_block_size=block), "fc")
        clusterer(w)
        errors.append(float((clusterer.eval()(w) - w)[:, 32:].norm()))
    assert errors[1] < 0.2 * errors[0]


def test_lut_linear_with_block_scales_equals_the_decoded_weight():
    from idkm_plugin.nn.lut_linear import lut_linear

    model = _palettized_net(CONFIGS["float16 block scales"])
    w = model.fc.weight
    x = torch.randn(3, w.shape[1])
    expected = F.linear(x, w.dequantize(), model.fc.bias)
    got = lut_linear(x, w.codes, w.lut, w.bits, w.shape[0], w.shape[1], channel_scale=w.channel_scale,
                     bias=model.fc.bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the native kernel sums in its own order


def test_palettized_tensor_rejects_scales_of_another_layout():
    w = _palettized_net(CONFIGS["float16 block scales"]).fc.weight
    with pytest.raises(ValueError, match=r"channel_scale \[16, 3\] does not match a \[16, 140\] weight"):
        PalettizedTensor.build(w.codes, w.lut, w.spec, torch.ones(16, 3))


def test_coreml_export_of_block_scales_is_refused_by_name():
    pytest.importorskip("coremltools", reason="coremltools is not installed (extra: coreml)")
    from idkm_plugin.export import to_coreml

    model = _palettized_net(CONFIGS["float16 block scales"])
    with pytest.raises(ValueError, match=r"emb: block scales \[10, 2\] \(scale_block_size\) have no Core ML export"):
        to_coreml(model, _inputs())


@pytest.mark.parametrize("codec", ["raw", "huffman"])
def test_block_scales_survive_both_codecs_exactly(tmp_path, codec):
    model = _palettized_net(CONFIGS["float16 block scales"])
    save_palettized(model, tmp_path / "m.safetensors", codec=codec)
    loaded = load_palettized(tmp_path / "m.safetensors", Net())
    for name in ("emb", "conv1", "conv2", "fc", "head"):
        ours, theirs = model.get_submodule(name).weight, loaded.get_submodule(name).weight
        assert ours.channel_scale.dim() == 2 and torch.equal(theirs.channel_scale, ours.channel_scale), name
    assert torch.equal(loaded(*_inputs()), model(*_inputs()))
