"""`IDKMQATConfig`: a torchao `AOBaseConfig` with its own `quantize_` handler.

torchao's stock `QATConfig` only accepts its own fake-quantize configs and only swaps Linear and
Embedding, so clustering registers its own config type:

    quantize_(model, IDKMQATConfig(ClusterConfig(bits=4), step="prepare"), filter_fn=clusterable)
    ... train ...
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)

prepare swaps Linear / Conv1d / Conv2d / Embedding for the `IDKMFakeQuant*` layers; convert
swaps those for the core's palettized layers (packed codes + LUT). Inside a torchao
`FqnToConfig` (filter_fn=None) the same config applies per layer, by exact name or `re:` regex.
"""
from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass
from typing import Optional

from torch import nn

from idkm_plugin.config import ClusterConfig
from idkm_plugin.layers import palettize_module

from ._import import import_torchao
from .modules import IDKMFakeQuantMixin, fake_quant_class, layer_label

import_torchao()
from torchao.core.config import AOBaseConfig  # noqa: E402
from torchao.quantization.transform_module import register_quantize_module_handler  # noqa: E402


class QATStep(str, enum.Enum):
    PREPARE = "prepare"
    CONVERT = "convert"


@dataclass(frozen=True)
class IDKMQATConfig(AOBaseConfig):
    """Differentiable k-means clustering QAT for `torchao.quantize_`.

    Args:
        cluster_config: how to cluster each matched layer (prepare only); None means
            `ClusterConfig()` (idkm, 4 bits, dim 1). Must be None for convert, which uses the
            config every prepared layer was trained with.
        step: "prepare" (float layer -> fake-quantized layer) or "convert"
            (fake-quantized layer -> palettized layer).
    """

    cluster_config: Optional[ClusterConfig] = None
    step: QATStep | str = QATStep.PREPARE
    layer_name: Optional[str] = None  # for error messages; fqn_to_config sets it

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


# module -> its fully qualified name, noted by `clusterable` for the handler torchao calls right after
# (torchao hands the handler the module only); used to name the layer in errors.
_FQNS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def clusterable(module: nn.Module, fqn: str = "") -> bool:
    """`filter_fn` for `quantize_`: float layers of every registered kind (Linear, Conv1d, Conv2d,
    Embedding, ...) and prepared layers. (torchao's default filter only matches nn.Linear.)
    """
    match = fake_quant_class(module) is not None or isinstance(module, IDKMFakeQuantMixin)
    if match and fqn:
        _FQNS[module] = fqn
    return match


def prepare_module(module: nn.Module, config: ClusterConfig, name: Optional[str] = None) -> nn.Module:
    """One float layer -> its fake-quantized version (unsupported modules are returned unchanged)."""
    name = name or _FQNS.get(module) or layer_label(module)
    if isinstance(module, IDKMFakeQuantMixin):
        raise ValueError(f"{name} is already prepared for clustering ({module.weight_clusterer.extra_repr()}); "
                         "convert it with IDKMQATConfig(step='convert') or prepare the float model")
    fq_cls = fake_quant_class(module)
    return module if fq_cls is None else fq_cls.from_float(module, config, name)


def convert_module(module: nn.Module) -> nn.Module:
    """One fake-quantized layer -> its palettized version (other modules are returned unchanged)."""
    if not isinstance(module, IDKMFakeQuantMixin):
        return module
    return palettize_module(module, module.weight_clusterer)


@register_quantize_module_handler(IDKMQATConfig)
def _idkm_qat_transform(module: nn.Module, config: IDKMQATConfig, *, parameter_name: Optional[str] = None,
                        ) -> nn.Module:
    """The `quantize_` handler. `parameter_name` is set when an FqnToConfig key matched a parameter
    (e.g. "fc.weight" or a regex that also matches parameter names): only "weight" is clustered."""
    if parameter_name not in (None, "weight"):
        return module
    if config.step is QATStep.PREPARE:
        return prepare_module(module, config.resolved_cluster_config, config.layer_name)
    return convert_module(module)
