"""Post-training k-means palettization (Deep Compression style): no fine-tuning.

Each clusterable layer's weight is clustered with hard k-means (Lloyd's iterations from the
configured init, linear by default as in Deep Compression) and replaced by its palettized module.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from idkm_plugin import ModelConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.core import hard_assign
from idkm_plugin.layers import palettize_module, resolve_layers

@torch.no_grad()
def lloyd(x: torch.Tensor, c: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Hard k-means. x [g, m, d], c [g, k, d] initial centroids -> centroids [g, k, d] (empty clusters kept)."""
    c = c.clone()
    for _ in range(iters):
        codes = hard_assign(x, c)  # [g, m]
        sums = torch.zeros_like(c).scatter_add_(1, codes.unsqueeze(-1).expand_as(x), x)
        counts = torch.zeros(c.shape[:2], dtype=x.dtype, device=x.device).scatter_add_(
            1, codes, torch.ones_like(codes, dtype=x.dtype))
        new = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), c)
        if torch.equal(new, c):
            break
        c = new
    return c


@torch.no_grad()
def ptq_kmeans(model: nn.Module, model_config: ModelConfig, init: Optional[str] = "linear",
               iters: int = 50) -> nn.Module:
    """A palettized copy of `model`: every layer the ModelConfig clusters gets k-means codes + LUT."""
    model = copy.deepcopy(model).eval()
    for name, module, cfg in list(resolve_layers(model, model_config, flow="post-training k-means")):
        if cfg is None:
            continue
        clusterer = WeightClusterer(cfg if init is None else cfg.replace(init=init), name=name).eval()
        clusterer.initialize(module.weight)
        # Lloyd on what the LUT encodes: the weight divided by its channel scales when the config has them
        x = clusterer.vectors(clusterer._normalized(module.weight.detach())).to(clusterer.centroids.dtype)
        clusterer.centroids = lloyd(x, clusterer.centroids, iters)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, palettize_module(module, clusterer))
    return model
