"""Clustering configuration: one layer (`ClusterConfig`) and a whole model (`ModelConfig`).

Both are frozen dataclasses validated in ``__post_init__``; invalid values raise
``ValueError`` naming the field, the value and what is allowed.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Sequence

import torch

from .atomic import atomic_write_text
from .core.enums import Init, Method, Solver, Uniquify


class Granularity(str, enum.Enum):
    """One lookup table per tensor, or one per group of `group_size` output channels."""

    PER_TENSOR = "per_tensor"
    PER_GROUPED_CHANNEL = "per_grouped_channel"


_LUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "int8": torch.int8}
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ChannelScale(str, enum.Enum):
    """How the per-output-channel scale is computed (coremltools' `enable_per_channel_scale`)."""

    MAX_ABS = "max_abs"
    RMS = "rms"


# what per_channel_scale=True means: the measured better of the two (see ClusterConfig.per_channel_scale)
DEFAULT_CHANNEL_SCALE = ChannelScale.MAX_ABS


def _enum_value(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"ClusterConfig.{name}={value!r} is not allowed; use one of {allowed}") from None


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ClusterConfig.{name}={value!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class ClusterConfig:
    """How to cluster one layer's weight.

    Attributes:
        method: "dkm", "idkm" or "idkm_jfb".
        bits: bits per code, 1..16; the LUT has k = 2**bits entries.
        dim: cluster dimension d; each code stands for d consecutive weights (bits/dim bits per weight).
        tau: softmax temperature on squared distances, absolute as in the DKM paper; None derives it
            from the weight: tau = 0.5 * Var(W) / k**(2/d), which reproduces DKM's tuned values for
            typical conv layers and keeps one setting valid across layers of different scale.
        max_iter: soft k-means iterations (t); for dkm, the number unrolled under autograd; for idkm /
            idkm_jfb, at most this many evaluations of the soft k-means map by the solver per step (10x that for
            the first, cold solve after the centroids were set).
        tol: stop when max |C_t+1 - C_t| <= tol * max |W|. The default 1e-4 is below a float16 LUT's precision
            (4.9e-4 of max |W|) and above the float32 rounding of the map's sums over 10^5..10^6 weights, where
            1e-5 stalls: warm-started steps then need one map evaluation instead of max_iter.
        init: "kmeans++", "linear", "density" or "random" (used once; later steps warm-start).
        granularity: "per_tensor" or "per_grouped_channel" (one LUT per `group_size` output channels).
        group_size: output channels per LUT for "per_grouped_channel".
        uniquify: "auto", "on", "off" or "grid" (eDKM; idkm / idkm_jfb only). "on": cluster the distinct
            values weighted by their counts (exact); "grid" (dim 1): round float32 weights to a uniform
            16-bit grid for the clustering, straight-through for the gradient; "auto": "on" for
            float16/bfloat16 weights, "grid" for float32 weights of >= 262,144 per LUT, else "off".
        chunk_size: rows per chunk in the memory-bounded fixed point and backward; None picks it
            from a memory budget; 0 keeps the whole attention matrix for backward (the IDKM
            paper's O(m * 2**bits) mode, faster backward, more memory).
        adjoint_max_iter, adjoint_tol: the iterative adjoint solve of idkm.
        lut_dtype: "float32", "float16", "bfloat16" or "int8" for the converted lookup table. "int8": each LUT
            is stored as symmetric int8 entries times one float32 scale (max |entry| / 127), as coremltools'
            `quantize_lut`; eval-mode QAT already uses the int8-rounded LUT, so converted == eval exactly.
        per_channel_scale: False (off), "max_abs" or "rms" (True = "max_abs"): each output channel (dim 0 of the
            weight) is divided by its own scale (its max |w|, or its root mean square) before clustering and
            multiplied back after; the scale is a function of the weight, so the gradient flows through it
            in every method; the converted layer stores the scales [out] beside the LUT (4 bytes per output
            channel, 2 with scale_dtype="float16"). Measured on the pretrained MNIST CNN's conv weights, max_abs
            clusters better (see tests/test_per_channel_scale.py and the README); it is coremltools' choice too.
        scale_block_size: 0 (one scale per output channel) or n >= 1: one scale per block of consecutive weights
            along each output channel's row (the input dimension of a Linear; any4's and GGUF's group-wise
            scales), of the largest size <= n that divides the row length (`scale_block`): n=128 gives blocks
            of 128 on 2048-wide rows and of 96 on SmolLM2's 576-wide ones. The converted layer stores the
            scales [out, row / block]. Needs per_channel_scale (which says how each block's scale is computed).
        scale_dtype: "float32" or "float16" for the stored per-channel scales. "float16" halves their cost
            (2 bytes per output channel); the scales are rounded to float16 in training too (straight-through
            for the gradient, which stays float32), so converted == eval-mode QAT stays exact.
        start_step: training steps to run unclustered before clustering switches on.
        seed: seed of the initialisation.
        solver: fixed-point solver of idkm / idkm_jfb: "anderson" (safeguarded Anderson acceleration)
            or "picard" (plain iteration, DKM's path); max_iter bounds its map evaluations.
        sparsity: fraction s of the layer's d-vectors pruned by magnitude (L2 norm of each d-vector of the raw
            weight, layer-wise), 0 <= s < 1; exactly round(s_t * m_total) vectors end up pruned. Pruned weights
            are exactly zero, get no gradient, are left out of the clustering (soft k-means and init run on the
            survivors) and are stored as a 1-bit-per-vector mask beside the codes (see `sparsity_at`).
        prune_start: clustering step (training forwards counted by the clusterer) at which pruning starts;
            None means `start_step`, the first clustered training step.
        prune_steps: 0 prunes once (one-shot, at prune_start); n > 0 ramps the sparsity with Zhu & Gupta's
            cubic schedule s_t = s * (1 - (1 - (t - prune_start) / n)**3) over n steps, then keeps it.
    """

    method: Method | str = Method.IDKM
    bits: int = 4
    dim: int = 1
    tau: Optional[float] = None
    max_iter: int = 30
    tol: float = 1e-4
    init: Init | str = Init.KMEANS_PP
    granularity: Granularity | str = Granularity.PER_TENSOR
    group_size: int = 0
    uniquify: Uniquify | str = Uniquify.AUTO
    chunk_size: Optional[int] = None
    adjoint_max_iter: int = 100
    adjoint_tol: float = 1e-4
    lut_dtype: str = "float32"
    start_step: int = 0
    seed: int = 0
    solver: Solver | str = Solver.ANDERSON
    per_channel_scale: bool | ChannelScale | str = False
    scale_dtype: str = "float32"
    scale_block_size: int = 0
    sparsity: float = 0.0
    prune_start: Optional[int] = None
    prune_steps: int = 0

    def __post_init__(self) -> None:
        if self.per_channel_scale is True:
            object.__setattr__(self, "per_channel_scale", DEFAULT_CHANNEL_SCALE)
        elif self.per_channel_scale is not False and self.per_channel_scale is not None:
            object.__setattr__(self, "per_channel_scale",
                               _enum_value(ChannelScale, "per_channel_scale", self.per_channel_scale))
        else:
            object.__setattr__(self, "per_channel_scale", False)
        object.__setattr__(self, "method", _enum_value(Method, "method", self.method))
        object.__setattr__(self, "init", _enum_value(Init, "init", self.init))
        object.__setattr__(self, "granularity", _enum_value(Granularity, "granularity", self.granularity))
        object.__setattr__(self, "uniquify", _enum_value(Uniquify, "uniquify", self.uniquify))
        object.__setattr__(self, "solver", _enum_value(Solver, "solver", self.solver))
        _check(_is_int(self.bits) and 1 <= self.bits <= 16, "bits", self.bits, "an integer in 1..16")
        _check(_is_int(self.dim) and self.dim >= 1, "dim", self.dim, "an integer >= 1")
        _check(self.tau is None or (_is_num(self.tau) and 0 < self.tau < math.inf), "tau", self.tau,
               "a finite positive float, or None for the weight-derived default")
        _check(_is_int(self.max_iter) and self.max_iter >= 1, "max_iter", self.max_iter, "an integer >= 1")
        _check(_is_num(self.tol) and self.tol >= 0, "tol", self.tol, "a float >= 0")
        _check(_is_int(self.group_size) and self.group_size >= 0, "group_size", self.group_size, "an integer >= 0")
        if self.granularity is Granularity.PER_GROUPED_CHANNEL:
            _check(self.group_size >= 1, "group_size", self.group_size,
                   "an integer >= 1 when granularity='per_grouped_channel'")
        _check(self.chunk_size is None or (_is_int(self.chunk_size) and self.chunk_size >= 0),
               "chunk_size", self.chunk_size, "None (automatic), 0 (no chunking) or a positive integer")
        _check(_is_int(self.adjoint_max_iter) and self.adjoint_max_iter >= 1, "adjoint_max_iter",
               self.adjoint_max_iter, "an integer >= 1")
        _check(_is_num(self.adjoint_tol) and self.adjoint_tol > 0, "adjoint_tol", self.adjoint_tol, "a float > 0")
        _check(self.lut_dtype in _LUT_DTYPES, "lut_dtype", self.lut_dtype, f"one of {sorted(_LUT_DTYPES)}")
        _check(self.scale_dtype in _SCALE_DTYPES, "scale_dtype", self.scale_dtype, f"one of {sorted(_SCALE_DTYPES)}")
        _check(_is_int(self.scale_block_size) and self.scale_block_size >= 0, "scale_block_size",
               self.scale_block_size, "an integer >= 0 (0: one scale per output channel)")
        if self.scale_block_size and not self.per_channel_scale:
            raise ValueError(f"ClusterConfig.scale_block_size={self.scale_block_size} is not allowed with "
                             "per_channel_scale=False; set per_channel_scale='max_abs' (or 'rms') for block scales")
        _check(_is_int(self.start_step) and self.start_step >= 0, "start_step", self.start_step, "an integer >= 0")
        _check(_is_int(self.seed), "seed", self.seed, "an integer")
        _check(_is_num(self.sparsity) and 0 <= self.sparsity < 1, "sparsity", self.sparsity,
               "a float in [0, 1) (the fraction of weight vectors pruned)")
        _check(self.prune_start is None or (_is_int(self.prune_start) and self.prune_start >= 0), "prune_start",
               self.prune_start, "None (= start_step) or an integer >= 0")
        _check(_is_int(self.prune_steps) and self.prune_steps >= 0, "prune_steps", self.prune_steps,
               "an integer >= 0 (0: one-shot pruning)")
        if self.method is Method.DKM and self.uniquify in (Uniquify.ON, Uniquify.GRID):
            raise ValueError(f"ClusterConfig.uniquify={self.uniquify.value!r} is not allowed with method='dkm': "
                             "uniquification needs the implicit backward; use method='idkm' or 'idkm_jfb'")
        if self.uniquify is Uniquify.GRID and self.dim != 1:
            raise ValueError(f"ClusterConfig.uniquify='grid' is not allowed with dim={self.dim}; the 16-bit grid "
                             "rounds scalar weights: use dim=1, or uniquify='auto' / 'off'")

    @property
    def k(self) -> int:
        """Number of centroids, 2**bits."""
        return 1 << self.bits

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.dim

    @property
    def lut_group_size(self) -> int:
        """Output channels per LUT: 0 for one LUT per tensor."""
        return self.group_size if self.granularity is Granularity.PER_GROUPED_CHANNEL else 0

    def scale_block(self, row_length: int) -> int:
        """Weights per scale along a row of `row_length` weights: the row (per-channel scales, or
        scale_block_size 0), else the largest divisor of row_length that is <= scale_block_size."""
        if not self.scale_block_size or row_length <= self.scale_block_size:
            return row_length
        return next(b for b in range(self.scale_block_size, 0, -1) if row_length % b == 0)

    @property
    def pruning_start(self) -> int:
        """The clustering step at which pruning starts: prune_start, or start_step when it is None."""
        return self.start_step if self.prune_start is None else self.prune_start

    def sparsity_at(self, step: int) -> float:
        """Target sparsity s_t at clustering step `step` (0-based count of training forwards): 0 before
        `pruning_start`; then `sparsity` (one-shot), or the cubic ramp s * (1 - (1 - (t - t0) / n)**3)
        over n = prune_steps steps, then `sparsity`."""
        t0 = self.pruning_start
        if self.sparsity == 0 or step < t0:
            return 0.0
        if self.prune_steps == 0 or step >= t0 + self.prune_steps:
            return float(self.sparsity)
        return float(self.sparsity) * (1 - (1 - (step - t0) / self.prune_steps) ** 3)

    @property
    def lut_torch_dtype(self) -> torch.dtype:
        return _LUT_DTYPES[self.lut_dtype]

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    @property
    def lut_quantized(self) -> bool:
        """The LUT is stored as int8 entries + one float32 scale per LUT."""
        return self.lut_dtype == "int8"

    def palettized_nbytes(self, weight_shape: Sequence[int]) -> int:
        """Bytes of the palettized weight (packed codes + LUTs + LUT scales + channel scales + the pruning
        mask, 1 bit per d-vector when sparsity > 0; bias not counted) for a weight laid out [out, ...],
        exactly as the converted module stores it."""
        numel = math.prod(weight_shape)
        out = weight_shape[0] if len(weight_shape) else 1
        luts = 1 if self.lut_group_size == 0 else -(-out // self.lut_group_size)
        codes = (numel // self.dim * self.bits + 7) // 8
        lut = luts * self.k * self.dim * self.lut_torch_dtype.itemsize
        lut_scales = 4 * luts if self.lut_quantized else 0
        row = numel // out if out else 0
        scales_per_channel = row // self.scale_block(row) if row else 1
        channel_scales = self.scale_torch_dtype.itemsize * out * scales_per_channel if self.per_channel_scale else 0
        mask = (numel // self.dim + 7) // 8 if self.sparsity > 0 else 0
        return codes + lut + lut_scales + channel_scales + mask

    def replace(self, **changes: Any) -> "ClusterConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClusterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ClusterConfig got unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ModelConfig.llm: the LM head (tied to the embedding in most small LLMs), by its Hugging Face name
LLM_HEAD = r"re:(.*\.)?lm_head"
# ModelConfig.llm: weights per scale (at most) in the decoder's Linears and in the embedding / head
LLM_SCALE_BLOCK = 128
LLM_EMBEDDING_SCALE_BLOCK = 32

_SKIP = "skip"  # marker in dicts / YAML for "leave this layer float"


@dataclass(frozen=True)
class ModelConfig:
    """Per-layer mixed precision.

    Resolution order (as in coremltools and torchao): exact name in `by_name`, then `re:` keys of
    `by_name` (re.fullmatch, insertion order), then `by_type` (class name), then the small-layer rule
    (layers with fewer than `small_layer_params` weights get `small_layer`), then `default`.
    A value of None leaves the layer float.
    """

    default: Optional[ClusterConfig] = field(default_factory=ClusterConfig)
    by_type: Mapping[str, Optional[ClusterConfig]] = field(default_factory=dict)
    by_name: Mapping[str, Optional[ClusterConfig]] = field(default_factory=dict)
    small_layer_params: int = 0
    small_layer: Optional[ClusterConfig] = None
    skip_unclusterable: bool = False  # True: warn and leave float a layer `dim` does not divide
    strict: bool = False  # True: a by_name key or regex that matches no layer is an error, not a warning
    # True: a layer whose palettized form (codes + LUTs + scales) would take at least its float32 bytes is left
    # float, with a warning (every flow applies it through idkm_plugin.selection.checked_config)
    keep_float_if_larger: bool = True

    def __post_init__(self) -> None:
        for name, value in [("default", self.default), ("small_layer", self.small_layer)]:
            if value is not None and not isinstance(value, ClusterConfig):
                raise ValueError(f"ModelConfig.{name}={value!r} is not allowed; expected a ClusterConfig or None")
        for table_name in ("by_type", "by_name"):
            for key, value in getattr(self, table_name).items():
                if not isinstance(key, str):
                    raise ValueError(f"ModelConfig.{table_name} key {key!r} is not allowed; expected a string")
                if value is not None and not isinstance(value, ClusterConfig):
                    raise ValueError(f"ModelConfig.{table_name}[{key!r}]={value!r} is not allowed; "
                                     "expected a ClusterConfig or None")
                if table_name == "by_name" and key.startswith("re:"):
                    try:
                        re.compile(key[3:])
                    except re.error as err:
                        raise ValueError(f"ModelConfig.by_name key {key!r} is not a valid regex: {err}") from None
        if not _is_int(self.small_layer_params) or self.small_layer_params < 0:
            raise ValueError(f"ModelConfig.small_layer_params={self.small_layer_params!r} is not allowed; "
                             "expected an integer >= 0")

    def resolve(self, name: str, layer: torch.nn.Module | str,
                weight_shape: Optional[Sequence[int]] = None) -> Optional[ClusterConfig]:
        """The ClusterConfig for layer `name` (None: leave it float).

        `layer` is the module, or (where only a graph is at hand, as in PT2E) its class name with the
        weight's shape in `weight_shape`.
        """
        return self.resolve_rule(name, layer, weight_shape)[0]

    def resolve_rule(self, name: str, layer: torch.nn.Module | str,
                     weight_shape: Optional[Sequence[int]] = None) -> tuple[Optional[ClusterConfig], str]:
        """(config, the rule that gave it): "by_name:<key>", "by_type:<type>", "small_layer" or "default"."""
        if name in self.by_name:
            return self.by_name[name], f"by_name:{name}"
        for key, value in self.by_name.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return value, f"by_name:{key}"
        type_name = layer if isinstance(layer, str) else type(layer).__name__
        if type_name in self.by_type:
            return self.by_type[type_name], f"by_type:{type_name}"
        if weight_shape is None and not isinstance(layer, str):
            weight = getattr(layer, "weight", None)
            weight_shape = None if weight is None else weight.shape
        if self.small_layer_params and weight_shape is not None and math.prod(weight_shape) < self.small_layer_params:
            return self.small_layer, "small_layer"
        return self.default, "default"

    def with_overrides(self, **changes: Any) -> "ModelConfig":
        """A copy with the ClusterConfig fields `changes` set in every entry (default, small_layer, by_type and
        by_name; float (None) entries stay float): the one way to apply command-line overrides to a loaded
        YAML, e.g. `ModelConfig.from_yaml(path).with_overrides(method="dkm", max_iter=3)`."""
        known = {f.name for f in fields(ClusterConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"ModelConfig.with_overrides got unknown ClusterConfig field(s) {unknown}; allowed: "
                             f"{sorted(known)}")

        def apply(cfg: Optional[ClusterConfig]) -> Optional[ClusterConfig]:
            return None if cfg is None else cfg.replace(**changes)

        return replace(self, default=apply(self.default), small_layer=apply(self.small_layer),
                       by_type={k: apply(v) for k, v in self.by_type.items()},
                       by_name={k: apply(v) for k, v in self.by_name.items()})

    @classmethod
    def llm(cls, bits: int = 4, method: Method | str = Method.IDKM_JFB) -> "ModelConfig":
        """The recommended configuration for decoder LLMs (Llama, SmolLM, Qwen, Mistral and the like).

        - Every Linear of the decoder: `bits` per weight, one float16 LUT per tensor, and a float16 max |w| scale
          per block of at most 128 weights along each row (`scale_block_size=128`: 128 on 2048-wide rows, 96 on
          SmolLM2's 576-wide ones; any4's and GGUF's group-wise scales). Blocks are normalised, so one LUT fits
          them all and sensitivity-weighted k-means (`idkm_plugin.ptq`) spends its levels where the loss needs
          them across the whole tensor. On SmolLM2-135M this measured better than one scale per row, or one LUT
          per pair of rows (docs/llm.md).
        - The token embedding and the LM head: the same, with a scale per 32 weights. They are the first and the
          last layer and usually one tied Parameter; both resolve to this one config (a tie must), and a tied
          weight is clustered, stored and counted once. A head named other than `lm_head` needs the same config
          in by_name.
        - Norms, biases and rotary tables stay float (nothing of theirs is clustered).
        - A layer the config cannot cluster is left float with a warning (`skip_unclusterable`).

        Bits per weight, LUTs and scales counted, the tie counted once, measured with `idkm_plugin.plan` on
        SmolLM2-135M (134.5M weights, 21% of them in the tied embedding): bits + 0.229 (4.229 for bits=4; the
        decoder's scales cost 0.124, the embedding's 0.105). Models whose embedding is a smaller share pay less.

        `method` is the QAT method (`idkm_jfb`: time and memory independent of the iterations).
        """
        if not _is_int(bits) or not 2 <= bits <= 8:
            raise ValueError(f"ModelConfig.llm(bits={bits!r}) is not allowed; expected an integer in 2..8 "
                             "(bits per code of every decoder Linear)")

        def layer(scale_block_size: int) -> ClusterConfig:
            return ClusterConfig(method=method, bits=bits, lut_dtype="float16", per_channel_scale=ChannelScale.MAX_ABS,
                                 scale_dtype="float16", scale_block_size=scale_block_size)

        ends = layer(LLM_EMBEDDING_SCALE_BLOCK)
        return cls(default=layer(LLM_SCALE_BLOCK), by_type={"Embedding": ends}, by_name={LLM_HEAD: ends},
                   skip_unclusterable=True)

    def to_dict(self) -> dict[str, Any]:
        def enc(cfg: Optional[ClusterConfig]) -> Any:
            return _SKIP if cfg is None else cfg.to_dict()

        return {
            "default": enc(self.default),
            "by_type": {k: enc(v) for k, v in self.by_type.items()},
            "by_name": {k: enc(v) for k, v in self.by_name.items()},
            "small_layer_params": self.small_layer_params,
            "small_layer": enc(self.small_layer),
            "skip_unclusterable": self.skip_unclusterable,
            "strict": self.strict,
            "keep_float_if_larger": self.keep_float_if_larger,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict; layer entries are ClusterConfig fields, or null / "skip" for float.

        Entries in `by_type`, `by_name` and `small_layer` inherit unspecified fields from `default`.
        """
        allowed = {"default", "by_type", "by_name", "small_layer_params", "small_layer", "skip_unclusterable",
                   "strict", "keep_float_if_larger"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"ModelConfig got unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        default_raw = data.get("default", {})
        default = None if _is_skip(default_raw) else ClusterConfig.from_dict(default_raw or {})
        base = default.to_dict() if default is not None else {}

        def dec(raw: Any) -> Optional[ClusterConfig]:
            if _is_skip(raw):
                return None
            if not isinstance(raw, Mapping):
                raise ValueError(f"ModelConfig entry {raw!r} is not allowed; expected a mapping of "
                                 "ClusterConfig fields, or null / 'skip'")
            return ClusterConfig.from_dict({**base, **raw})

        return cls(
            default=default,
            by_type={k: dec(v) for k, v in (data.get("by_type") or {}).items()},
            by_name={k: dec(v) for k, v in (data.get("by_name") or {}).items()},
            small_layer_params=int(data.get("small_layer_params", 0)),
            small_layer=dec(data["small_layer"]) if data.get("small_layer") is not None else None,
            skip_unclusterable=bool(data.get("skip_unclusterable", False)),
            strict=bool(data.get("strict", False)),
            keep_float_if_larger=bool(data.get("keep_float_if_larger", True)),
        )

    @classmethod
    def from_yaml(cls, path: str) -> "ModelConfig":
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_yaml(self, path: str) -> None:
        import yaml

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _is_skip(raw: Any) -> bool:
    return raw is None or raw == _SKIP
