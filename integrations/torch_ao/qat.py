"""torch.ao QAT classes for the layer registry: torch.ao's own where it has one, a generic one otherwise."""
from __future__ import annotations

import functools

from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from idkm_plugin.layers import LayerKind, layer_kinds, subclass_instance

__all__ = ["IDKMQATMixin", "qat_class", "qat_module_mapping"]


class IDKMQATMixin:
    """The QAT form of a registry kind torch.ao has no QAT class for (e.g. a user-registered layer).

    Like torch.ao's QAT layers it is a subclass of the float layer with a `weight_fake_quant` built
    from the layer's qconfig; forward(x) is the float forward with the fake-quantized weight.
    """

    layer_kind: LayerKind

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> nn.Module:
        qconfig = getattr(mod, "qconfig", None)
        if qconfig is None:
            raise ValueError(f"{type(mod).__name__}.from_float needs a module with a qconfig")
        new = subclass_instance(mod, cls)
        new.weight_fake_quant = qconfig.weight()
        return new

    def forward(self, x):
        return self.layer_kind.forward_with_weight(self, x, self.weight_fake_quant(self.layer_kind.clustered_weight(self)))


@functools.lru_cache(maxsize=None)
def _generic_qat_class(kind: LayerKind) -> type:
    name = f"IDKMQAT{kind.name}"
    cls = type(name, (IDKMQATMixin, kind.float_type), {"layer_kind": kind, "_FLOAT_MODULE": kind.float_type,
                                                       "__module__": __name__})
    globals()[name] = cls  # picklable by name
    return cls


def qat_class(kind: LayerKind) -> type:
    """torch.ao's QAT class for the kind when its default mapping has one (Linear, Conv2d), else ours.

    Ours shares the float layer's Parameter objects, which keeps tied weights tied (torch.ao's own
    QAT Embedding wraps its weight in a new Parameter, untying an embedding from its lm_head).
    """
    default = get_default_qat_module_mappings().get(kind.float_type)
    return default if default is not None else _generic_qat_class(kind)


def qat_module_mapping() -> dict[type, type]:
    """torch.ao's default QAT mapping plus every registry kind it lacks (Conv1d, Embedding, Conv1D, ...)
    and the ConvReLU1d fusion.

    Use as `prepare_qat(model, mapping=qat_module_mapping())` for models with those layers.
    """
    mapping = get_default_qat_module_mappings()
    mapping.update({kind.float_type: qat_class(kind) for kind in layer_kinds()})
    mapping[nni.ConvReLU1d] = nniqat.ConvReLU1d
    return mapping

