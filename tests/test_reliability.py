"""Bad inputs and edge cases through every flow: clear errors naming the layer, exact bf16 parity, resume."""
import copy

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("brevitas")

import brevitas.nn as qnn  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig, soft_kmeans  # noqa: E402
from idkm_plugin.integrations import brevitas as ib  # noqa: E402
from idkm_plugin.integrations import torch_ao as ita  # noqa: E402
from idkm_plugin.integrations import torchao as ito  # noqa: E402

FAST = dict(bits=2, max_iter=5)


class Net(nn.Module):
    """conv (1->4, 3x3) + linear (64->5). x [N, 1, 6, 6] -> [N, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _torch_ao(model: nn.Module, cfg=ClusterConfig(**FAST)) -> nn.Module:
    return tq.prepare_qat(ita.assign_qconfigs(model, cfg).train())


def _torchao(model: nn.Module, cfg=ClusterConfig(**FAST)) -> nn.Module:
    quantize_(model, ito.IDKMQATConfig(cfg), filter_fn=ito.clusterable)
    return model.train()


def _brevitas(model: nn.Module, cfg=ClusterConfig(**FAST)) -> nn.Module:
    return ib.quantize_model(model, ModelConfig(default=cfg)).train()


PREPARE = {"torch.ao": _torch_ao, "torchao": _torchao, "brevitas": _brevitas}
CONVERT = {"torch.ao": lambda m: tq.convert(m, mapping=ita.palettize_mapping()),
           "torchao": lambda m: (quantize_(m, ito.IDKMQATConfig(step="convert"), filter_fn=ito.clusterable), m)[1],
           "brevitas": ib.palettize}


def _x(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("flow", PREPARE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named_at_the_first_step(flow, bad):
    model = _net()
    with torch.no_grad():
        model.fc.weight[0, :3] = bad
    qat = PREPARE[flow](model)
    kind = "NaN" if bad != bad else "Inf"
    counts = "3 NaN and 0 Inf" if kind == "NaN" else "0 NaN and 3 Inf"
    with pytest.raises(ValueError, match=rf"fc.*weight has {counts} entries .* at clustering step 1"):
        qat(_x())


@pytest.mark.parametrize("flow", PREPARE)
def test_nan_appearing_mid_training_is_named_and_the_lut_survives(flow):
    qat = PREPARE[flow](_net())
    qat(_x()).sum().backward()
    clusterers = {n: m for n, m in qat.named_modules() if type(m).__name__ == "WeightClusterer"}
    luts = {n: c.centroids.clone() for n, c in clusterers.items()}
    fc_weight = next(p for n, p in qat.named_parameters() if n.startswith("fc") and n.endswith("weight"))
    with torch.no_grad():
        fc_weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"fc.*1 NaN and 0 Inf entries \(of 320\) at clustering step 2"):
        qat(_x())
    for n, c in clusterers.items():
        assert torch.isfinite(c.centroids).all() and (not n.startswith("fc") or torch.equal(c.centroids, luts[n]))


def test_non_finite_gradient_is_named_in_backward():
    qat = _torch_ao(_net())
    out = qat(_x())
    with pytest.raises(ValueError, match=r"fc: the gradient of the clustered weight has 320 NaN"):
        (out * float("nan")).sum().backward()


@pytest.mark.parametrize("tau", [float("inf"), float("nan"), -1.0])
def test_tau_must_be_finite_and_positive_everywhere(tau):
    with pytest.raises(ValueError, match=r"ClusterConfig.tau=.* expected a finite positive float"):
        ClusterConfig(tau=tau)
    x = torch.randn(32, 1)
    with pytest.raises(ValueError, match="soft_kmeans: tau=.* finite positive"):
        soft_kmeans(x, x[:4].clone(), tau=tau)
    with pytest.raises(ValueError, match="ClusterConfig.tau"):
        qnn.QuantLinear(8, 4, weight_quant=ib.IDKMWeightQuant, weight_tau=tau)
    with pytest.raises(ValueError, match="ClusterConfig.tau"):
        ita.idkm_qconfig(tau=tau)


@pytest.mark.parametrize("flow", PREPARE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lut_dtype", ["float32", "float16", "bfloat16"])
def test_half_precision_model_converts_exactly(flow, dtype, lut_dtype):
    qat = PREPARE[flow](_net(dtype), ClusterConfig(bits=3, max_iter=5, lut_dtype=lut_dtype))
    x = _x(dtype)
    qat(x).float().square().mean().backward()
    qat.eval()
    expected = qat(x)
    deployed = CONVERT[flow](qat)
    got = deployed(x)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_by_type_typo_lists_the_layer_types_of_the_model(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("default: {bits: 2}\nby_type:\n  Linaer: {bits: 4}\n")
    mc = ModelConfig.from_yaml(str(path))
    for prepare in (lambda m: ita.assign_qconfigs(m, mc), lambda m: ito.fqn_to_config(mc, m),
                    lambda m: ib.quantize_model(m, mc)):
        with pytest.raises(ValueError, match=r"by_type \['Linaer'\] names no layer type .* \['Conv2d', 'Linear'\]"):
            prepare(_net())


def test_by_name_that_matches_nothing_warns_once_or_fails_when_strict():
    mc = ModelConfig(default=ClusterConfig(bits=2), by_name={"fc2": None, r"re:head\..*": ClusterConfig(bits=4)})
    for prepare in (lambda m, c: ita.assign_qconfigs(m, c), lambda m, c: ito.fqn_to_config(c, m),
                    lambda m, c: ib.resolve_layers(m, c)):
        with pytest.warns(UserWarning) as caught:
            prepare(_net(), mc)
        ours = [str(w.message) for w in caught if "matches no clusterable layer" in str(w.message)]
        assert ours == ["ModelConfig by_name 'fc2' matches no clusterable layer of this model; it has no effect",
                        "ModelConfig by_name 're:head\\\\..*' matches no clusterable layer of this model; it has no "
                        "effect"]
        strict = ModelConfig(default=mc.default, by_name=dict(mc.by_name), strict=True)
        with pytest.raises(ValueError, match=r"by_name 'fc2' matches no clusterable layer.*\['conv', 'fc'\]"):
            prepare(_net(), strict)


@pytest.mark.parametrize("activation", [None, tq.default_fake_quant])
def test_stock_torch_ao_convert_says_to_pass_our_mapping(activation):
    qat = tq.prepare_qat(ita.assign_qconfigs(_net(), ClusterConfig(**FAST), activation=activation).train())
    qat(_x())
    with pytest.raises(ValueError, match=r"conv: torch.ao.quantization.convert was called without our mapping.*"
                                         r"mapping=palettize_mapping\(\)"):
        tq.convert(qat.eval())


def _train(model: nn.Module, steps: int, opt: torch.optim.Optimizer) -> None:
    for step in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("flow", PREPARE)
@pytest.mark.parametrize("method", ["idkm", "dkm"])
def test_resume_from_state_dict_is_bit_exact(flow, method, tmp_path):
    cfg = ClusterConfig(bits=2, max_iter=5, method=method)
    straight = PREPARE[flow](_net(), cfg)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    _train(straight, 10, opt)

    first = PREPARE[flow](_net(), cfg)
    opt = torch.optim.Adam(first.parameters(), lr=1e-2)
    _train(first, 5, opt)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    resumed = PREPARE[flow](_net(), cfg)
    opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    # steps 5..9 with the same data as the uninterrupted run
    for step in range(5, 10):
        x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        resumed(x).square().mean().backward()
        opt.step()
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert any(k.endswith("centroids") for k in want)


def test_loading_a_state_dict_converted_with_other_bits_names_both_configs():
    def converted(cfg):
        qat = _torchao(_net(), cfg)
        qat(_x())
        return CONVERT["torchao"](qat.eval())

    two_bit = converted(ClusterConfig(bits=2, max_iter=3))
    four_bit_dim2 = converted(ClusterConfig(bits=4, dim=2, max_iter=3))
    # torch's load_state_dict names the parameter and wraps the palettized weight's ValueError in a RuntimeError
    with pytest.raises(RuntimeError, match=r"parameter named \"conv.weight\".*the state_dict's palettized weight "
                                           r"\(PaletteSpec\(bits=4, dim=2, .*lut_groups=1.*does not match this one "
                                           r"\(PaletteSpec\(bits=2, dim=1, .*lut_groups=1"):
        two_bit.load_state_dict(four_bit_dim2.state_dict())
