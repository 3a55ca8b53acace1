"""Converted (deployed) modules: bit-packed n-bit codes + per-layer lookup tables.

Each module stores
    codes: uint8 [ceil(numel / d * bits / 8)]  the packed code of every d-vector,
    lut:   [groups, 2**bits, d]                 the lookup table(s), in lut_dtype,
and rebuilds the dense weight in `dequantize_weight()`: lut[codes] reshaped to the weight shape.
Optional buffers (set with `set_scales`, None otherwise, then in no state_dict):
    lut_scale: float32 [groups]       an int8 LUT's per-LUT scale: decoded LUT = lut * lut_scale,
    channel_scale: float32 or float16 [out]  per-output-channel scale: weight = lut[codes] * channel_scale[:, None, ...].
Optional pruning mask (set with `set_mask`, None otherwise, then in no state_dict):
    mask: uint8 [ceil(numel / d / 8)]  1 bit per d-vector in code order (`pack_codes(keep, 1)`, 1 = kept);
          pruned vectors decode to exactly 0 (their codes are stored as 0).
`forward` uses `dense_weight()`, which keeps that dense weight in a cache (a plain attribute, so
it is in no state_dict, size report or `torch.export`ed program) until codes or LUT change.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple, _single

from .dequantize import apply_packed_mask, dequantize_packed
from .packing import pack_codes, packed_nbytes, unpack_codes
from .portable_dequantize import apply_packed_mask_portable, dequantize_portable


class PalettizedModule(nn.Module):
    """Common storage, dequantization and dense-weight cache of the palettized layers.

    cache_weight (default True): keep the dense weight after the first forward, so later forwards
    cost what the float layer costs; it is rebuilt after `load_state_dict`, `.to()` / `.half()` /
    any `_apply`, assigning or writing in place to `codes` or `lut`. False: dequantize on every
    forward (the lowest memory: only the packed form stays resident). The layer has no trainable
    weight, so the cache serves training-mode forwards too; it is bypassed while a LUT that requires
    grad is being trained, and under tracing (`torch.export`, `torch.compile`, `torch.jit.trace`).
    """

    def __init__(self, weight_shape: tuple[int, ...], codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 bias: Optional[torch.Tensor], dtype: torch.dtype = torch.float32, cache_weight: bool = True) -> None:
        """codes: [groups, m] integer codes (values < 2**bits), or the already packed uint8 bytes
        [packed_nbytes(groups * m, bits)] as `pack_codes` writes them; lut [groups, 2**bits, d]."""
        super().__init__()
        groups = lut.shape[0]
        if lut.dim() != 3 or lut.shape[1] != 1 << bits:
            raise ValueError(f"lut {list(lut.shape)} does not match bits={bits}: expected [groups, {1 << bits}, d]")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.bits = int(bits)
        self.dim = int(lut.shape[2])
        numel = 1
        for s in self.weight_shape:
            numel *= s
        self.num_codes = numel // self.dim
        self.weight_dtype = dtype
        self.cache_weight = cache_weight
        self._cache: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None
        if codes.dim() == 1 and codes.dtype == torch.uint8:
            if codes.numel() != packed_nbytes(self.num_codes, self.bits):
                raise ValueError(f"{codes.numel()} packed bytes do not hold the {self.num_codes} codes of "
                                 f"{self.bits} bits of a {list(self.weight_shape)} weight with dim={self.dim}")
            packed = codes.detach().clone()
        else:
            if codes.dim() != 2 or codes.shape[0] != groups or codes.numel() != self.num_codes:
                expected = [groups, self.num_codes // groups]
                raise ValueError(f"codes {list(codes.shape)} and lut {list(lut.shape)} do not match a "
                                 f"{list(self.weight_shape)} weight: expected codes {expected}")
            packed = pack_codes(codes, bits)
        self.register_buffer("codes", packed)
        self.register_buffer("lut", lut.detach().clone())
        self.register_buffer("mask", None)
        self.register_buffer("channel_scale", None)
        self.register_buffer("lut_scale", None)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def groups_lut(self) -> int:
        return self.lut.shape[0]

    def set_scales(self, channel_scale: Optional[torch.Tensor] = None,
                   lut_scale: Optional[torch.Tensor] = None) -> "PalettizedModule":
        """Attach the per-output-channel scales [out] (float32, or float16 as given) and / or an int8 LUT's
        scales float32 [groups]."""
        if channel_scale is not None:
            if channel_scale.dim() != 1 or channel_scale.shape[0] != self.weight_shape[0]:
                raise ValueError(f"channel_scale {list(channel_scale.shape)} does not match a "
                                 f"{list(self.weight_shape)} weight: expected [{self.weight_shape[0]}] (one per output channel)")
            dtype = torch.float16 if channel_scale.dtype == torch.float16 else torch.float32
            self.channel_scale = channel_scale.detach().to(dtype).clone()
        if lut_scale is not None:
            if self.lut.dtype != torch.int8 or lut_scale.shape != (self.groups_lut,):
                raise ValueError(f"lut_scale {list(lut_scale.shape)} needs an int8 lut [groups, k, d] with "
                                 f"groups={lut_scale.numel()}; this lut is {self.lut.dtype} {list(self.lut.shape)}")
            self.lut_scale = lut_scale.detach().to(torch.float32).clone()
        if self.lut.dtype == torch.int8 and self.lut_scale is None:
            raise ValueError("an int8 lut needs its lut_scale [groups]: call set_scales(lut_scale=...)")
        return self

    def set_mask(self, mask: Optional[torch.Tensor]) -> "PalettizedModule":
        """Attach a pruning mask: bool [groups, m] (True = kept; any shape of num_codes entries in code order),
        or the packed uint8 [packed_nbytes(num_codes, 1)] form `mask` stores; None removes it. The codes of
        pruned vectors are set to 0. Returns self."""
        if mask is None:
            self.mask = None
            return self
        nbytes = packed_nbytes(self.num_codes, 1)
        if mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == nbytes:
            packed = mask.detach().clone()
            keep = unpack_codes(packed, 1, self.num_codes).bool()
        elif mask.dtype == torch.bool and mask.numel() == self.num_codes:
            keep = mask.detach().reshape(-1)
            packed = pack_codes(keep.to(torch.int64), 1)
        else:
            raise ValueError(f"mask {mask.dtype} {list(mask.shape)} does not match a {list(self.weight_shape)} "
                             f"weight with dim={self.dim}: expected bool [{self.groups_lut}, "
                             f"{self.num_codes // self.groups_lut}] or packed uint8 [{nbytes}]")
        codes = self.unpacked_codes().reshape(-1)
        if bool((codes[~keep.to(codes.device)] != 0).any()):
            self.codes = pack_codes(codes.masked_fill(~keep.to(codes.device), 0), self.bits).to(self.codes.device)
        self.mask = packed.to(self.codes.device)
        return self

    def unpacked_mask(self) -> torch.Tensor:
        """The pruning mask bool [groups, m] (True = kept); all True when the layer has no mask."""
        if self.mask is None:
            return torch.ones(self.groups_lut, self.num_codes // self.groups_lut, dtype=torch.bool,
                              device=self.codes.device)
        return unpack_codes(self.mask, 1, self.num_codes).bool().view(self.groups_lut, -1)

    @property
    def sparsity(self) -> float:
        """Fraction of the d-vectors pruned (0.0 without a mask)."""
        if self.mask is None:
            return 0.0
        return 1 - int(self.unpacked_mask().sum()) / max(self.num_codes, 1)

    def decoded_lut(self) -> torch.Tensor:
        """The LUT [groups, k, d] as values: lut itself, or int8 entries times lut_scale (float32)."""
        if self.lut_scale is None:
            return self.lut
        return self.lut.to(torch.float32) * self.lut_scale.view(-1, 1, 1)

    def _apply_scale(self, weight: torch.Tensor) -> torch.Tensor:
        if self.channel_scale is None:
            return weight
        return weight * self.channel_scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))

    def unpacked_codes(self) -> torch.Tensor:
        """codes [groups, m] int64."""
        return unpack_codes(self.codes, self.bits, self.num_codes).view(self.groups_lut, -1)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense weight [weight_shape] in the layer's dtype, decoded now (never from the cache).

        Under `torch.export` / `torch.compile` it is decoded with Core ATen ops only, so the traced
        program keeps codes + LUT and runs on ExecuTorch's portable kernels.
        """
        portable = torch.compiler.is_compiling()
        decode = dequantize_portable if portable else dequantize_packed
        weight = decode(self.codes, self.bits, self.num_codes, self.decoded_lut(), self.weight_dtype,
                        self.weight_shape)
        if self.mask is not None:  # pruned vectors: exactly 0
            weight = (apply_packed_mask_portable if portable else apply_packed_mask)(weight, self.mask, self.num_codes)
        return self._apply_scale(weight)

    # ---- dense-weight cache -------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The dense weight [weight_shape]: from the cache when it is valid, else decoded (and cached)."""
        if not self._cacheable():
            return self.dequantize_weight()
        key = self._state_key()
        cache = self._cache
        if cache is None or key != self._cache_key or (cache.is_inference() and not torch.is_inference_mode_enabled()):
            cache = self.dequantize_weight()
            self._cache, self._cache_key = cache, key
        return cache

    def clear_weight_cache(self) -> None:
        self._cache, self._cache_key = None, None

    def _cacheable(self) -> bool:
        if not self.cache_weight or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False
        if torch.compiler.is_compiling():  # torch.export / torch.compile: keep the LUT lookup in the graph
            return False
        return not (self.lut.requires_grad and torch.is_grad_enabled())  # a LUT being trained

    def _state_key(self) -> tuple:
        """Changes whenever codes or LUT are replaced or written in place."""
        return tuple((id(t), t.device, t.dtype, -1 if t.is_inference() else t._version)
                     for t in (self.codes, self.lut, self.channel_scale, self.lut_scale, self.mask) if t is not None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("codes", "lut", "channel_scale", "lut_scale", "mask"):
            self.__dict__["_cache"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self.clear_weight_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.clear_weight_cache()
        self._check_loaded_layout(state_dict, prefix)
        saved_mask = state_dict.get(prefix + "mask")
        if saved_mask is not None and self.mask is None:  # a pruned layer's state: make room for its mask
            self.mask = torch.empty_like(saved_mask, device=self.codes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_layout(self, state_dict, prefix: str) -> None:
        """ValueError naming the layer and both configurations when a state_dict was converted with other
        bits / dim / LUT groups (instead of PyTorch's raw size-mismatch listing)."""
        codes, lut = state_dict.get(prefix + "codes"), state_dict.get(prefix + "lut")
        if codes is None or lut is None or (codes.shape == self.codes.shape and lut.shape == self.lut.shape):
            return
        if lut.dim() == 3 and lut.shape[1] > 0 and lut.shape[1] & (lut.shape[1] - 1) == 0:
            theirs = f"bits={lut.shape[1].bit_length() - 1}, dim={lut.shape[2]}, luts={lut.shape[0]}"
        else:
            theirs = f"lut {list(lut.shape)}"
        raise ValueError(f"layer {prefix[:-1] or type(self).__name__!r}: the state_dict was converted with {theirs} "
                         f"({codes.numel()} code bytes) but this {type(self).__name__} has bits={self.bits}, "
                         f"dim={self.dim}, luts={self.groups_lut} ({self.codes.numel()} code bytes) for a "
                         f"{list(self.weight_shape)} weight; convert the model with the same config before loading")

    # ---- description, for files and exporters --------------------------------------------------
    def hyperparameters(self) -> dict:
        """JSON-able constructor arguments besides codes / lut / bits / bias / dtype."""
        return {"weight_shape": list(self.weight_shape)}

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                             bias: Optional[torch.Tensor], dtype: torch.dtype) -> "PalettizedModule":
        """Inverse of `hyperparameters()` (codes may be packed bytes)."""
        raise NotImplementedError

    @classmethod
    def float_hyperparameters(cls, module: nn.Module) -> dict:
        """`hyperparameters()` that palettizing the float layer `module` gives."""
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        """The equivalent float layer holding `dequantize_weight()` (for exporters that recompress it)."""
        raise NotImplementedError(f"{type(self).__name__} has no float layer equivalent")

    def _float_bias(self) -> Optional[nn.Parameter]:
        return None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        scaled = ", per_channel_scale=True" if self.channel_scale is not None else ""
        pruned = f", sparsity={self.sparsity:.4f}" if self.mask is not None else ""
        return (f"weight_shape={list(self.weight_shape)}, bits={self.bits}, dim={self.dim}, "
                f"luts={self.groups_lut}, lut_dtype={self.lut.dtype}{scaled}{pruned}, cache_weight={self.cache_weight}")


class PalettizedWeight(PalettizedModule):
    """A weight stored as packed n-bit codes + LUT (no layer around it); forward() returns the dense weight.

    Buffers: codes uint8 [ceil(numel / d * bits / 8)], lut [groups, 2**bits, d] (lut_dtype).
    forward() -> weight [weight_shape] in `dtype`. PT2E graphs call it where the float graph read a weight.
    """

    def __init__(self, codes: torch.Tensor, lut: torch.Tensor, bits: int, weight_shape: tuple[int, ...],
                 dtype: torch.dtype, cache_weight: bool = True) -> None:
        super().__init__(weight_shape, codes, lut, bits, None, dtype, cache_weight)

    @classmethod
    def from_hyperparameters(cls, hyperparameters, codes, lut, bits, bias, dtype) -> "PalettizedWeight":
        return cls(codes, lut, bits, tuple(hyperparameters["weight_shape"]), dtype)

    def forward(self) -> torch.Tensor:
        return self.dense_weight()


class PalettizedLinear(PalettizedModule):
    """y [..., out] = x [..., in] @ W.T + bias, W [out, in] decoded from codes + LUT."""

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                 cache_weight: bool = True) -> None:
        super().__init__((out_features, in_features), codes, lut, bits, bias, dtype, cache_weight)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, module: nn.Linear, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> "PalettizedLinear":
        bias = module.bias if bias is None else bias
        return cls(module.in_features, module.out_features, codes, lut, bits, bias, module.weight.dtype)

    def hyperparameters(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def float_hyperparameters(cls, module: nn.Linear) -> dict:
        return {"in_features": module.in_features, "out_features": module.out_features}

    @classmethod
    def from_hyperparameters(cls, hyperparameters, codes, lut, bits, bias, dtype) -> "PalettizedLinear":
        return cls(hyperparameters["in_features"], hyperparameters["out_features"], codes, lut, bits, bias, dtype)

    def to_float(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.dequantize_weight(), requires_grad=False)
        layer.bias = self._float_bias()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


class _PalettizedConvNd(PalettizedModule):
    """y [N, out, *L'] = conv(x [N, in, *L], W [out, in / groups, *kernel]) + bias."""

    _conv = None  # F.conv1d / F.conv2d
    _tuple = None

    def __init__(self, weight_shape, codes, lut, bits, bias, stride, padding, dilation, groups,
                 padding_mode: str = "zeros", dtype: torch.dtype = torch.float32, cache_weight: bool = True) -> None:
        super().__init__(weight_shape, codes, lut, bits, bias, dtype, cache_weight)
        self.out_channels, in_per_group = weight_shape[0], weight_shape[1]
        self.in_channels = in_per_group * groups
        self.kernel_size = tuple(weight_shape[2:])
        self.stride, self.dilation, self.groups = self._tuple(stride), self._tuple(dilation), groups
        self.padding = padding if isinstance(padding, str) else self._tuple(padding)
        self.padding_mode = padding_mode
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError(f"padding={padding!r} with padding_mode={padding_mode!r} is not supported")
            self._pad = _reverse_repeat_tuple(self.padding, 2)

    @classmethod
    def from_float(cls, module, codes, lut, bits, weight=None, bias=None):
        bias = module.bias if bias is None else bias
        return cls(tuple(module.weight.shape), codes, lut, bits, bias, module.stride, module.padding,
                   module.dilation, module.groups, module.padding_mode, module.weight.dtype)

    @staticmethod
    def _conv_hyperparameters(module) -> dict:
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        shape = module.weight_shape if isinstance(module, PalettizedModule) else module.weight.shape
        return {"weight_shape": list(shape),
                "stride": list(module.stride), "padding": padding, "dilation": list(module.dilation),
                "groups": module.groups, "padding_mode": module.padding_mode}

    def hyperparameters(self) -> dict:
        return self._conv_hyperparameters(self)

    @classmethod
    def float_hyperparameters(cls, module) -> dict:
        return cls._conv_hyperparameters(module)

    @classmethod
    def from_hyperparameters(cls, hyperparameters, codes, lut, bits, bias, dtype):
        h = hyperparameters
        padding = h["padding"] if isinstance(h["padding"], str) else tuple(h["padding"])
        return cls(tuple(h["weight_shape"]), codes, lut, bits, bias, tuple(h["stride"]), padding,
                   tuple(h["dilation"]), h["groups"], h["padding_mode"], dtype)

    def to_float(self) -> nn.Module:
        float_type = nn.Conv1d if len(self.weight_shape) == 3 else nn.Conv2d
        layer = float_type(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                           self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        layer.weight = nn.Parameter(self.dequantize_weight(), requires_grad=False)
        layer.bias = self._float_bias()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return type(self)._conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return type(self)._conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, " + super().extra_repr())


class PalettizedConv1d(_PalettizedConvNd):
    _conv = staticmethod(F.conv1d)
    _tuple = staticmethod(_single)


class PalettizedConv2d(_PalettizedConvNd):
    _conv = staticmethod(F.conv2d)
    _tuple = staticmethod(_pair)


class PalettizedEmbedding(PalettizedModule):
    """y [..., embedding_dim] = W[ids [...]], W [num_embeddings, embedding_dim] decoded from codes + LUT."""

    def __init__(self, num_embeddings: int, embedding_dim: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                 padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 cache_weight: bool = True) -> None:
        super().__init__((num_embeddings, embedding_dim), codes, lut, bits, None, dtype, cache_weight)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_float(cls, module: nn.Embedding, codes, lut, bits, weight=None, bias=None) -> "PalettizedEmbedding":
        if module.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalises its weight in place; "
                             "a palettized embedding cannot, so convert one without max_norm")
        return cls(module.num_embeddings, module.embedding_dim, codes, lut, bits, module.padding_idx,
                   module.weight.dtype)

    def hyperparameters(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    @classmethod
    def float_hyperparameters(cls, module: nn.Embedding) -> dict:
        return {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx}

    @classmethod
    def from_hyperparameters(cls, hyperparameters, codes, lut, bits, bias, dtype) -> "PalettizedEmbedding":
        h = hyperparameters
        return cls(h["num_embeddings"], h["embedding_dim"], codes, lut, bits, h["padding_idx"], dtype)

    def to_float(self) -> nn.Embedding:
        layer = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        layer.weight = nn.Parameter(self.dequantize_weight(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.dense_weight(), self.padding_idx)
