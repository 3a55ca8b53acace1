"""`IDKMQATConfig`: a torchao `AOBaseConfig` with its own `quantize_` handler.

torchao's stock `QATConfig` only accepts its own fake-quantize configs and only swaps Linear and
Embedding, so clustering registers its own config type:

    quantize_(model, IDKMQATConfig(ClusterConfig(bits=4), step="prepare"), filter_fn=clusterable)
    ... train ...
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)

prepare swaps Linear / Conv1d / Conv2d / Embedding for the `IDKMFakeQuant*` layers; convert
swaps those back for the float layers with a palettized weight (packed codes + LUT). Inside a torchao
`FqnToConfig` (filter_fn=None) the same config applies per layer, by exact name or `re:` regex.
"""
from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from idkm_plugin.config import ClusterConfig
from idkm_plugin.layers import palettize_module
from idkm_plugin.nn import is_palettized

from ._import import import_torchao
from .modules import IDKMFakeQuantMixin, fake_quant_class, layer_label

import_torchao()
from torchao.core.config import AOBaseConfig  # noqa: E402
from torchao.quantization.transform_module import register_quantize_module_handler  # noqa: E402


class QATStep(str, enum.Enum):
    PREPARE = "prepare"
    CONVERT = "convert"


@dataclass(frozen=True, init=False)
class IDKMQATConfig(AOBaseConfig):
    """Differentiable k-means clustering QAT for `torchao.quantize_`.

    Args:
        cluster_config: how to cluster each matched layer (prepare only); None means
            `ClusterConfig(**cluster_fields)` (default: idkm, 4 bits, dim 1). Must be None for convert, which uses
            the config every prepared layer was trained with.
        step: "prepare" (float layer -> fake-quantized layer) or "convert"
            (fake-quantized layer -> the float layer with a palettized weight).
        **cluster_fields: ClusterConfig fields, or overrides of `cluster_config`, as `idkm_qconfig` takes them:
            `IDKMQATConfig(bits=3, method="idkm_jfb")`.
    """

    cluster_config: Optional[ClusterConfig] = None
    step: QATStep | str = QATStep.PREPARE
    layer_name: Optional[str] = None  # for error messages; fqn_to_config sets it

    def __init__(self, cluster_config: Optional[ClusterConfig] = None, step: QATStep | str = QATStep.PREPARE,
                 layer_name: Optional[str] = None, **cluster_fields: Any) -> None:
        if cluster_fields:
            if cluster_config is not None and not isinstance(cluster_config, ClusterConfig):
                raise ValueError(f"IDKMQATConfig.cluster_config={cluster_config!r} is not allowed; "
                                 "expected an idkm_plugin.ClusterConfig or None")
            if str(getattr(step, "value", step)) == QATStep.CONVERT.value:
                raise ValueError(f"IDKMQATConfig(step='convert') takes no ClusterConfig fields (got "
                                 f"{sorted(cluster_fields)}): each prepared layer converts with its own config")
            base = cluster_config if cluster_config is not None else ClusterConfig()
            cluster_config = base.replace(**cluster_fields) if cluster_config is not None else \
                ClusterConfig.from_dict(cluster_fields)
        object.__setattr__(self, "cluster_config", cluster_config)
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "layer_name", layer_name)
        self.__post_init__()

    def __post_init__(self) -> None:
        try:
            step = QATStep(self.step)
        except ValueError:
            raise ValueError(f"IDKMQATConfig.step={self.step!r} is not allowed; use 'prepare' or 'convert'") from None
        object.__setattr__(self, "step", step)
        if self.cluster_config is not None and not isinstance(self.cluster_config, ClusterConfig):
            raise ValueError(f"IDKMQATConfig.cluster_config={self.cluster_config!r} is not allowed; "
                             "expected an idkm_plugin.ClusterConfig or None")
        if step is QATStep.CONVERT and self.cluster_config is not None:
            raise ValueError("IDKMQATConfig(step='convert') takes no cluster_config: each prepared layer is "
                             "converted with the config it was trained with; pass cluster_config=None")

    @property
    def resolved_cluster_config(self) -> ClusterConfig:
        return self.cluster_config if self.cluster_config is not None else ClusterConfig()


_FQN = "_idkm_fqn"  # a layer's fully qualified name, noted on it by `clusterable` for the handler torchao calls
# right after (torchao hands the handler the module only); used to name the layer in warnings and errors


