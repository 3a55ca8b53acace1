"""Size report of a (partly) palettized model: bytes of codes + LUT per layer, compression ratio.

Per palettized weight (a tied weight once): the dense packed codes (+ a pruned layer's 1-bit mask) as codec="raw" stores
them, Deep Compression's fixed-width sparse form (pruned layers), and the bytes codec="huffman" stores
for codes + mask (`code_layouts.best_layout`); with `file=`, the saved file's actual size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..nn.palettized_tensor import PalettizedTensor, palettized_parameters
from .code_layouts import best_layout, layer_codes, sparse_fixed_width_nbytes


@dataclass
class LayerSize:
    name: str
    kind: str
    params: int  # weights the layer stores (as float32 before palettization)
    bits: int
    dim: int
    luts: int
    code_bytes: int  # dense packed: codes at `bits` bits + a pruned layer's mask at 1 bit per code
    lut_bytes: int
    bias_bytes: int
    scale_bytes: int = 0  # per-output-channel scales and int8 LUTs' scales
    mask_bytes: int = 0  # the pruning mask's share of code_bytes
    sparse_bytes: Optional[int] = None  # pruned layers: survivors' codes + fixed-width relative index
    entropy_bytes: Optional[int] = None  # codes + mask as codec="huffman" stores them
    layout: str = "packed"  # the layout codec="huffman" picks (see code_layouts)

    @property
    def bytes(self) -> int:
        return self.code_bytes + self.lut_bytes + self.scale_bytes + self.bias_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * (self.code_bytes + self.lut_bytes + self.scale_bytes) / max(self.params, 1)


@dataclass
class SizeReport:
    layers: list[LayerSize] = field(default_factory=list)
    other_bytes: int = 0  # parameters and buffers of modules that are not palettized, as stored
    other_params: int = 0
    float32_bytes: int = 0  # the whole model's parameters in float32
    file: Optional[str] = None  # the saved file `size_report(model, file=...)` measured
    file_bytes: Optional[int] = None  # its size on disk

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers) + self.other_bytes

    @property
    def entropy_total_bytes(self) -> int:
        """total_bytes with every layer's codes + mask as codec="huffman" stores them."""
        return self.total_bytes + sum(layer.entropy_bytes - layer.code_bytes for layer in self.layers
                                      if layer.entropy_bytes is not None)

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / max(self.total_bytes, 1)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per model weight, everything included."""
        params = self.float32_bytes // 4
        return 8 * self.total_bytes / max(params, 1)

    def to_markdown(self) -> str:
        lines = ["| layer | kind | weights | bits/dim | LUTs | codes (B) | LUT (B) | scales (B) | bits/weight "
                 "| sparse (B) | entropy-coded (B) | layout |",
                 "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in self.layers:
            sparse = "" if s.sparse_bytes is None else f"{s.sparse_bytes:,}"
            entropy = "" if s.entropy_bytes is None else f"{s.entropy_bytes:,}"
            lines.append(f"| {s.name} | {s.kind} | {s.params:,} | {s.bits}/{s.dim} | {s.luts} | {s.code_bytes:,} | "
                         f"{s.lut_bytes:,} | {s.scale_bytes:,} | {s.bits_per_weight:.3f} | {sparse} | {entropy} | "
                         f"{s.layout} |")
        lines.append(f"| other (float) | | {self.other_params:,} | | | | {self.other_bytes:,} | | 32 | | | |")
        lines.append(f"\nTotal {self.total_bytes:,} B vs {self.float32_bytes:,} B float32: "
                     f"{self.compression_ratio:.2f}x, {self.bits_per_weight:.3f} bits per weight.")
        entropy = self.entropy_total_bytes
        lines.append(f"Entropy-coded (save_palettized(..., codec=\"huffman\")): {entropy:,} B, "
                     f"{self.float32_bytes / max(entropy, 1):.2f}x (before the file's header).")
        if self.file_bytes is not None:
            lines.append(f"File {os.path.basename(self.file)}: {self.file_bytes:,} B, "
                         f"{self.float32_bytes / max(self.file_bytes, 1):.2f}x.")
        return "\n".join(lines)


def _layer_size(name: str, kind: str, weight: PalettizedTensor, bias) -> LayerSize:
    scales = [t for t in (weight.channel_scale, weight.lut_scale) if t is not None]
    mask_bytes = 0 if weight.mask is None else weight.mask.numel()
    codes, mask = layer_codes(weight)
    layout, entropy_bytes, _ = best_layout(codes, mask, weight.bits)
    return LayerSize(
        name=name, kind=kind, params=weight.numel(), bits=weight.bits, dim=weight.cluster_dim,
        luts=weight.groups_lut, code_bytes=weight.codes.numel() + mask_bytes,
        lut_bytes=weight.lut.numel() * weight.lut.element_size(),
        bias_bytes=0 if bias is None else bias.numel() * bias.element_size(),
        scale_bytes=sum(t.numel() * t.element_size() for t in scales), mask_bytes=mask_bytes,
        sparse_bytes=None if mask is None else sparse_fixed_width_nbytes(mask, weight.bits),
        entropy_bytes=entropy_bytes, layout=layout)


def size_report(model: nn.Module, file: Optional[str | os.PathLike] = None) -> SizeReport:
    """Walk `model` and account for every stored parameter and buffer exactly once (a tied weight once, under its
    first layer); with `file` (a file `save_palettized` wrote for this model), also report its size on disk."""
    report = SizeReport()
    if file is not None:
        report.file, report.file_bytes = os.fspath(file), os.path.getsize(file)
    seen: set[int] = set()
    for path, weight in palettized_parameters(model).items():
        module_name, _, attr = path.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        bias = getattr(module, "bias", None) if attr == "weight" else None
        bias = bias if isinstance(bias, torch.Tensor) and id(bias) not in seen else None
        name = module_name if attr == "weight" else path
        layer = _layer_size(name, type(module).__name__, weight, bias)
        report.layers.append(layer)
        report.float32_bytes += 4 * layer.params + (0 if bias is None else 4 * bias.numel())
        seen.update(id(t) for t in (weight, bias) if t is not None)
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        report.other_bytes += tensor.numel() * tensor.element_size()
        if isinstance(tensor, nn.Parameter):
            report.other_params += tensor.numel()
            report.float32_bytes += 4 * tensor.numel()
    return report
