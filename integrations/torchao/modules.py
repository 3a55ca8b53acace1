"""Fake-quantized layers that `IDKMQATConfig(step="prepare")` swaps in.

Each one subclasses the float layer it replaces (so `isinstance(m, nn.Linear)` still holds and
torchao's default Linear filter finds the Linear ones again at convert time), shares that
layer's Parameter objects (an optimizer built before prepare keeps training them) and owns one
`WeightClusterer` as the child module `weight_clusterer`. The forward is the float forward
with `weight_clusterer(weight)` in place of the weight: soft, differentiable clustering in
training, the hard nearest-centroid weight in eval (bit-identical to the converted model).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ClusterConfig


class IDKMFakeQuantMixin:
    """What the four fake-quantized layers share: the clusterer and the clustered weight."""

    weight_clusterer: WeightClusterer

    def clustered_weight(self) -> torch.Tensor:
        """The weight [same shape as self.weight] the forward uses (soft in training, hard in eval)."""
        return self.weight_clusterer(self.weight)

    @property
    def cluster_config(self) -> ClusterConfig:
        return self.weight_clusterer.config

    def _attach(self, config: ClusterConfig, name: str) -> None:
        self.weight_clusterer = WeightClusterer(config, name=name)
        self.weight_clusterer.check_weight(self.weight)


def _share_parameters(new: nn.Module, old: nn.Module) -> None:
    """Make `new` use `old`'s Parameter objects (weight, and bias where there is one)."""
    new.weight = old.weight
    if hasattr(old, "bias"):
        new.bias = old.bias
    new.train(old.training)


class IDKMFakeQuantLinear(IDKMFakeQuantMixin, nn.Linear):
    """nn.Linear whose weight [out, in] is clustered on the fly. x [..., in] -> [..., out]."""

    @classmethod
    def from_float(cls, module: nn.Linear, config: ClusterConfig, name: str = "weight") -> "IDKMFakeQuantLinear":
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        _share_parameters(new, module)
        new._attach(config, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.clustered_weight(), self.bias)


class _IDKMFakeQuantConvNd(IDKMFakeQuantMixin):
    """from_float and forward shared by the fake-quantized Conv1d and Conv2d."""

    @classmethod
    def from_float(cls, module: nn.Module, config: ClusterConfig, name: str = "weight") -> "_IDKMFakeQuantConvNd":
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta")
        _share_parameters(new, module)
        new._attach(config, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.clustered_weight(), self.bias)


class IDKMFakeQuantConv1d(_IDKMFakeQuantConvNd, nn.Conv1d):
    """nn.Conv1d whose weight [out, in/groups, k] is clustered on the fly. x [N, C, L] -> [N, out, L']."""


class IDKMFakeQuantConv2d(_IDKMFakeQuantConvNd, nn.Conv2d):
    """nn.Conv2d whose weight [out, in/groups, kh, kw] is clustered on the fly. x [N, C, H, W] -> [N, out, H', W']."""


class IDKMFakeQuantEmbedding(IDKMFakeQuantMixin, nn.Embedding):
    """nn.Embedding whose table [num, dim] is clustered on the fly. ids [...] -> [..., dim]."""

    @classmethod
    def from_float(cls, module: nn.Embedding, config: ClusterConfig,
                   name: str = "weight") -> "IDKMFakeQuantEmbedding":
        if module.max_norm is not None:
            raise ValueError(f"{name}: nn.Embedding with max_norm={module.max_norm} renormalises its weight in place, "
                             "which a palettized embedding cannot; use max_norm=None or leave this layer float")
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, None, module.norm_type,
                  module.scale_grad_by_freq, module.sparse, device="meta")
        _share_parameters(new, module)
        new._attach(config, name)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.clustered_weight(), self.padding_idx, None, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


# Exact float types only: subclasses (torch.ao QAT layers, Brevitas layers, MultiheadAttention's out_proj,
# user layers with their own forward) are not float layers to swap.
_FAKE_QUANT = {nn.Linear: IDKMFakeQuantLinear, nn.Conv1d: IDKMFakeQuantConv1d,
               nn.Conv2d: IDKMFakeQuantConv2d, nn.Embedding: IDKMFakeQuantEmbedding}


def fake_quant_class(module: nn.Module) -> Optional[type[IDKMFakeQuantMixin]]:
    """The fake-quantized class for a float layer, or None when the layer is not supported."""
    return _FAKE_QUANT.get(type(module))


def layer_label(module: nn.Module) -> str:
    """A name for error messages when the module's fully qualified name is unknown."""
    weight = getattr(module, "weight", None)
    shape = list(weight.shape) if isinstance(weight, torch.Tensor) else "?"
    return f"{type(module).__name__}(weight {shape})"
