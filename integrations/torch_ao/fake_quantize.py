"""`IDKMFakeQuantize`: a torch.ao weight fake-quantize that runs differentiable k-means clustering.

It is a `torch.ao.quantization.FakeQuantizeBase`, so the stock QAT machinery
(`prepare_qat`, `prepare_qat_fx`, `disable_observer`, `enable_fake_quant`, ...) drives it
like torch.ao's own `FakeQuantize`:

    fake_quant_enabled == 0  -> the weight passes through unchanged (no clustering; steps do not count;
                                weights already pruned, with ClusterConfig.sparsity, stay 0);
    observer_enabled == 1    -> training: DKM / IDKM / IDKM-JFB soft k-means, the LUT (centroids) is updated;
    observer_enabled == 0    -> training: the LUT is frozen; the weight is softly assigned to it
                                (A(C, W) C, still differentiable w.r.t. W);
    eval (any)               -> hard nearest-centroid weight: exactly what the converted model uses.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.ao.quantization import FakeQuantizeBase

from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.config import ClusterConfig

__all__ = ["IDKMFakeQuantize"]


class IDKMFakeQuantize(FakeQuantizeBase):
    """Weight fake-quantize with a learned non-uniform codebook (palettization).

    Args:
        config: the layer's ClusterConfig; None means ClusterConfig() (4-bit IDKM).
        name: the layer name used in error messages.
        factory_kwargs: accepted (and ignored) for torch.ao's QAT modules, which pass
            `factory_kwargs={"device": ..., "dtype": ...}`; the centroid buffer is sized and
            placed lazily from the first weight it sees.
        dtype, quant_min, quant_max, qscheme, is_dynamic: the QuantizationSpec fields torchao's
            PT2E prepare passes to every fake-quant constructor; ignored (a LUT has no integer grid).
        **cluster_kwargs: ClusterConfig fields overriding `config`, e.g. bits=2, method="dkm",
            so that `IDKMFakeQuantize.with_args(bits=2)` reads like `FakeQuantize.with_args(...)`.

    forward(weight [out, ...]) -> weight of the same shape and dtype (see the module docstring).

    Attributes:
        clusterer: the core `WeightClusterer` (buffers `centroids` [groups, k, d] and `step`).
        dtype / qscheme / is_dynamic: what torch.ao inspects on a weight fake-quant. A LUT is a
            set of float parameters per tensor, hence `torch.per_channel_affine_float_qparams`,
            the scheme torch.ao's QAT Embedding requires of its weight fake-quant.
    """

    dtype = torch.qint8
    qscheme = torch.per_channel_affine_float_qparams
    is_dynamic = False

    def __init__(self, config: Optional[ClusterConfig] = None, *, name: str = "weight",
                 factory_kwargs: Optional[dict[str, Any]] = None, dtype: Any = None, quant_min: Any = None,
                 quant_max: Any = None, qscheme: Any = None, is_dynamic: bool = False,
                 **cluster_kwargs: Any) -> None:
        super().__init__()
        if is_dynamic:
            raise ValueError("IDKMFakeQuantize is_dynamic=True is not allowed; weight clustering is static")
        if config is None:
            config = ClusterConfig(**cluster_kwargs)
        elif not isinstance(config, ClusterConfig):
            raise ValueError(f"IDKMFakeQuantize config={config!r} is not allowed; expected a ClusterConfig or None")
        elif cluster_kwargs:
            config = config.replace(**cluster_kwargs)
        self.clusterer = WeightClusterer(config, name=name)

    @property
    def config(self) -> ClusterConfig:
        return self.clusterer.config

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.clusterer.enabled = bool(self.fake_quant_enabled[0] == 1)
        self.clusterer.lut_frozen = bool(self.observer_enabled[0] == 0)
        return self.clusterer(weight)

    def calculate_qparams(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.ao's (scale, zero_point) contract, which a LUT cannot meet: only torch.ao's integer convert
        calls this, so say how to convert instead. The LUT is `self.clusterer.lut()` ([groups, 2**bits, d])."""
        raise stock_convert_error(self.clusterer.name)

    def extra_repr(self) -> str:
        return (f"fake_quant_enabled={int(self.fake_quant_enabled[0])}, "
                f"observer_enabled={int(self.observer_enabled[0])}, name={self.clusterer.name!r}")


def stock_convert_error(layer_name: str) -> ValueError:
    """The error for torch.ao's integer `convert` (no `mapping=palettize_mapping()`) reaching a clustered layer."""
    return ValueError(f"{layer_name}: torch.ao.quantization.convert was called without our mapping; a clustered "
                      "weight has a LUT, not an integer scale / zero point, so convert with "
                      "torch.ao.quantization.convert(qat.eval(), mapping=palettize_mapping()) "
                      "(from idkm_plugin.integrations.torch_ao)")
