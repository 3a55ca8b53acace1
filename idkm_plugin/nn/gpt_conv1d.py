"""Palettized form of Hugging Face's `Conv1D` (GPT-2 family): a linear layer whose weight is stored [in, out].

The clustered weight is laid out [out, in] (output channels first, as for every other kind), so grouped
LUTs and d-vectors mean the same thing as for nn.Linear; forward uses its transpose exactly as Conv1D does.
transformers is never imported here: the float class is registered by `idkm_plugin.layers` once the user
has imported transformers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .palettized import PalettizedModule


def conv1d_forward(x: torch.Tensor, weight_out_in: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Conv1D's forward with its weight given [out, in]: x [..., in] -> [..., out] (same addmm, same rounding)."""
    out = weight_out_in.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, flat, weight_out_in.t()) if bias is not None else flat @ weight_out_in.t()
    return y.view(*x.shape[:-1], out)


class PalettizedConv1D(PalettizedModule):
    """y [..., nf] = x [..., nx] @ W.T + bias, W [nf, nx] decoded from codes + LUT (Conv1D stores W.T)."""

    def __init__(self, nf: int, nx: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                 cache_weight: bool = True) -> None:
        super().__init__((nf, nx), codes, lut, bits, bias, dtype, cache_weight)
        self.nf, self.nx = nf, nx

    @classmethod
    def from_float(cls, module: nn.Module, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> "PalettizedConv1D":
        bias = module.bias if bias is None else bias
        return cls(module.nf, module.nx, codes, lut, bits, bias, module.weight.dtype)

    def hyperparameters(self) -> dict:
        return {"nf": self.nf, "nx": self.nx}

    @classmethod
    def float_hyperparameters(cls, module: nn.Module) -> dict:
        return {"nf": module.nf, "nx": module.nx}

    @classmethod
    def from_hyperparameters(cls, hyperparameters, codes, lut, bits, bias, dtype) -> "PalettizedConv1D":
        return cls(hyperparameters["nf"], hyperparameters["nx"], codes, lut, bits, bias, dtype)

    def to_float(self) -> nn.Linear:
        """The equivalent nn.Linear (weight [nf, nx]) for exporters."""
        layer = nn.Linear(self.nx, self.nf, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.dequantize_weight(), requires_grad=False)
        layer.bias = self._float_bias()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv1d_forward(x, self.dense_weight(), self.bias)
