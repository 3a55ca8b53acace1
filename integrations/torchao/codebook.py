"""EXPERIMENTAL, optional: a palettized Linear's weight as torchao's prototype `CodebookQuantizedTensor`.

For users lowering to ExecuTorch / Core ML through torchao's codebook path
(`torchao.prototype.quantization.codebook_coreml`). That tensor subclass is a prototype API and
may change or disappear in a later torchao; this function checks for it at call time.

Its constraints, which decide when the conversion is possible:
- scalar codebooks only: its dequantize returns a [N, K, d] tensor for d-vector entries instead
  of the weight shape, so `dim` must be 1;
- codes are stored one per uint8, so `bits` must be 1..8;
- one LUT per tensor or per group of output rows (our "per_tensor" / "per_grouped_channel").
It stores one uint8 per weight (no bit packing), so it is larger than our packed `PalettizedTensor`.
"""
from __future__ import annotations

import torch

from torch import nn

from idkm_plugin.nn import PalettizedTensor

from ._import import import_torchao


def _codebook_tensor_class():
    import_torchao()
    try:
        from torchao.prototype.quantization.codebook_coreml import CodebookQuantizedTensor
    except ImportError as err:  # prototype API: may move between torchao releases
        raise ImportError("this torchao has no torchao.prototype.quantization.codebook_coreml."
                          "CodebookQuantizedTensor; to_codebook_tensor is unavailable") from err
    return CodebookQuantizedTensor


def to_codebook_tensor(layer: nn.Linear) -> torch.Tensor:
    """EXPERIMENTAL. The palettized weight [out, in] of a converted `layer` as a `CodebookQuantizedTensor`.

    codes: uint8 [out, in]; codebook: [luts, 1, 2**bits, 1] in the LUT dtype; block_size
    [out / luts, in]. `F.linear(x, tensor, bias)` equals `layer(x)` exactly, and
    `nn.Linear(...).weight = nn.Parameter(tensor, requires_grad=False)` gives a torchao-quantized Linear.

    Raises ValueError when the layer violates the constraints above.
    """
    if not isinstance(layer, nn.Linear) or not isinstance(layer.weight, PalettizedTensor):
        raise ValueError(f"to_codebook_tensor expects a converted nn.Linear (palettized weight), got "
                         f"{type(layer).__name__} with a {type(getattr(layer, 'weight', None)).__name__} weight")
    layer = layer.weight
    if layer.cluster_dim != 1:
        raise ValueError(f"to_codebook_tensor: cluster dim={layer.cluster_dim} is not allowed; CodebookQuantizedTensor "
                         "supports scalar codebooks only (dim=1)")
    if not 1 <= layer.bits <= 8:
        raise ValueError(f"to_codebook_tensor: bits={layer.bits} is not allowed; CodebookQuantizedTensor "
                         "stores uint8 codes, so bits must be 1..8")
    if layer.channel_scale is not None:
        raise ValueError("to_codebook_tensor: this layer has per-channel scales (ClusterConfig.per_channel_scale), "
                         "which CodebookQuantizedTensor cannot hold; convert it without per_channel_scale")
    cls = _codebook_tensor_class()
    out_features, in_features = layer.weight_shape
    luts = layer.groups_lut
    codes = layer.unpacked_codes().reshape(out_features, in_features).to(torch.uint8)
    codebook = layer.decoded_lut().reshape(luts, 1, 1 << layer.bits, 1)  # an int8 LUT as its float32 values
    code_dtype = torch.uint8 if layer.bits == 8 else getattr(torch, f"uint{layer.bits}")
    return cls(codes, codebook, code_dtype, [out_features // luts, in_features],
               torch.Size(layer.weight_shape), dtype=layer.weight_dtype)
