"""Mixed precision: per-layer qconfigs from a `ModelConfig` (eager `assign_qconfigs`, FX `qconfig_mapping`).

Layers are resolved by the name they have in the model handed in: for a fused
`ConvBnReLU2d` (from `fuse_modules_qat`) that is the fused module's name, and its type and size
are those of its conv, so `by_type={"Conv2d": ...}` and the small-layer rule still apply.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Optional

from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.fx.tracer import QuantizationTracer
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from idkm_plugin.config import ClusterConfig
from idkm_plugin.layers import ConfigLike, layer_kinds, resolve_layers as _resolve_layers

from .qconfig import idkm_qconfig

__all__ = ["FUSED_TYPES", "assign_qconfigs", "check_fx_traceable", "clusterable_types", "qconfig_mapping",
           "resolve_layers"]

# Float fused types from fuse_modules_qat: module[0] is the layer that holds the weight.
FUSED_TYPES: tuple[type, ...] = (nni.ConvBn1d, nni.ConvBn2d, nni.ConvBn3d, nni.ConvBnReLU1d, nni.ConvBnReLU2d,
                                 nni.ConvBnReLU3d, nni.ConvReLU1d, nni.ConvReLU2d, nni.ConvReLU3d, nni.LinearReLU,
                                 nni.LinearBn1d)


def clusterable_types() -> tuple[type, ...]:
    """Float layer types (from the layer registry) and the fusions of them torch.ao builds."""
    return tuple(kind.float_type for kind in layer_kinds()) + FUSED_TYPES


def _fused_layer(module: nn.Module) -> Optional[nn.Module]:
    return module[0] if type(module) in FUSED_TYPES else None


def resolve_layers(model: nn.Module, model_config: ConfigLike) -> Iterator[tuple[str, nn.Module, Optional[ClusterConfig]]]:
    """`idkm_plugin.layers.resolve_layers` over a torch.ao model: a fused module (ConvBnReLU2d, ...)
    is resolved by its own name with the type and weight of the layer it wraps."""
    return _resolve_layers(model, model_config, unwrap=_fused_layer, flow="the torch.ao flow")


def assign_qconfigs(model: nn.Module, model_config: ConfigLike, *,
                    activation: Optional[Callable[..., Any]] = None,
                    mapping: Optional[dict[type, type]] = None) -> nn.Module:
    """Set `.qconfig` of every clusterable layer of `model` (in place) from the per-layer config.

    Call it after `fuse_modules_qat` and before `torch.ao.quantization.prepare_qat`. A layer
    resolved to None gets `qconfig = None` (stays float, even under a parent's qconfig).
    `activation`: optional torch.ao activation fake-quant constructor for the clustered layers.
    `mapping`: the QAT mapping you will hand to prepare_qat (default: torch.ao's); clustered layers
    it does not swap (Conv1d, Embedding under torch.ao's default) are warned about here.
    Returns `model`.
    """
    default_qat = get_default_qat_module_mappings() if mapping is None else mapping
    not_default: list[str] = []
    for name, module, cfg in resolve_layers(model, model_config):
        module.qconfig = None if cfg is None else idkm_qconfig(cfg, activation=activation, name=name)
        if cfg is not None and type(module) not in default_qat:
            not_default.append(f"{name!r} ({type(module).__name__})")
    if not_default:
        warnings.warn(f"layers {', '.join(not_default)} are not in torch.ao's default QAT mapping; prepare the "
                      "model with prepare_qat(model, mapping=qat_module_mapping()) or they stay float",
                      stacklevel=2)
    return model


def qconfig_mapping(model_config: ConfigLike, model: nn.Module, *,
                    activation: Optional[Callable[..., Any]] = None) -> QConfigMapping:
    """The FX `QConfigMapping` for `prepare_qat_fx`: one `set_module_name` entry per layer.

    `model` is the float model that will be traced (names as in `model.named_modules()`); the
    global qconfig is None, so only the resolved layers are clustered. Raises ValueError (keeping the
    tracer's message) when `model` cannot be symbolically traced, as most Hugging Face models cannot.
    """
    check_fx_traceable(model)
    mapping = QConfigMapping().set_global(None)
    for name, _, cfg in resolve_layers(model, model_config):
        mapping.set_module_name(name, None if cfg is None else idkm_qconfig(cfg, activation=activation, name=name))
    return mapping


def check_fx_traceable(model: nn.Module) -> None:
    """Trace `model` as `prepare_qat_fx` will (torch.ao's QuantizationTracer); ValueError if it cannot."""
    try:
        QuantizationTracer(skipped_module_names=[], skipped_module_classes=[]).trace(model)
    except Exception as err:  # the tracer fails with whatever the model's Python does on a Proxy
        raise ValueError(f"{type(model).__name__} could not be traced by torch.fx, which FX graph mode "
                         "(prepare_qat_fx) needs: use the torchao flow (quantize_ with IDKMQATConfig / "
                         "fqn_to_config) or PT2E (torch.export + IDKMQuantizer), which take untraceable models; "
                         f"the tracer said: {type(err).__name__}: {err}") from err
