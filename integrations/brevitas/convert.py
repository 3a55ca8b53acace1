"""`palettize(model)`: trained Brevitas layers with a clustering weight quantizer -> palettized layers."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from idkm_plugin.layers import palettize_module

from ._import import import_brevitas
from .proxy import ClusterWeightQuantProxy, check_layer_supported

import_brevitas()
from brevitas.quant_tensor import _unpack_quant_tensor  # noqa: E402


class ActQuantPalettized(nn.Module):
    """A palettized layer between the Brevitas activation quantizers its source layer had.

    forward(x) = output_quant(layer(input_quant(x))), each quantizer's fake-quantized float value;
    the quantizers are the trained Brevitas proxies (moved, not copied), so scales are kept.
    """

    def __init__(self, layer: nn.Module, input_quant: Optional[nn.Module],
                 output_quant: Optional[nn.Module]) -> None:
        super().__init__()
        self.input_quant = input_quant
        self.layer = layer
        self.output_quant = output_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = _unpack_quant_tensor(self.input_quant(x))
        y = self.layer(x)
        if self.output_quant is not None:
            y = _unpack_quant_tensor(self.output_quant(y))
        return y


def _enabled(proxy: Optional[nn.Module]) -> Optional[nn.Module]:
    return proxy if proxy is not None and proxy.is_quant_enabled else None


def palettize_layer(layer: nn.Module, name: str = "layer") -> nn.Module:
    """One Brevitas layer whose `weight_quant` is a clustering quantizer -> its deployed form.

    The layer becomes its float class (QuantLinear -> nn.Linear) whose weight is packed codes + LUT (the
    quantizer's eval-mode hard weight, bit for bit);
    a quantized bias is stored as its fake-quantized value; enabled input / output quantizers
    are kept around the palettized layer (`ActQuantPalettized`).
    """
    proxy = layer.weight_quant
    if not isinstance(proxy, ClusterWeightQuantProxy):
        raise ValueError(f"{name}: weight_quant is {type(proxy).__name__}, not a clustering quantizer")
    check_layer_supported(layer, name)
    if getattr(layer, "is_same_padded_strided", False):
        raise ValueError(f"{name}: padding='same' with stride > 1 (Brevitas' own padding path) cannot be palettized; "
                         "use explicit padding")
    bias = None
    bias_quant = _enabled(getattr(layer, "bias_quant", None))
    if bias_quant is not None and layer.bias is not None:
        with torch.no_grad():
            bias = _unpack_quant_tensor(bias_quant(layer.bias))
    palettized = palettize_module(layer, proxy.clusterer, weight=layer.weight, bias=bias)
    input_quant = _enabled(getattr(layer, "input_quant", None))
    output_quant = _enabled(getattr(layer, "output_quant", None))
    if input_quant is None and output_quant is None:
        return palettized
    return ActQuantPalettized(palettized, input_quant, output_quant)


def palettize(model: nn.Module) -> nn.Module:
    """Swap every layer quantized by IDKM/DKM/JFBWeightQuant for its palettized form, in place.

    Returns the model (a new module when `model` itself is such a layer). In eval mode the result
    computes exactly what the Brevitas model computes.
    """
    if _is_clustered(model):
        return palettize_layer(model, type(model).__name__)
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if _is_clustered(child):
                full = f"{name}.{child_name}" if name else child_name
                if child.training:
                    warnings.warn(f"{full}: converted in train mode; the converted layer computes what eval mode "
                                  "computes (call model.eval() before palettize)", stacklevel=2)
                setattr(module, child_name, palettize_layer(child, full))
                converted.append(full)
    if not converted:
        warnings.warn(f"palettize: {type(model).__name__} has no layer with an enabled clustering weight quantizer "
                      "(IDKM/DKM/JFBWeightQuant); nothing was converted", stacklevel=2)
    return model


def _is_clustered(module: nn.Module) -> bool:
    proxy = getattr(module, "weight_quant", None)
    return isinstance(proxy, ClusterWeightQuantProxy) and proxy.is_quant_enabled
