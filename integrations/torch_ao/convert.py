"""Eager `convert`: QAT modules with an `IDKMFakeQuantize` weight -> palettized modules.

    deployed = torch.ao.quantization.convert(qat.eval(), mapping=palettize_mapping())

torch.ao's `convert` calls `mapping[type(module)].from_float(module)` on every module that has a
qconfig; the targets here build `idkm_plugin.nn.Palettized*` modules (packed codes + LUT) from the
trained clusterer. Fused QAT modules fold their BatchNorm (running statistics) into the weight
and bias before the codes are taken, and keep their ReLU; an activation fake-quant the QAT module
carried is kept, frozen, after the layer, so the converted model computes what the eval-mode QAT
model computes.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import DeQuantStub, FakeQuantizeBase, QuantStub

from idkm_plugin.layers import kind_of, palettize_module

from .assign import clusterable_types
from .fake_quantize import IDKMFakeQuantize
from .qat import qat_module_mapping

__all__ = ["FrozenActivationFakeQuant", "folded_weight_and_bias", "palettize_mapping", "palettize_qat_module",
           "qat_types"]

_RELU_TYPES = (nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d, nniqat.ConvReLU1d, nniqat.ConvReLU2d, nniqat.LinearReLU)
_BN_TYPES = (nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d, nniqat.LinearBn1d)


def qat_types() -> tuple[type, ...]:
    """The QAT classes `qat_module_mapping()` turns clusterable float (and fused) layers into."""
    mapping = qat_module_mapping()
    return tuple({mapping[t] for t in clusterable_types() if t in mapping})


def folded_weight_and_bias(mod: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight handed to the fake-quant in eval mode, and the bias that goes with it.

    For ConvBn* / LinearBn1d that is the BatchNorm-scaled weight W * gamma / sqrt(var + eps)
    (computed exactly as torch.ao's fused QAT forward does, so the hard codes agree) and the
    folded bias beta + (b - running_mean) * gamma / sqrt(var + eps); otherwise the layer's own.
    """
    if not isinstance(mod, _BN_TYPES):
        return kind_of(mod, exact=False).clustered_weight(mod), getattr(mod, "bias", None)
    bn = mod.bn
    running_std = torch.sqrt(bn.running_var + bn.eps)
    scale_factor = bn.weight / running_std
    shape = [-1] + [1] * (mod.weight.dim() - 1)
    weight = mod.weight * scale_factor.reshape(shape)
    conv_bias = mod.bias if mod.bias is not None else torch.zeros_like(bn.running_mean)
    bias = bn.bias + (conv_bias - bn.running_mean) * scale_factor
    return weight.detach(), bias.detach()


class FrozenActivationFakeQuant(nn.Module):
    """An activation fake-quant with its trained scale / zero point frozen (no observer).

    Computes what torch.ao's FakeQuantize computes in eval mode with its observer disabled;
    x -> x of the same shape. (A frozen copy of the FakeQuantize itself would not survive
    `convert`, which strips every `activation_post_process`, including the fake-quant's observer.)
    """

    def __init__(self, fq: nn.Module) -> None:
        super().__init__()
        if not all(hasattr(fq, a) for a in ("scale", "zero_point", "quant_min", "quant_max")):
            raise ValueError(f"activation fake-quant {type(fq).__name__} has no scale / zero_point / quant range; "
                             "supported: torch.ao FakeQuantize and its subclasses")
        self.register_buffer("scale", fq.scale.detach().clone())
        self.register_buffer("zero_point", fq.zero_point.detach().clone())
        self.quant_min, self.quant_max = int(fq.quant_min), int(fq.quant_max)
        self.ch_axis = int(getattr(fq, "ch_axis", -1))
        self.per_channel = bool(getattr(fq, "is_per_channel", False))
        self.enabled = bool(fq.fake_quant_enabled[0] == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.ch_axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        return f"quant_min={self.quant_min}, quant_max={self.quant_max}, per_channel={self.per_channel}"


def _frozen_activation(mod: nn.Module) -> Optional[nn.Module]:
    """The module's activation fake-quant, frozen, or None (weight-only: placeholder / observer only)."""
    act = getattr(mod, "activation_post_process", None)
    return FrozenActivationFakeQuant(act) if isinstance(act, FakeQuantizeBase) else None


def palettize_qat_module(mod: nn.Module) -> nn.Module:
    """One QAT module (weight fake-quant = IDKMFakeQuantize) -> its palettized form.

    Returns the float layer with a palettized weight, or `nn.Sequential(palettized, [nn.ReLU()], [frozen act fake-quant])`.
    """
    fq = getattr(mod, "weight_fake_quant", None)
    if not isinstance(fq, IDKMFakeQuantize):
        raise ValueError(f"{type(mod).__name__} has weight fake-quant {type(fq).__name__}, not IDKMFakeQuantize; "
                         "convert it with torch.ao's own mapping, or give it an idkm_qconfig")
    clusterer = fq.clusterer
    if mod.training:
        warnings.warn(f"{clusterer.name}: converted in train mode; the converted layer computes what eval mode "
                      "computes (call model.eval() before convert)", stacklevel=2)
    if not clusterer.active():
        warnings.warn(f"{clusterer.name}: clustering was not active during training (fake quant disabled or "
                      f"step {int(clusterer.step)} < start_step {clusterer.config.start_step}); palettizing with "
                      "the LUT as it stands (initialised from the weight if needed)", stacklevel=2)
    weight, bias = folded_weight_and_bias(mod)
    with torch.no_grad():
        layer = palettize_module(mod, clusterer, weight=weight, bias=bias)
    tail = [nn.ReLU()] if isinstance(mod, _RELU_TYPES) else []
    act = _frozen_activation(mod)
    tail += [act] if act is not None else []
    return nn.Sequential(layer, *tail) if tail else layer


class _PalettizeQAT:
    """Mapping target for QAT modules: `from_float(qat_module)` -> palettized module."""

    @classmethod
    def from_float(cls, mod: nn.Module) -> nn.Module:
        return palettize_qat_module(mod)


class _Unprepared:
    """Mapping target for float layers: refuses to let a layer given an IDKM qconfig stay float."""

    @classmethod
    def from_float(cls, mod: nn.Module) -> nn.Module:
        qconfig = getattr(mod, "qconfig", None)
        if qconfig is not None and isinstance(qconfig.weight(), IDKMFakeQuantize):
            raise ValueError(f"a {type(mod).__name__} with an idkm qconfig was never prepared for QAT (it would stay "
                             "float): torch.ao's default QAT mapping lacks Conv1d, ConvReLU1d and Embedding; use "
                             "prepare_qat(model, mapping=qat_module_mapping())")
        return mod


class _QuantStubToActivation:
    """QuantStub -> its frozen input fake-quant (or Identity when activations are not quantized)."""

    @classmethod
    def from_float(cls, mod: nn.Module) -> nn.Module:
        act = _frozen_activation(mod)
        return nn.Identity() if act is None else act


class _ToIdentity:
    @classmethod
    def from_float(cls, mod: nn.Module) -> nn.Module:
        return nn.Identity()


def palettize_mapping() -> dict[type, Any]:
    """The `mapping=` for `torch.ao.quantization.convert(qat.eval(), mapping=palettize_mapping())`."""
    mapping: dict[type, Any] = {t: _Unprepared for t in clusterable_types()}
    mapping.update({t: _PalettizeQAT for t in qat_types()})
    mapping.update({QuantStub: _QuantStubToActivation, DeQuantStub: _ToIdentity})
    return mapping
