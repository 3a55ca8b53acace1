"""Size report of a (partly) palettized model: bytes of codes + LUT per layer, compression ratio."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..nn.palettized import PalettizedModule


@dataclass
class LayerSize:
    name: str
    kind: str
    params: int  # weights the layer stores (as float32 before palettization)
    bits: int
    dim: int
    luts: int
    code_bytes: int
    lut_bytes: int
    bias_bytes: int
    scale_bytes: int = 0  # per-output-channel scales and int8 LUTs' scales

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

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers) + self.other_bytes

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / max(self.total_bytes, 1)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per model weight, everything included."""
        params = self.float32_bytes // 4
        return 8 * self.total_bytes / max(params, 1)

    def to_markdown(self) -> str:
        lines = ["| layer | kind | weights | bits/dim | LUTs | codes (B) | LUT (B) | scales (B) | bits/weight |",
                 "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for s in self.layers:
            lines.append(f"| {s.name} | {s.kind} | {s.params:,} | {s.bits}/{s.dim} | {s.luts} | {s.code_bytes:,} | "
                         f"{s.lut_bytes:,} | {s.scale_bytes:,} | {s.bits_per_weight:.3f} |")
        lines.append(f"| other (float) | | {self.other_params:,} | | | | {self.other_bytes:,} | | 32 |")
        lines.append(f"\nTotal {self.total_bytes:,} B vs {self.float32_bytes:,} B float32: "
                     f"{self.compression_ratio:.2f}x, {self.bits_per_weight:.3f} bits per weight.")
        return "\n".join(lines)


def size_report(model: nn.Module) -> SizeReport:
    """Walk `model` and account for every stored parameter and buffer exactly once."""
    report = SizeReport()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, PalettizedModule):
            params = module.num_codes * module.dim
            bias = module.bias
            scales = [t for t in (module.channel_scale, module.lut_scale) if t is not None]
            report.layers.append(LayerSize(
                name=name, kind=type(module).__name__, params=params, bits=module.bits, dim=module.dim,
                luts=module.groups_lut,  # code bytes include a pruned layer's 1-bit mask
                code_bytes=module.codes.numel() + (0 if module.mask is None else module.mask.numel()),
                lut_bytes=module.lut.numel() * module.lut.element_size(),
                bias_bytes=0 if bias is None else bias.numel() * bias.element_size(),
                scale_bytes=sum(t.numel() * t.element_size() for t in scales)))
            report.float32_bytes += 4 * (params + (0 if bias is None else bias.numel()))
            seen.update(id(t) for t in (module.codes, module.lut, bias, *scales) if t is not None)
    for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        report.other_bytes += tensor.numel() * tensor.element_size()
        if isinstance(tensor, nn.Parameter):
            report.other_params += tensor.numel()
            report.float32_bytes += 4 * tensor.numel()
    return report
