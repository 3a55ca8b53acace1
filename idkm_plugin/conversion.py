"""Conversion: a trained layer and its clusterer -> the float layer with a palettized weight.

Every toolkit converts through `palettize_module`, so every flow produces the same form: the layer's float class
(`nn.Linear` stays `nn.Linear`; a QAT or fake-quantized subclass becomes the plain float class) whose `weight` is a
`PalettizedTensor` that the clusterer exported once. A tied weight (one Parameter in several layers) has one
clusterer and converts to one shared Parameter.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .clusterer import WeightClusterer
from .layer_kinds import LayerKind, kind_of, layer_kinds, subclass_instance

__all__ = ["float_layer", "palettize_module"]

# attributes the QAT toolkits leave on a layer, which the converted float layer must not carry
_QAT_ATTRIBUTES = ("qconfig", "freeze_bn", "weight_fake_quant", "activation_post_process", "weight_clusterer",
                   "_idkm_fqn")


def float_layer(module: nn.Module, kind: LayerKind) -> nn.Module:
    """A new instance of the kind's float class sharing `module`'s parameters, buffers and attributes, without the
    QAT toolkits' child modules, hooks and attributes (`module` itself is left as it is)."""
    layer = subclass_instance(module, kind.float_type)
    layer._modules = {}
    layer._forward_hooks, layer._forward_pre_hooks = type(layer._forward_hooks)(), type(layer._forward_pre_hooks)()
    for name in _QAT_ATTRIBUTES:
        layer.__dict__.pop(name, None)
    return layer


def palettize_module(module: nn.Module, clusterer: WeightClusterer, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> nn.Module:
    """The converted layer: `module`'s float class with its weight palettized by `clusterer`.

    weight / bias override the module's own (e.g. with BatchNorm folded in; weight laid out [out, ...]); the codes
    are the hard nearest-centroid assignment of that weight, so the result computes what the eval-mode QAT layer
    does. Scales and a pruning mask come with it. `module` (float, QAT or fake-quantized) is not modified.
    """
    kind = kind_of(module, exact=False)
    if kind is None:
        supported = ", ".join(k.name for k in layer_kinds())
        raise ValueError(f"{type(module).__name__} cannot be palettized; supported: {supported}")
    kind.check(module, clusterer.name)
    weight = kind.clustered_weight(module) if weight is None else weight
    layer = float_layer(module, kind)
    layer.weight = clusterer.export_parameter(weight, transposed=kind.transposed)
    bias = getattr(module, "bias", None) if bias is None else bias
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer
