"""Fake-quantized layers that `IDKMQATConfig(step="prepare")` swaps in.

Each one subclasses the float layer it replaces (so `isinstance(m, nn.Linear)` still holds and
torchao's default Linear filter finds the Linear ones again at convert time), shares that
layer's Parameter objects (an optimizer built before prepare keeps training them) and owns one
`WeightClusterer` as the child module `weight_clusterer`. The forward is the float forward
with `weight_clusterer(weight)` in place of the weight: soft, differentiable clustering in
training, the hard nearest-centroid weight in eval (bit-identical to the converted model).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ClusterConfig
from idkm_plugin.layers import LayerKind, kind_named, kind_of, subclass_instance


class IDKMFakeQuantMixin:
    """A float layer of a registered kind whose weight is clustered on the fly.

    Subclasses are made per kind by `fake_quant_class`; forward(input) is the kind's float forward
    with `weight_clusterer(weight)` in place of the weight.
    """

    layer_kind: LayerKind
    weight_clusterer: WeightClusterer

    @classmethod
    def from_float(cls, module: nn.Module, config: ClusterConfig, name: str = "weight") -> nn.Module:
        """A fake-quantized layer sharing `module`'s Parameters (an optimizer built before keeps training them)."""
        cls.layer_kind.check(module, name)
        new = subclass_instance(module, cls)
        new.weight_clusterer = WeightClusterer(config, name=name)
        new.weight_clusterer.check_weight(cls.layer_kind.clustered_weight(new))
        return new

    def clustered_weight(self) -> torch.Tensor:
        """The clustered weight the forward uses (soft in training, hard in eval), laid out [out, ...]."""
        return self.weight_clusterer(self.layer_kind.clustered_weight(self))

    @property
    def cluster_config(self) -> ClusterConfig:
        return self.weight_clusterer.config

    def forward(self, x):
        return self.layer_kind.forward_with_weight(self, x, self.clustered_weight())


@functools.lru_cache(maxsize=None)
def _fake_quant_class_of(kind: LayerKind) -> type:
    name = f"IDKMFakeQuant{kind.name}"
    doc = f"{kind.float_type.__name__} whose weight is clustered on the fly (from `IDKMQATConfig(step='prepare')`)."
    cls = type(name, (IDKMFakeQuantMixin, kind.float_type), {"layer_kind": kind, "__module__": __name__,
                                                             "__doc__": doc})
    globals()[name] = cls  # picklable by name
    return cls


def fake_quant_class(module: nn.Module) -> Optional[type]:
    """The fake-quantized class for a float layer of a registered kind (exact type), else None.

    Subclasses (torch.ao QAT layers, Brevitas layers, MultiheadAttention's out_proj, user layers with their
    own forward) are not float layers to swap.
    """
    kind = kind_of(module)
    return None if kind is None else _fake_quant_class_of(kind)


IDKMFakeQuantLinear = _fake_quant_class_of(kind_named("Linear"))
IDKMFakeQuantConv1d = _fake_quant_class_of(kind_named("Conv1d"))
IDKMFakeQuantConv2d = _fake_quant_class_of(kind_named("Conv2d"))
IDKMFakeQuantEmbedding = _fake_quant_class_of(kind_named("Embedding"))


def layer_label(module: nn.Module) -> str:
    """A name for error messages when the module's fully qualified name is unknown."""
    weight = getattr(module, "weight", None)
    shape = list(weight.shape) if isinstance(weight, torch.Tensor) else "?"
    return f"{type(module).__name__}(weight {shape})"
