"""Post-training palettization: k-means per layer, sensitivity-weighted when calibration data is given.

    from idkm_plugin import ModelConfig, ptq
    fisher = ptq.fisher_information(model, calibration_batches, loss_fn)     # optional: diagonal Fisher
    deployed = ptq.palettize(model, ModelConfig.llm(bits=4), fisher=fisher)  # a converted copy
    ptq.init_luts(qat_model, fisher=fisher)    # or: start QAT from the same LUTs (any flow's prepared model)

Each clustered weight W (laid out [out, ...], divided by its per-channel scales when the config has them) is
split into the config's [groups, m, d] vectors and clustered with weighted hard k-means (Lloyd's iterations,
`idkm_plugin.core.weighted_kmeans`), every group of the layer at once. The weight of a vector is 1 (plain
k-means) or the diagonal Fisher information summed over its d entries, times the square of its channel scale
(the error the LUT makes in the normalised space is scaled back by it): sum_i F_i (w_i - s c_a(i))^2 is what the
loss sees to second order (SqueezeLLM; coremltools' SKMPalettizer). Scalars (d = 1) start from the weighted
(i + 0.5) / k quantiles; vectors (d > 1) from the config's `init`. The codes, LUT, scales and mask are those a
`WeightClusterer` with these centroids produces, so `palettize` computes what every flow's eval mode computes
from the same LUTs (`init_luts`).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .clusterer import WeightClusterer
from .config import Method, ModelConfig
from .core.prune import magnitude_mask, num_pruned
from .core.soft_step import compute_dtype
from .core.weighted_kmeans import weighted_kmeans, weighted_quantile_init
from .layers import ConfigLike, as_model_config, kind_of, palettize_module, resolve_layers
from .nn.channel_scale import unscale_weight

__all__ = ["cluster_weight", "fisher_information", "init_luts", "palettize"]

Fisher = dict[str, torch.Tensor]


def fisher_information(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                       ) -> Fisher:
    """The diagonal Fisher information of every weight: the squared gradients of `loss_fn(model, batch)`, summed
    over `batches` (a few calibration batches).

    Returns {parameter name: tensor of the parameter's shape (float32)}, named as `model.named_parameters()`
    names them (a tied Parameter once, under its first name, its gradient summed over every use). The model's
    mode and `.grad`s are restored; its parameters are not changed.
    """
    params = dict(model.named_parameters())
    saved_grads = {name: p.grad for name, p in params.items()}
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    was_training = model.training
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items() if p.dim() >= 2}
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            for p in params.values():
                p.grad = None
            loss = loss_fn(model, batch)
            loss.backward()
            for name, f in fisher.items():
                grad = params[name].grad
                if grad is not None:
                    f.add_(grad.detach().to(torch.float32).square())
    finally:
        for name, p in params.items():
            p.grad = saved_grads[name]
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    return fisher


@torch.no_grad()
def cluster_weight(clusterer: WeightClusterer, weight: torch.Tensor, fisher: Optional[torch.Tensor] = None,
                   iters: int = 50) -> WeightClusterer:
    """Set `clusterer`'s centroids [groups, k, d] to the (Fisher-weighted) k-means LUT of `weight` [out, ...].

    With `config.sparsity` > 0 its mask is set too (the `sparsity` smallest-norm vectors pruned, left out of
    the LUT). `fisher`: the weight's diagonal Fisher information, same shape (None: plain k-means).
    Returns the clusterer.
    """
    cfg = clusterer.config
    w = weight.detach().to(compute_dtype(weight.dtype))
    scale = clusterer.channel_scale(w) if cfg.per_channel_scale else None
    normalized = w if scale is None else unscale_weight(w, scale)
    x = clusterer.vectors(normalized)  # [g, m, d]
    g, m, d = x.shape
    if fisher is None:
        weights = torch.ones(g, m, dtype=x.dtype, device=x.device)
    else:
        if fisher.shape != weight.shape:
            raise ValueError(f"{clusterer.name}: the Fisher information has shape {list(fisher.shape)}, the weight "
                             f"{list(weight.shape)}")
        weights = clusterer.row_weights(fisher.detach().to(x.dtype), scale)
    if cfg.sparsity > 0:
        mask = magnitude_mask(x, num_pruned(cfg.sparsity, g * m))
        clusterer.mask = mask
        weights = weights * mask
    if d == 1:
        init = weighted_quantile_init(x, weights, cfg.k)
    else:
        clusterer.initialize(weight, force=True)
        init = clusterer.centroids.to(x.dtype)
    clusterer.centroids = weighted_kmeans(x, weights, init, iters)
    return clusterer


@torch.no_grad()
def palettize(model: nn.Module, model_config: ConfigLike, fisher: Optional[Fisher] = None, iters: int = 50,
              inplace: bool = False) -> nn.Module:
    """Post-training palettization: `model` with every layer `model_config` clusters converted to codes + LUT.

    `fisher` ({parameter name: diagonal Fisher}, from `fisher_information`) makes the k-means
    sensitivity-weighted. A tied weight (embedding / lm_head) is clustered once, with one clusterer, and both
    layers are converted from it. Returns a converted copy (or `model` itself with `inplace`), in eval mode.
    """
    mp = as_model_config(model_config)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    names = _parameter_names(model)
    layers = [(name, module, cfg) for name, module, cfg in resolve_layers(model, mp, flow="post-training "
                                                                            "palettization") if cfg is not None]
    clusterers: dict[int, WeightClusterer] = {}  # id(weight) -> its clusterer
    for name, module, cfg in layers:
        weight = kind_of(module).clustered_weight(module)
        key = id(module.weight)
        if key not in clusterers:
            clusterer = WeightClusterer(cfg, name=name).eval()
            clusterers[key] = cluster_weight(clusterer, weight, _fisher_of(fisher, names, module, weight), iters)
    for name, module, cfg in layers:
        converted = palettize_module(module, clusterers[id(module.weight)])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, converted)
    return model


@torch.no_grad()
def init_luts(model: nn.Module, fisher: Optional[Fisher] = None, iters: int = 50, weighted_qat: bool = True
              ) -> nn.Module:
    """Set the LUT of every `WeightClusterer` in a QAT-prepared `model` (any flow) to the post-training
    (Fisher-weighted) k-means LUT of its layer's weight, so training starts at the `palettize` result.

    With `fisher` and `weighted_qat`, each clusterer also keeps its layer's Fisher information
    (`WeightClusterer.set_importance`; idkm / idkm_jfb layers without pruning), so the training clustering is
    weighted as the post-training one was: without it, the first training step moves every LUT to the
    unweighted soft k-means fixed point, which is plain k-means' quality.
    A tied weight is clustered once; every clusterer of it gets the same centroids. Returns `model`.
    (A layer with `sparsity` > 0 gets its mask now; its schedule may re-initialise the LUT when pruning starts.)
    """
    names = _parameter_names(model)
    done: dict[int, WeightClusterer] = {}
    for module in model.modules():
        kind = kind_of(module, exact=False)
        clusterer = _own_clusterer(module) if kind is not None else None
        if clusterer is None:
            continue
        weight = kind.clustered_weight(module)
        first = done.get(id(module.weight))
        f = _fisher_of(fisher, names, module, weight)
        cfg = clusterer.config
        if f is not None and weighted_qat and cfg.method is not Method.DKM and cfg.sparsity == 0:
            clusterer.set_importance(f)
        if first is None:
            done[id(module.weight)] = cluster_weight(clusterer, weight, f, iters)
        else:
            if first.config != clusterer.config:
                raise ValueError(f"{first.name} and {clusterer.name} share one (tied) weight but have different "
                                 "configs; give both layers the same ClusterConfig")
            clusterer.centroids = first.centroids.clone()
            clusterer.mask = first.mask.clone()
    return model


def _own_clusterer(module: nn.Module) -> Optional[WeightClusterer]:
    """The one WeightClusterer inside a prepared layer (None if it has none, or several)."""
    found = [m for m in module.modules() if isinstance(m, WeightClusterer)]
    return found[0] if len(found) == 1 else None


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """id(Parameter) -> its name in `model.named_parameters()` (a tied Parameter: its first name)."""
    return {id(p): name for name, p in reversed(list(model.named_parameters()))}


def _fisher_of(fisher: Optional[Fisher], names: dict[int, str], module: nn.Module, weight: torch.Tensor
               ) -> Optional[torch.Tensor]:
    """The Fisher information of `module.weight`, laid out as the clustered weight; None without `fisher`."""
    if fisher is None:
        return None
    name = names.get(id(module.weight))
    if name not in fisher:
        raise ValueError(f"no Fisher information for parameter {name!r}; compute it on this model (or a copy "
                         "with the same parameter names) with fisher_information")
    f = fisher[name]
    if weight is not module.weight and weight.dim() == 2 and weight.stride() == module.weight.stride()[::-1]:
        f = f.t()  # a layer that clusters its weight transposed (Hugging Face's Conv1D)
    return f
