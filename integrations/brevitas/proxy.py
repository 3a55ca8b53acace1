"""The tensor quantizer and weight proxy behind the clustering injectors.

Brevitas' stock weight proxy wraps whatever `tensor_quant` returns into an `IntQuantTensor`
(value, scale, zero_point, bit_width): an integer grid. A k-means lookup table is not one (its
entries are arbitrary floats), so `ClusterWeightQuantProxy` returns the clustered weight as a
plain tensor and never claims integer metadata. Layers that would need that metadata (an
integer output QuantTensor, or a bias quantizer scaled by input_scale * weight_scale) are
refused with a ValueError instead of computing wrong scales.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ClusterConfig

from ._import import import_brevitas

import_brevitas()
from brevitas import config as brevitas_config  # noqa: E402
from brevitas.core.function_wrapper.misc import Identity  # noqa: E402
from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjectorBase  # noqa: E402


class ClusterTensorQuant(nn.Module):
    """`tensor_quant` of the clustering injectors: one `WeightClusterer`.

    forward(weight [out, ...]) -> clustered weight, same shape: soft and differentiable in
    training, the hard nearest-centroid weight in eval (what `palettize` deploys).
    """

    def __init__(self, cluster_config: ClusterConfig, layer_name: str = "weight") -> None:
        super().__init__()
        self.clusterer = WeightClusterer(cluster_config, name=layer_name)
        self.register_load_state_dict_post_hook(_ignore_missing_clusterer_keys)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.clusterer(weight)


_CLUSTERER_KEYS = tuple(f"tensor_quant.clusterer.{b}" for b in ("centroids", "step", "mask"))


def _ignore_missing_clusterer_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Like Brevitas' own quantizer state: with `brevitas.config.IGNORE_MISSING_KEYS` (set by
    layerwise_quantize while loading a float layer's weights), a missing clusterer state is fine."""
    if brevitas_config.IGNORE_MISSING_KEYS:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.endswith(_CLUSTERER_KEYS)]


class ClusterWeightQuantProxy(WeightQuantProxyFromInjectorBase):
    """Weight proxy returning a plain tensor; `bit_width()` reports the code width (log2 of the LUT size)."""

    def __init__(self, quant_layer: nn.Module, quant_injector: Any) -> None:
        super().__init__(quant_layer, quant_injector)
        self.skip_create_quant_tensor = True

    def init_tensor_quant(self, preserve_state_dict: bool = False) -> None:
        super().init_tensor_quant(preserve_state_dict)
        if self.tensor_quant is not None:
            for weight in self.tracked_parameter_list:
                self.tensor_quant.clusterer.check_weight(weight)

    @property
    def clusterer(self) -> WeightClusterer:
        return self.tensor_quant.clusterer

    @property
    def cluster_config(self) -> ClusterConfig:
        return self.clusterer.config

    @property
    def input_view_impl(self) -> nn.Module:
        return Identity()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.is_quant_enabled:
            return weight
        if self.export_mode:
            raise ValueError(f"{self.clusterer.name}: Brevitas export handlers expect an integer weight grid; "
                             "a clustered weight is exported with idkm_plugin.integrations.brevitas.palettize(model)")
        for layer in self.tracked_module_list:
            check_layer_supported(layer, self.clusterer.name)
        return self.tensor_quant(weight)

    def create_quant_tensor(self, qt_args: Tuple[Any]) -> torch.Tensor:
        raise ValueError(f"{self.clusterer.name}: a k-means LUT is not an integer grid, so clustered weights "
                         "have no IntQuantTensor form")

    def bit_width(self) -> torch.Tensor:
        """Bits per code (the LUT has 2**bits entries of `cluster_dim` weights)."""
        return torch.tensor(float(self.cluster_config.bits))

    def scale(self) -> None:
        raise ValueError(f"{self.clusterer.name}: clustered weights have no integer scale: {_WHY}")

    def zero_point(self) -> None:
        raise ValueError(f"{self.clusterer.name}: clustered weights have no integer zero point: {_WHY}")


_WHY = ("each weight is one of 2**bits arbitrary LUT entries, not scale * (integer - zero_point); "
        "use a float output (return_quant_tensor=False) or an output_quant, and a bias_quant that does "
        "not need input_scale * weight_scale (e.g. bias_quant=None)")


def check_layer_supported(layer: nn.Module, name: str) -> None:
    """Raise ValueError for layer settings that need the weight's integer scale."""
    bias_quant = getattr(layer, "bias_quant", None)
    if bias_quant is not None and bias_quant.is_quant_enabled and getattr(bias_quant, "requires_input_scale", False):
        raise ValueError(f"{name}: {type(layer).__name__} has a bias quantizer that needs input_scale * "
                         f"weight_scale, but {_WHY}")
    output_quant = getattr(layer, "output_quant", None)
    output_quantized = output_quant is not None and output_quant.is_quant_enabled
    if getattr(layer, "return_quant_tensor", False) and not output_quantized:
        raise ValueError(f"{name}: {type(layer).__name__}(return_quant_tensor=True) would need an integer weight "
                         f"QuantTensor to build its output QuantTensor, but {_WHY}")
