"""`fqn_to_config`: our `ModelConfig` (per-layer mixed precision) as torchao's own `FqnToConfig`."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import nn

from idkm_plugin.config import ModelConfig
from idkm_plugin.layers import resolve_layers

from ._import import import_torchao
from .config import FLOAT_BY_CONFIG, IDKMQATConfig

import_torchao()
from torchao.quantization import FqnToConfig  # noqa: E402


def fqn_to_config(model_config: ModelConfig, model: nn.Module) -> FqnToConfig:
    """Resolve `model_config` for every clusterable layer of `model` into an `FqnToConfig`.

    Keys are the exact module names (torchao applies them with `quantize_(model, cfg, filter_fn=None)`);
    values are `IDKMQATConfig(cluster_config, step="prepare")`, or None for layers the ModelConfig
    leaves float. Layers are selected by `idkm_plugin.layers.resolve_layers` (one policy for every
    flow: a layer the config cannot cluster raises ValueError naming it, or warns and stays float with
    `model_config.skip_unclusterable`).
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"fqn_to_config expects an idkm_plugin.ModelConfig, got {type(model_config).__name__}")
    table: "OrderedDict[str, Optional[IDKMQATConfig]]" = OrderedDict()
    for name, module, cfg in resolve_layers(model, model_config, flow="the torchao flow"):
        table[name] = None if cfg is None else IDKMQATConfig(cfg, step="prepare", layer_name=name)
        if cfg is None:
            module.__dict__[FLOAT_BY_CONFIG] = True  # converting it later is no surprise: no warning
    return FqnToConfig(fqn_to_config=table)