def _name(module: nn.Module, name: Optional[str]) -> str:
    return name or module.__dict__.get(_FQN) or layer_label(module)


def clusterable(module: nn.Module, fqn: str = "") -> bool:
    """`filter_fn` for `quantize_`: float layers of every registered kind (Linear, Conv1d, Conv2d,
    Embedding, ...) and prepared layers. (torchao's default filter only matches nn.Linear.)
    """
    match = fake_quant_class(module) is not None or isinstance(module, IDKMFakeQuantMixin)
    if match and fqn:
        module.__dict__[_FQN] = fqn
    return match


def prepare_module(module: nn.Module, config: ClusterConfig, name: Optional[str] = None) -> nn.Module:
    """One float layer -> its fake-quantized version (unsupported modules are returned unchanged).

    Layers that share one weight Parameter (a tied embedding and LM head) share one clusterer."""
    name = _name(module, name)
    if isinstance(module, IDKMFakeQuantMixin):
        raise ValueError(f"{name} is already prepared for clustering ({module.weight_clusterer.extra_repr()}); "
                         "convert it with IDKMQATConfig(step='convert') or prepare the float model")
    fq_cls = fake_quant_class(module)
    if fq_cls is None:
        return module
    prepared = fq_cls.from_float(module, config, name)
    _share_tied_clusterer(prepared, name)
    return prepared


def _share_tied_clusterer(prepared: nn.Module, name: str) -> None:
    """A weight Parameter already clustered by another prepared layer keeps that layer's clusterer (one LUT);
    the prepared layers using a Parameter are listed on it, so that converting one converts them all."""
    weight = prepared.weight
    users = weight.__dict__.setdefault("_idkm_prepared_layers", [])
    live = [m for m in users if isinstance(m, IDKMFakeQuantMixin) and m.weight is weight]
    if live:
        theirs = live[0].weight_clusterer
        if theirs.config != prepared.weight_clusterer.config:
            raise ValueError(f"{name} and {theirs.name} share one (tied) weight but have different configs "
                             f"({prepared.weight_clusterer.config} vs {theirs.config}); give both the same config")
        prepared.weight_clusterer = theirs
    users[:] = live + [prepared]


def convert_module(module: nn.Module, name: Optional[str] = None) -> nn.Module:
    """One fake-quantized layer -> the float layer with a palettized weight (other modules are returned
    unchanged, with a warning for a clusterable layer that was never prepared). A layer that shares its weight
    with other prepared layers converts them too (in place), so a tied embedding never stays fake-quantized."""
    name = _name(module, name)
    if not isinstance(module, IDKMFakeQuantMixin):
        if fake_quant_class(module) is not None and not is_palettized(getattr(module, "weight", None)):
            warnings.warn(f"IDKMQATConfig(step='convert'): {name} was never prepared for clustering "
                          "(IDKMQATConfig(step='prepare') did not reach it); it stays float", stacklevel=3)
        return module
    if module.training:
        warnings.warn(f"IDKMQATConfig(step='convert'): {name} is in train mode; the converted layer computes what "
                      "eval mode computes (call model.eval() before converting)", stacklevel=3)
    converted = palettize_module(module, module.weight_clusterer)
    for partner in module.weight.__dict__.get("_idkm_prepared_layers", []):
        if partner is not module and isinstance(partner, IDKMFakeQuantMixin) and partner.weight is module.weight:
            _convert_in_place(partner, converted.weight)
    return converted


def _convert_in_place(module: nn.Module, weight: nn.Parameter) -> None:
    """A prepared layer sharing `weight` (already palettized through a partner) becomes its float class holding
    that same palettized Parameter, where it stands in the model."""
    module.__class__ = module.layer_kind.float_type
    del module.weight_clusterer
    module.weight = weight


@register_quantize_module_handler(IDKMQATConfig)
def _idkm_qat_transform(module: nn.Module, config: IDKMQATConfig, *, parameter_name: Optional[str] = None,
                        ) -> nn.Module:
    """The `quantize_` handler. `parameter_name` is set when an FqnToConfig key matched a parameter
    (e.g. "fc.weight" or a regex that also matches parameter names): only "weight" is clustered."""
    if parameter_name not in (None, "weight"):
        return module
    if config.step is QATStep.PREPARE:
        return prepare_module(module, config.resolved_cluster_config, config.layer_name)
    return convert_module(module, config.layer_name)
