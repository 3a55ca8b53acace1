"""`quantize_model(model, model_config)`: a ModelConfig applied through Brevitas' layer map.

Brevitas' `layerwise_quantize` swaps float layers for Quant* layers from a map
{float class: (quant class, layer kwargs)}, where a kwarg may be a `lambda module, name: ...`
evaluated per layer. We build that map with one lambda per clustering field, each reading the
ClusterConfig that `model_config.resolve(name, module)` gave that layer; layers resolved to None
go on the name blacklist and stay float.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

from torch import nn

from idkm_plugin.config import ClusterConfig, ModelConfig
from idkm_plugin.layers import LayerKind, layer_kinds
from idkm_plugin.layers import resolve_layers as _resolve_layers

from ._import import import_brevitas
from .quantizers import FIELD_TO_ATTR, ClusterWeightQuant

import_brevitas()
import brevitas.nn as qnn  # noqa: E402

with warnings.catch_warnings():  # brevitas.graph warns at import about an optional CUDA package and its own fx
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    warnings.filterwarnings("ignore", message="brevitas.fx is deprecated", category=DeprecationWarning)
    from brevitas.graph.quantize import layerwise_quantize  # noqa: E402

def quant_class(kind: LayerKind) -> Optional[type]:
    """Brevitas' Quant layer for a registry kind (`brevitas.nn.Quant<Name>`), or None when it has none."""
    cls = getattr(qnn, f"Quant{kind.name}", None)
    return cls if isinstance(cls, type) and issubclass(cls, kind.float_type) else None


def resolve_layers(model: nn.Module, model_config: ModelConfig) -> tuple[dict[str, ClusterConfig], list[str]]:
    """(name -> ClusterConfig for layers to cluster, names to leave float), by `idkm_plugin.layers.resolve_layers`.

    A layer the config cannot cluster (including a registered kind Brevitas has no Quant layer for)
    raises ValueError naming it, or warns and stays float with `model_config.skip_unclusterable`.
    """
    configs: dict[str, ClusterConfig] = {}
    skipped: list[str] = []
    for name, _, cfg in _resolve_layers(model, model_config, supports=lambda kind: quant_class(kind) is not None,
                                        flow="the Brevitas flow"):
        if cfg is None:
            skipped.append(name)
        else:
            configs[name] = cfg
    return configs, skipped


def _per_layer(configs: dict[str, ClusterConfig], field: str) -> Callable[[nn.Module, str], Any]:
    # Brevitas evaluates a kwarg that is a lambda of (module, name) once per layer.
    return lambda module, name: configs[name].to_dict()[field]


def compute_layer_map(configs: dict[str, ClusterConfig], weight_quant: type = ClusterWeightQuant,
                      **layer_kwargs: Any) -> dict:
    """The Brevitas layer map clustering each layer with its own config.

    layer_kwargs (e.g. input_quant=Int8ActPerTensorFloat) go to the Linear / Conv layers, not to
    Embedding (which has no input quantizer).
    """
    weight_kwargs: dict[str, Any] = {"weight_quant": weight_quant, "weight_layer_name": lambda module, name: name}
    for field in ClusterConfig().to_dict():
        weight_kwargs[f"weight_{FIELD_TO_ATTR.get(field, field)}"] = _per_layer(configs, field)
    return {kind.float_type: (quant_class(kind), {**weight_kwargs, **({} if kind.name == "Embedding" else layer_kwargs)})
            for kind in layer_kinds() if quant_class(kind) is not None}


def quantize_model(model: nn.Module, model_config: ModelConfig, weight_quant: type = ClusterWeightQuant,
                   **layer_kwargs: Any) -> nn.Module:
    """Swap the float Linear / Conv1d / Conv2d / Embedding layers of `model` for Brevitas Quant*
    layers clustered as `model_config` resolves them (other layers and those resolved to None stay).

    Weights are carried over; returns the model (modified in place). `weight_quant` is the injector
    the per-layer kwargs override (any ClusterWeightQuant subclass; the method comes from the config).
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"quantize_model expects an idkm_plugin.ModelConfig, got {type(model_config).__name__}")
    configs, skipped = resolve_layers(model, model_config)
    if "" in skipped:  # the model is itself one layer, resolved to float
        return model
    layer_map = compute_layer_map(configs, weight_quant, **layer_kwargs)
    return layerwise_quantize(model, compute_layer_map=layer_map, name_blacklist=skipped)
