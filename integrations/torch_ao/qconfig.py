"""`idkm_qconfig`: a torch.ao QConfig whose weight fake-quant is `IDKMFakeQuantize`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.ao.quantization import QConfig
from torch.ao.quantization.observer import PlaceholderObserver

from idkm_plugin.config import ClusterConfig

from .fake_quantize import IDKMFakeQuantize, stock_convert_error

__all__ = ["WeightOnlyActivation", "idkm_qconfig"]


class WeightOnlyActivation(PlaceholderObserver):
    """The activation "observer" of a weight-only idkm qconfig: torch.ao's float32 placeholder (its own way
    of leaving activations untouched; eager `convert` removes it, FX inserts nothing for it), which names
    the layer and the fix if torch.ao's integer `convert` (no `mapping=palettize_mapping()`) reaches it."""

    def __init__(self, dtype: torch.dtype = torch.float32, layer_name: str = "weight", **kwargs: Any) -> None:
        super().__init__(dtype=dtype, **kwargs)
        self.layer_name = layer_name

    def calculate_qparams(self):
        raise stock_convert_error(self.layer_name)


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
    if activation is None:
        activation = WeightOnlyActivation.with_args(dtype=torch.float32, layer_name=name)
    return QConfig(activation=activation, weight=weight)
