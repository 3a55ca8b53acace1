"""The converted form: a palettized weight on the unchanged float module.

`PalettizedTensor` is a tensor subclass with the float weight's shape and dtype that stores

    codes:  uint8 [ceil(num_codes * bits / 8)]   the packed code of every d-vector (`pack_codes`),
    lut:    [groups, 2**bits, d]                  the lookup table(s), in the LUT dtype (int8: times lut_scale),
    channel_scale: [out], [out, blocks] or None   per-output-channel (or per-block of a row) scale, float32 / float16,
    lut_scale: float32 [groups] or None           an int8 LUT's per-LUT scale,
    mask:   uint8 [ceil(num_codes / 8)] or None   pruning mask, 1 bit per d-vector (1 = kept; pruned codes are 0),

and the `PaletteSpec` (bits, dim, the clustered layout's shape, LUT groups, dtype, transposed) that the
clusterer's export produced. A converted `nn.Linear` stays an `nn.Linear`: only its `weight` Parameter is a
PalettizedTensor. `F.linear`, `F.embedding` and `F.conv*` on it decode it (a LUT kernel takes `F.linear` where it
wins); any other op sees the decoded dense weight. The weight is read-only.

cache_weight (default True) keeps the decoded dense weight after the first use, so later forwards cost what the
float layer costs (rebuilt when codes, LUT, scales or mask are replaced or written in place); False decodes on
every use and keeps only the packed form resident (the LUT kernel then runs `F.linear` without decoding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .channel_scale import check_scale_shape, scale_weight
from .dequantize import apply_packed_mask, dequantize_packed
from .lut_linear import lut_linear, prefers_lut_kernel
from .packing import pack_codes, packed_nbytes, unpack_codes
from .portable_dequantize import apply_packed_mask_portable, dequantize_portable

__all__ = ["PaletteSpec", "PalettizedTensor", "is_palettized", "palettized_parameters"]

_INNER = ("codes", "lut", "channel_scale", "lut_scale", "mask")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class PaletteSpec:
    """How a palettized weight is laid out (everything but the tensors).

    bits: bits per code (1..16); dim: weights per code (d); shape: the clustered layout [out, ...] (output
    channels first; a row-major reshape to [lut_groups, num_codes / lut_groups, dim] gives the vectors in code
    order); lut_groups: LUTs (each serves out / lut_groups consecutive output channels); dtype: the float
    weight's dtype (what decoding returns); transposed: the module stores the weight as the transpose of `shape`
    (Hugging Face's Conv1D keeps [in, out]).
    """

    bits: int
    dim: int
    shape: tuple[int, ...]
    lut_groups: int = 1
    dtype: torch.dtype = torch.float32
    transposed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not 1 <= self.bits <= 16:
            raise ValueError(f"PaletteSpec.bits={self.bits} is not allowed; expected 1..16")
        numel = math.prod(self.shape)
        if self.dim < 1 or numel % self.dim:
            raise ValueError(f"PaletteSpec.dim={self.dim} does not divide the {list(self.shape)} weight")
        if self.lut_groups < 1 or (numel // self.dim) % self.lut_groups:
            raise ValueError(f"PaletteSpec.lut_groups={self.lut_groups} does not divide the "
                             f"{numel // self.dim} codes of the {list(self.shape)} weight")
        if self.transposed and len(self.shape) != 2:
            raise ValueError(f"PaletteSpec.transposed needs a 2-d weight, not {list(self.shape)}")

    @property
    def num_codes(self) -> int:
        return math.prod(self.shape) // self.dim

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape the module sees: `shape`, or its transpose."""
        return tuple(reversed(self.shape)) if self.transposed else self.shape

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able description (defaults left out), inverse of `from_metadata`."""
        meta: dict[str, Any] = {"bits": self.bits, "shape": list(self.shape)}
        if self.dim != 1:
            meta["dim"] = self.dim
        if self.lut_groups != 1:
            meta["lut_groups"] = self.lut_groups
        if self.dtype != torch.float32:
            meta["dtype"] = _dtype_name(self.dtype)
        if self.transposed:
            meta["transposed"] = True
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "PaletteSpec":
        return cls(int(meta["bits"]), int(meta.get("dim", 1)), tuple(meta["shape"]), int(meta.get("lut_groups", 1)),
                   _dtype(meta.get("dtype", "float32")), bool(meta.get("transposed", False)))


class PalettizedTensor(torch.Tensor):
    """A weight stored as packed n-bit codes + LUT(s); see the module docstring. Build it with
    `PalettizedTensor.build(...)` (checks every shape) and put it on a module as
    `nn.Parameter(tensor, requires_grad=False)`."""

    codes: torch.Tensor
    lut: torch.Tensor
    channel_scale: Optional[torch.Tensor]
    lut_scale: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    spec: PaletteSpec
    cache_weight: bool

    @staticmethod
    def __new__(cls, codes, lut, spec, channel_scale=None, lut_scale=None, mask=None, cache_weight=True):
        return torch.Tensor._make_wrapper_subclass(cls, spec.stored_shape, dtype=spec.dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes: torch.Tensor, lut: torch.Tensor, spec: PaletteSpec,
                 channel_scale: Optional[torch.Tensor] = None, lut_scale: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, cache_weight: bool = True) -> None:
        self.codes, self.lut, self.spec = codes, lut, spec
        self.channel_scale, self.lut_scale, self.mask = channel_scale, lut_scale, mask
        self.cache_weight = cache_weight
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None

    @classmethod
    def build(cls, codes: torch.Tensor, lut: torch.Tensor, spec: PaletteSpec,
              channel_scale: Optional[torch.Tensor] = None, lut_scale: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, cache_weight: bool = True) -> "PalettizedTensor":
        """Check and pack. codes: integer [lut_groups, num_codes / lut_groups] (any shape of num_codes values in
        code order) or the packed uint8 [packed_nbytes(num_codes, bits)]; lut [lut_groups, 2**bits, dim];
        channel_scale [out] or [out, blocks] (per block of a row); lut_scale [lut_groups] (required for an int8
        LUT); mask bool (num_codes values, True = kept) or packed uint8 [packed_nbytes(num_codes, 1)]; pruned
        vectors' codes are set to 0."""
        n, k = spec.num_codes, 1 << spec.bits
        if list(lut.shape) != [spec.lut_groups, k, spec.dim]:
            raise ValueError(f"lut {list(lut.shape)} does not match bits={spec.bits}, dim={spec.dim}, "
                             f"lut_groups={spec.lut_groups}: expected [{spec.lut_groups}, {k}, {spec.dim}]")
        if codes.dtype == torch.uint8 and codes.dim() == 1 and codes.numel() == packed_nbytes(n, spec.bits):
            packed = codes.detach().clone()  # already packed (for 8 bits, packing is the identity)
        elif codes.numel() == n and not codes.is_floating_point():
            packed = pack_codes(codes.detach(), spec.bits)
        else:
            raise ValueError(f"codes {codes.dtype} {list(codes.shape)} do not hold the {n} codes of {spec.bits} bits "
                             f"of a {list(spec.shape)} weight with dim={spec.dim}: expected {n} integer codes or "
                             f"packed uint8 [{packed_nbytes(n, spec.bits)}]")
        if channel_scale is not None:
            check_scale_shape(channel_scale, spec.shape)
            dtype = torch.float16 if channel_scale.dtype == torch.float16 else torch.float32
            channel_scale = channel_scale.detach().to(dtype).clone()
        if lut.dtype == torch.int8:
            if lut_scale is None or list(lut_scale.shape) != [spec.lut_groups]:
                raise ValueError(f"an int8 lut needs its lut_scale float32 [{spec.lut_groups}]; got "
                                 f"{None if lut_scale is None else list(lut_scale.shape)}")
            lut_scale = lut_scale.detach().to(torch.float32).clone()
        elif lut_scale is not None:
            raise ValueError(f"lut_scale is for an int8 lut; this lut is {lut.dtype}")
        packed_mask = None
        if mask is not None:
            packed_mask, keep = _packed_mask(mask, n)
            flat = unpack_codes(packed, spec.bits, n)
            if bool((flat[~keep] != 0).any()):
                packed = pack_codes(flat.masked_fill(~keep, 0), spec.bits)
        return cls(packed, lut.detach().clone(), spec, channel_scale, lut_scale, packed_mask, cache_weight)

    # ---- what it holds ------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def cluster_dim(self) -> int:
        """d: weights per code (`dim` is the tensor's rank, as for every tensor)."""
        return self.spec.dim

    @property
    def num_codes(self) -> int:
        return self.spec.num_codes

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The clustered layout [out, ...] (the stored shape, or its transpose)."""
        return self.spec.shape

    @property
    def groups_lut(self) -> int:
        return self.spec.lut_groups

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.spec.dtype

    def inner_tensors(self) -> dict[str, torch.Tensor]:
        """{"codes", "lut"[, "channel_scale", "lut_scale", "mask"]}: what a file stores."""
        return {name: getattr(self, name) for name in _INNER if getattr(self, name) is not None}

    @property
    def nbytes_stored(self) -> int:
        """Bytes of codes + LUT + scales + mask."""
        return sum(t.numel() * t.element_size() for t in self.inner_tensors().values())

    def unpacked_codes(self) -> torch.Tensor:
        """codes int64 [lut_groups, num_codes / lut_groups]."""
        return unpack_codes(self.codes, self.bits, self.num_codes).view(self.groups_lut, -1)

    def unpacked_mask(self) -> torch.Tensor:
        """The pruning mask bool [lut_groups, num_codes / lut_groups] (True = kept; all True without a mask)."""
        if self.mask is None:
            return torch.ones(self.groups_lut, self.num_codes // self.groups_lut, dtype=torch.bool,
                              device=self.codes.device)
        return unpack_codes(self.mask, 1, self.num_codes).bool().view(self.groups_lut, -1)

    @property
    def sparsity(self) -> float:
        """Fraction of the d-vectors pruned (0.0 without a mask)."""
        return 0.0 if self.mask is None else 1 - int(self.unpacked_mask().sum()) / max(self.num_codes, 1)

    def decoded_lut(self) -> torch.Tensor:
        """The LUT [lut_groups, 2**bits, dim] as values: lut itself, or int8 entries times lut_scale (float32)."""
        if self.lut_scale is None:
            return self.lut
        return self.lut.to(torch.float32) * self.lut_scale.view(-1, 1, 1)

    # ---- decoding -----------------------------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The dense weight [stored shape] in the weight dtype, decoded now (never from the cache). Under
        `torch.export` / `torch.compile` with Core ATen ops only (the program keeps codes + LUT)."""
        return decode(self.spec, self.codes, self.decoded_lut(), self.channel_scale, self.mask)

    def dense(self) -> torch.Tensor:
        """The dense weight: from the cache when it is valid (cache_weight), else decoded."""
        trains_lut = self.lut.requires_grad and torch.is_grad_enabled()
        if not self.cache_weight or trains_lut or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.dequantize()
        key = tuple((id(t), t.device, -1 if t.is_inference() else t._version) for t in self.inner_tensors().values())
        if self._cache is None or self._cache[0] != key or (self._cache[1].is_inference()
                                                            and not torch.is_inference_mode_enabled()):
            self._cache = (key, self.dequantize())
        return self._cache[1]

    def clear_cache(self) -> None:
        self._cache = None

    def __repr__(self, *, tensor_contents=None) -> str:
        scale = self.channel_scale
        extra = f", lut_dtype={self.lut.dtype}" + ("" if scale is None else ", per_channel_scale=True" if scale.dim() == 1
                                                    else f", scales={list(scale.shape)}")
        extra += f", sparsity={self.sparsity:.4f}" if self.mask is not None else ""
        return (f"PalettizedTensor(shape={list(self.shape)}, bits={self.bits}, dim={self.cluster_dim}, "
                f"luts={self.groups_lut}{extra}, dtype={self.dtype}, cache_weight={self.cache_weight})")

    # ---- tensor protocol ----------------------------------------------------------------------------------------
    def __tensor_flatten__(self):
        names = [name for name in _INNER if getattr(self, name) is not None]
        return names, (self.spec, self.cache_weight)

    @staticmethod
    def __tensor_unflatten__(inner: dict, context, outer_size, outer_stride) -> "PalettizedTensor":
        spec, cache_weight = context
        return PalettizedTensor._from_inner(inner, spec, cache_weight)

    @staticmethod
    def _from_inner(inner: dict, spec: PaletteSpec, cache_weight: bool) -> "PalettizedTensor":
        """From `inner_tensors()`' dict, unchecked (the tensors already passed `build`)."""
        return PalettizedTensor(inner["codes"], inner["lut"], spec, inner.get("channel_scale"), inner.get("lut_scale"),
                                inner.get("mask"), cache_weight)

    def __reduce_ex__(self, protocol):
        return _rebuild, (self.spec.to_metadata(), self.cache_weight, self.inner_tensors())

    def _map_inner(self, fn: Callable[[torch.Tensor], torch.Tensor], spec: Optional[PaletteSpec] = None
                   ) -> "PalettizedTensor":
        inner = {name: fn(t) for name, t in self.inner_tensors().items()}
        return PalettizedTensor._from_inner(inner, spec or self.spec, self.cache_weight)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func._schema.is_mutable and any(isinstance(a, PalettizedTensor) and _mutated(func, i)
                                           for i, a in enumerate(args)):
            raise ValueError(f"{func}: a palettized weight is read-only (codes + LUT); write to a float layer, or "
                             "convert again after changing the weight")
        return func(*tree_map(_dense_or_same, args), **tree_map(_dense_or_same, kwargs))


def decode(spec: PaletteSpec, codes: torch.Tensor, lut: torch.Tensor, channel_scale: Optional[torch.Tensor],
           mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The dense weight [spec.stored_shape] from packed codes, the decoded lut [groups, k, d], scales and mask."""
    portable = torch.compiler.is_compiling()
    decoder = dequantize_portable if portable else dequantize_packed
    weight = decoder(codes, spec.bits, spec.num_codes, lut, spec.dtype, spec.shape)
    if mask is not None:  # pruned vectors: exactly 0
        weight = (apply_packed_mask_portable if portable else apply_packed_mask)(weight, mask, spec.num_codes)
    if channel_scale is not None:
        weight = scale_weight(weight, channel_scale.to(weight.dtype))
    return weight.t() if spec.transposed else weight


def _packed_mask(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [packed_nbytes(count, 1)], keep bool [count]) from either form."""
    nbytes = packed_nbytes(count, 1)
    if mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == nbytes:
        return mask.detach().clone(), unpack_codes(mask, 1, count).bool()
    if mask.dtype == torch.bool and mask.numel() == count:
        keep = mask.detach().reshape(-1)
        return pack_codes(keep.to(torch.int64), 1), keep
    raise ValueError(f"mask {mask.dtype} {list(mask.shape)} does not match {count} codes: expected bool "
                     f"({count} values) or packed uint8 [{nbytes}]")


def _rebuild(meta: dict, cache_weight: bool, inner: dict) -> PalettizedTensor:
    return PalettizedTensor._from_inner(inner, PaletteSpec.from_metadata(meta), cache_weight)


torch.serialization.add_safe_globals([_rebuild])  # torch.load(weights_only=True) of a state_dict with one


def _dense_or_same(value: Any) -> Any:
    return value.dense() if isinstance(value, PalettizedTensor) else value


def _mutated(func, index: int) -> bool:
    arguments = func._schema.arguments
    return index < len(arguments) and arguments[index].alias_info is not None and arguments[index].alias_info.is_write


def is_palettized(tensor: Any) -> bool:
    return isinstance(tensor, PalettizedTensor)


def palettized_parameters(module: torch.nn.Module) -> dict[str, PalettizedTensor]:
    """"<module path>.<param name>" -> PalettizedTensor of every palettized Parameter of `module` (a Parameter shared
    by several modules, a tied weight, once, under its first name)."""
    return {name: p for name, p in module.named_parameters() if isinstance(p, PalettizedTensor)}


# ---- torch functions: decode (or run the LUT kernel) ------------------------------------------------------------
def _linear(input, weight, bias=None):
    if isinstance(weight, PalettizedTensor) and not isinstance(input, PalettizedTensor):
        if _lut_kernel_applies(input, weight):
            w = weight
            return lut_linear(input, w.codes, w.lut, w.bits, w.shape[0], w.shape[1], channel_scale=w.channel_scale,
                              lut_scale=w.lut_scale, mask=w.mask, bias=bias)
        return F.linear(input, weight.dense(), bias)
    return F.linear(_dense_or_same(input), _dense_or_same(weight), _dense_or_same(bias))


def _lut_kernel_applies(x: torch.Tensor, weight: PalettizedTensor) -> bool:
    """The LUT kernel runs F.linear where it wins: no dense cache, eager CPU, and a batch small enough
    (`prefers_lut_kernel`: CPU, the op built, not compiling); otherwise the weight is decoded."""
    if weight.cache_weight or weight.spec.transposed or torch.jit.is_tracing():
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    return prefers_lut_kernel(x, weight.shape[0], weight.shape[1], weight.bits, weight.cluster_dim, weight.groups_lut)


def _decoding(func):
    def run(*args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(_dense_or_same, args), **tree_map(_dense_or_same, kwargs))
    return run


_aten = torch.ops.aten
_FUNCTIONS: dict = {F.linear: _linear, _aten.linear.default: _linear}
for _func in (F.embedding, F.conv1d, F.conv2d, _aten.embedding.default, _aten.conv1d.default,
              _aten.conv2d.default):
    _FUNCTIONS[_func] = _decoding(_func)


# ---- aten ops on the subclass itself ------------------------------------------------------------------------------
def _shallow(self: PalettizedTensor, *args, **kwargs) -> PalettizedTensor:
    new = PalettizedTensor._from_inner(self.inner_tensors(), self.spec, self.cache_weight)
    new._cache = self._cache
    return new


def _to_copy(self: PalettizedTensor, *, dtype=None, device=None, layout=None, pin_memory=None,
             non_blocking=False, memory_format=None) -> PalettizedTensor:
    """`.to(device)` moves the codes, LUT, scales and mask; `.to(dtype)` changes what decoding returns (the LUT and
    scales keep their stored precision)."""
    spec = self.spec
    if dtype is not None and dtype != spec.dtype:
        if not dtype.is_floating_point:
            raise ValueError(f"a palettized weight decodes to a float dtype, not {dtype}")
        spec = PaletteSpec(spec.bits, spec.dim, spec.shape, spec.lut_groups, dtype, spec.transposed)
    return self._map_inner(lambda t: t.to(device=device, non_blocking=non_blocking), spec)


def _clone(self: PalettizedTensor, *, memory_format=None) -> PalettizedTensor:
    return self._map_inner(torch.clone)


def _copy_(self: PalettizedTensor, src: Any, non_blocking: bool = False) -> PalettizedTensor:
    """load_state_dict: take another palettized weight of the same layout."""
    if not isinstance(src, PalettizedTensor):
        raise ValueError("cannot load a dense tensor into a palettized weight; load a converted state_dict or "
                         "use idkm_plugin.export.load_palettized")
    if src.spec != self.spec or set(src.inner_tensors()) != set(self.inner_tensors()):
        raise ValueError(f"the state_dict's palettized weight ({src.spec}, with {sorted(src.inner_tensors())}) does "
                         f"not match this one ({self.spec}, with {sorted(self.inner_tensors())}); convert the model "
                         "with the same config before loading")
    for name, tensor in self.inner_tensors().items():
        theirs = getattr(src, name)
        if theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
            raise ValueError(f"palettized weight: {name} {theirs.dtype} {list(theirs.shape)} does not match "
                             f"{tensor.dtype} {list(tensor.shape)}")
        tensor.copy_(theirs, non_blocking)
    self._cache = None
    return self


_DISPATCH: dict = {_aten.detach.default: _shallow, _aten.alias.default: _shallow,
                   _aten._to_copy.default: _to_copy, _aten.clone.default: _clone, _aten.copy_.default: _copy_}
