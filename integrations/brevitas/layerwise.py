"""`quantize_model(model, model_config)`: a ModelConfig applied through Brevitas' layer map.

Brevitas' `layerwise_quantize` swaps float layers for Quant* layers from a map
{float class: (quant class, layer kwargs)}, where a kwarg may be a `lambda module, name: ...`
evaluated per layer. We build that map with one lambda per clustering field, each reading the
ClusterConfig that `model_config.resolve(name, module)` gave that layer; layers resolved to None
go on the name blacklist and stay float.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from torch import nn

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ClusterConfig, ModelConfig

from ._import import import_brevitas
from .quantizers import FIELD_TO_ATTR, ClusterWeightQuant

import_brevitas()
import brevitas.nn as qnn  # noqa: E402

with warnings.catch_warnings():  # brevitas.graph warns about an optional CUDA package at import
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    from brevitas.graph.quantize import layerwise_quantize  # noqa: E402

_QUANT_CLASS = {nn.Linear: qnn.QuantLinear, nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d,
                nn.Embedding: qnn.QuantEmbedding}


def resolve_layers(model: nn.Module, model_config: ModelConfig) -> tuple[dict[str, ClusterConfig], list[str]]:
    """(name -> ClusterConfig for layers to cluster, names to leave float) over the supported layers.

    A layer the resolved dim / group_size does not divide raises ValueError naming it, or warns
    and stays float with `model_config.skip_unclusterable`.
    """
    configs: dict[str, ClusterConfig] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if type(module) not in _QUANT_CLASS:
            continue
        cfg = model_config.resolve(name, module)
        if cfg is not None:
            try:
                WeightClusterer(cfg, name=name).check_weight(module.weight)
            except ValueError as err:
                if not model_config.skip_unclusterable:
                    raise
                warnings.warn(f"{err}; leaving {name} float (skip_unclusterable=True)", stacklevel=3)
                cfg = None
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
    return {float_cls: (quant_cls, {**weight_kwargs, **({} if float_cls is nn.Embedding else layer_kwargs)})
            for float_cls, quant_cls in _QUANT_CLASS.items()}


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
