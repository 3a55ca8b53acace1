"""Injectable weight quantizers: `IDKMWeightQuant`, `DKMWeightQuant`, `JFBWeightQuant`.

Brevitas idiom: an `ExtendedInjector` whose attributes are overridden per layer through
`weight_*` keyword arguments, e.g.

    QuantLinear(512, 10, weight_quant=IDKMWeightQuant, weight_bit_width=2)
    QuantConv2d(16, 32, 3, weight_quant=IDKMWeightQuant, weight_bit_width=4, weight_cluster_dim=4)

Injector attribute <- ClusterConfig field (the `weight_` prefix selects the weight quantizer):

    bit_width <- bits          cluster_dim <- dim          cluster_method <- method
    cluster_init <- init       every other field keeps its name: tau, max_iter, tol,
    granularity, group_size, uniquify, chunk_size, adjoint_max_iter, adjoint_tol, lut_dtype,
    start_step, seed, solver, per_channel_scale, scale_dtype, scale_block_size, sparsity, prune_start,
    prune_steps.
    layer_name names the layer in error messages. e.g. weight_sparsity=0.9 prunes 90% of the weights.

`ClusterWeightQuant.cluster_config` (a `@value`) builds the ClusterConfig from them, so the
usual validation errors apply; `weight_quant_kwargs(cfg)` goes the other way.
"""
from __future__ import annotations

from typing import Any

from idkm_plugin.config import ClusterConfig

from ._import import import_brevitas
from .proxy import ClusterTensorQuant, ClusterWeightQuantProxy

import_brevitas()
from brevitas.inject import ExtendedInjector, value  # noqa: E402

# ClusterConfig field -> injector attribute (fields not listed keep their name)
FIELD_TO_ATTR = {"bits": "bit_width", "dim": "cluster_dim", "method": "cluster_method", "init": "cluster_init"}
_DEFAULT = ClusterConfig()


class ClusterWeightQuant(ExtendedInjector):
    """Base of the clustering weight quantizers (defaults are `ClusterConfig()`'s, method idkm)."""

    proxy_class = ClusterWeightQuantProxy
    tensor_quant = ClusterTensorQuant
    layer_name = "weight"

    cluster_method = _DEFAULT.method.value
    bit_width = _DEFAULT.bits
    cluster_dim = _DEFAULT.dim
    tau = _DEFAULT.tau
    max_iter = _DEFAULT.max_iter
    tol = _DEFAULT.tol
    cluster_init = _DEFAULT.init.value
    granularity = _DEFAULT.granularity.value
    group_size = _DEFAULT.group_size
    uniquify = _DEFAULT.uniquify.value
    chunk_size = _DEFAULT.chunk_size
    adjoint_max_iter = _DEFAULT.adjoint_max_iter
    adjoint_tol = _DEFAULT.adjoint_tol
    lut_dtype = _DEFAULT.lut_dtype
    start_step = _DEFAULT.start_step
    seed = _DEFAULT.seed
    solver = _DEFAULT.solver.value
    per_channel_scale = _DEFAULT.per_channel_scale
    scale_dtype = _DEFAULT.scale_dtype
    scale_block_size = _DEFAULT.scale_block_size
    sparsity = _DEFAULT.sparsity
    prune_start = _DEFAULT.prune_start
    prune_steps = _DEFAULT.prune_steps

    @value
    def cluster_config(cluster_method, bit_width, cluster_dim, tau, max_iter, tol, cluster_init, granularity,
                       group_size, uniquify, chunk_size, adjoint_max_iter, adjoint_tol, lut_dtype, start_step,
                       seed, solver, per_channel_scale, scale_dtype, scale_block_size, sparsity, prune_start,
                       prune_steps):
        bits = int(bit_width) if isinstance(bit_width, float) and bit_width.is_integer() else bit_width
        return ClusterConfig(method=cluster_method, bits=bits, dim=cluster_dim, tau=tau, max_iter=max_iter, tol=tol,
                             init=cluster_init, granularity=granularity, group_size=group_size, uniquify=uniquify,
                             chunk_size=chunk_size, adjoint_max_iter=adjoint_max_iter, adjoint_tol=adjoint_tol,
                             lut_dtype=lut_dtype, start_step=start_step, seed=seed, solver=solver,
                             per_channel_scale=per_channel_scale, scale_dtype=scale_dtype,
                             scale_block_size=scale_block_size, sparsity=sparsity, prune_start=prune_start,
                             prune_steps=prune_steps)


class IDKMWeightQuant(ClusterWeightQuant):
    """IDKM: fixed point without autograd, implicit-function-theorem backward."""

    cluster_method = "idkm"


class DKMWeightQuant(ClusterWeightQuant):
    """DKM: soft k-means iterations unrolled under autograd."""

    cluster_method = "dkm"


class JFBWeightQuant(ClusterWeightQuant):
    """IDKM with Jacobian-free backprop (one vector-Jacobian product at the fixed point)."""

    cluster_method = "idkm_jfb"


def weight_quant_kwargs(config: ClusterConfig, layer_name: str | None = None) -> dict[str, Any]:
    """Layer keyword arguments that make a clustering quantizer use exactly `config`.

    e.g. QuantLinear(16, 4, weight_quant=IDKMWeightQuant, **weight_quant_kwargs(ClusterConfig(bits=2)))
    """
    kwargs = {f"weight_{FIELD_TO_ATTR.get(k, k)}": v for k, v in config.to_dict().items()}
    if layer_name is not None:
        kwargs["weight_layer_name"] = layer_name
    return kwargs
