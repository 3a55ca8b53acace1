"""Mixed precision: per-layer qconfigs from a `ModelConfig` (eager `assign_qconfigs`, FX `qconfig_mapping`).

Layers are resolved by the name they have in the model handed in: for a fused
`ConvBnReLU2d` (from `fuse_modules_qat`) that is the fused module's name, and its type and size
are those of its conv, so `by_type={"Conv2d": ...}` and the small-layer rule still apply.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Optional, Union

from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ClusterConfig, ModelConfig

from .qconfig import idkm_qconfig

__all__ = ["CLUSTERABLE_TYPES", "FUSED_TYPES", "assign_qconfigs", "qconfig_mapping", "resolve_layers"]

# Float layer types whose QAT counterpart calls `weight_fake_quant(weight)` in forward.
CLUSTERABLE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
# Float fused types from fuse_modules_qat: module[0] is the layer that holds the weight.
FUSED_TYPES: tuple[type, ...] = (nni.ConvBn1d, nni.ConvBn2d, nni.ConvBnReLU1d, nni.ConvBnReLU2d, nni.ConvReLU1d,
                                 nni.ConvReLU2d, nni.LinearReLU, nni.LinearBn1d)
# Weight-bearing layers the palettized modules cannot represent (or whose weight is read
# outside forward, as nn.MultiheadAttention does with its out_proj).
_UNSUPPORTED_TYPES: tuple[type, ...] = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                                        nn.EmbeddingBag, nn.Bilinear, nn.modules.linear.NonDynamicallyQuantizableLinear,
                                        nni.ConvBn3d, nni.ConvBnReLU3d, nni.ConvReLU3d)

ConfigLike = Union[ModelConfig, ClusterConfig]


def _as_model_config(model_config: ConfigLike) -> ModelConfig:
    if isinstance(model_config, ClusterConfig):
        return ModelConfig(default=model_config)
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config={model_config!r} is not allowed; expected a ModelConfig or ClusterConfig")
    return model_config


def _weight_layer(module: nn.Module) -> nn.Module:
    return module[0] if type(module) in FUSED_TYPES else module


def resolve_layers(model: nn.Module, model_config: ConfigLike) -> Iterator[tuple[str, nn.Module, Optional[ClusterConfig]]]:
    """Yield (name, module, config or None) for every layer that holds a clusterable weight.

    Raises ValueError naming the layer when a config asks to cluster a layer that cannot be
    clustered (unsupported type, or `dim` / `group_size` do not divide its weight), unless
    `model_config.skip_unclusterable`, in which case it warns and yields None (layer stays float).
    """
    mp = _as_model_config(model_config)
    fused_children: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in fused_children:
            continue
        kind = type(module)
        if kind in FUSED_TYPES:
            fused_children.update(id(m) for m in module.children())
        if kind in FUSED_TYPES or kind in CLUSTERABLE_TYPES:
            layer = _weight_layer(module)
            cfg = mp.resolve(name, layer)
            yield name, module, (None if cfg is None else _checked(name, layer, cfg, mp))
        elif isinstance(module, _UNSUPPORTED_TYPES) and mp.resolve(name, module) is not None:
            _unclusterable(mp, f"layer {name!r} ({kind.__name__}) cannot be clustered: supported layers are "
                               "Linear, Conv1d, Conv2d, Embedding and their fuse_modules_qat fusions; "
                               f"map it to None in the ModelConfig (by_name={{{name!r}: None}})")
            yield name, module, None


def _checked(name: str, layer: nn.Module, cfg: ClusterConfig, mp: ModelConfig) -> Optional[ClusterConfig]:
    try:
        WeightClusterer(cfg, name=f"layer {name!r} ({type(layer).__name__})").check_weight(layer.weight)
    except ValueError as err:
        _unclusterable(mp, str(err))
        return None
    return cfg


def _unclusterable(mp: ModelConfig, message: str) -> None:
    if not mp.skip_unclusterable:
        raise ValueError(message + " (or set ModelConfig.skip_unclusterable=True to leave it float)")
    warnings.warn(message + "; skip_unclusterable=True: leaving it float", stacklevel=3)


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
    global qconfig is None, so only the resolved layers are clustered.
    """
    mapping = QConfigMapping().set_global(None)
    for name, _, cfg in resolve_layers(model, model_config):
        mapping.set_module_name(name, None if cfg is None else idkm_qconfig(cfg, activation=activation, name=name))
    return mapping
