"""`fqn_to_config`: our `ModelConfig` (per-layer mixed precision) as torchao's own `FqnToConfig`."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Optional

from torch import nn

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ModelConfig

from ._import import import_torchao
from .config import IDKMQATConfig
from .modules import fake_quant_class

import_torchao()
from torchao.quantization import FqnToConfig  # noqa: E402


def fqn_to_config(model_config: ModelConfig, model: nn.Module) -> FqnToConfig:
    """Resolve `model_config` for every clusterable layer of `model` into an `FqnToConfig`.

    Keys are the exact module names (torchao applies them with `quantize_(model, cfg, filter_fn=None)`);
    values are `IDKMQATConfig(cluster_config, step="prepare")`, or None for layers the
    ModelConfig leaves float. A layer whose shape the resolved `dim` / `group_size` does not
    divide raises ValueError naming it, or, with `model_config.skip_unclusterable`, warns and
    stays float.
    """
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"fqn_to_config expects an idkm_plugin.ModelConfig, got {type(model_config).__name__}")
    table: "OrderedDict[str, Optional[IDKMQATConfig]]" = OrderedDict()
    for name, module in model.named_modules():
        if fake_quant_class(module) is None:
            continue
        cfg = model_config.resolve(name, module)
        if cfg is not None and not _fits(name, module, cfg, model_config.skip_unclusterable):
            cfg = None
        table[name] = None if cfg is None else IDKMQATConfig(cfg, step="prepare")
    return FqnToConfig(fqn_to_config=table)


def _fits(name: str, module: nn.Module, cfg, skip_unclusterable: bool) -> bool:
    try:
        WeightClusterer(cfg, name=name).check_weight(module.weight)
    except ValueError as err:
        if not skip_unclusterable:
            raise
        warnings.warn(f"{err}; leaving {name} float (skip_unclusterable=True)", stacklevel=3)
        return False
    return True
