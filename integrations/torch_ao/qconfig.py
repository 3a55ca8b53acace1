"""`idkm_qconfig`: a torch.ao QConfig whose weight fake-quant is `IDKMFakeQuantize`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.ao.quantization import QConfig
from torch.ao.quantization.observer import PlaceholderObserver

from idkm_plugin.config import ClusterConfig

from .fake_quantize import IDKMFakeQuantize

__all__ = ["idkm_qconfig", "weight_only_activation"]

# Weight-only: a float32 placeholder "observer" is torch.ao's own way of leaving activations
# untouched (it is the activation of `float_qparams_weight_only_qconfig`); eager `convert` removes
# it and FX inserts nothing for it.
weight_only_activation = PlaceholderObserver.with_args(dtype=torch.float32)


def idkm_qconfig(config: Optional[ClusterConfig] = None, *, activation: Optional[Callable[..., Any]] = None,
                 name: str = "weight", **cluster_kwargs: Any) -> QConfig:
    """A QConfig with an `IDKMFakeQuantize` weight.

    Args:
        config: the ClusterConfig; None: ClusterConfig(**cluster_kwargs).
        activation: None (weight-only, the default) or a torch.ao activation fake-quant
            constructor, e.g. `torch.ao.quantization.default_fake_quant`, for users who quantize
            activations too.
        name: layer name used in error messages (assign_qconfigs sets it per layer).
        **cluster_kwargs: ClusterConfig fields (or overrides of `config`): bits=2, method="dkm", ...

    Examples:
        idkm_qconfig(ClusterConfig(method="idkm", bits=2))
        idkm_qconfig(bits=2, method="idkm_jfb", dim=2)
    """
    if config is not None and not isinstance(config, ClusterConfig):
        raise ValueError(f"idkm_qconfig config={config!r} is not allowed; expected a ClusterConfig or None")
    config = ClusterConfig(**cluster_kwargs) if config is None else config.replace(**cluster_kwargs)
    weight = IDKMFakeQuantize.with_args(config=config, name=name)
    return QConfig(activation=weight_only_activation if activation is None else activation, weight=weight)
