"""The one registry of supported layer kinds, and the one walk that picks each layer's config.

Every integration selects layers through `resolve_layers` and reads the supported kinds from
`layer_kinds()`; nothing else lists layer types. Adding a kind is one `register_layer_kind` call
plus its palettized class:

    register_layer_kind(LayerKind(
        name="MyLinear", float_type=MyLinear, palettized_type=PalettizedMyLinear,
        forward_with_weight=lambda m, x, w: F.linear(x, w, m.bias)))

after which torchao's `quantize_`, torch.ao's `prepare_qat(mapping=qat_module_mapping())` and every
`palettize_*` convert handle it (Brevitas only where it has a Quant layer for the kind; otherwise
the walk names the layer in a clear error).
"""
from __future__ import annotations

import functools
import re
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .clusterer import WeightClusterer
from .config import ClusterConfig, ModelConfig
from .core.vectors import vector_shape
from .nn.gpt_conv1d import PalettizedConv1D, conv1d_forward
from .nn.palettized import (PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding, PalettizedLinear,
                            PalettizedModule)

__all__ = ["ConfigLike", "LayerKind", "UNSUPPORTED_TYPES", "as_model_config", "check_clusterable", "checked_config",
           "kind_named", "kind_of", "layer_kinds", "palettize_module", "palettized_class", "Plan", "PlanRow",
           "plan_layers",
           "register_layer_kind", "resolve_layers", "subclass_instance", "unregister_layer_kind"]

ConfigLike = Union[ModelConfig, ClusterConfig]


def _no_check(module: nn.Module, name: str) -> None:
    return None


def _own_weight(module: nn.Module) -> torch.Tensor:
    return module.weight


@dataclass(frozen=True)
class LayerKind:
    """One supported layer kind.

    Attributes:
        name: the class name `ModelConfig.by_type` uses ("Linear").
        float_type: the float layer class; matched exactly (subclasses with their own forward, such
            as torch.ao QAT layers or MultiheadAttention's out_proj, are not this kind).
        palettized_type: the converted class (`from_float(module, codes, lut, bits, weight, bias)`).
        forward_with_weight: (module, input, weight) -> output: the float forward with `weight` (laid out as
            `clustered_weight` gives it) in place of the module's own (the fake-quantized layers of every
            toolkit run this).
        clustered_weight: module -> its weight laid out [out, ...] (output channels first), the tensor that
            is clustered and palettized; `module.weight` unless the layer stores it otherwise (a view).
        aten_op, weight_arg: the op a `torch.export`ed graph calls for this layer and the index of its
            weight argument (PT2E annotates those); None when the kind has no single op.
        check: (module, name) -> None, raising ValueError when this instance cannot be palettized.
    """

    name: str
    float_type: type
    palettized_type: type
    forward_with_weight: Callable[[nn.Module, Any, torch.Tensor], Any]
    aten_op: Optional[Any] = None
    weight_arg: int = 1
    check: Callable[[nn.Module, str], None] = _no_check
    clustered_weight: Callable[[nn.Module], torch.Tensor] = _own_weight


def _conv_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return module._conv_forward(x, weight, module.bias)


def _embedding_forward(module: nn.Embedding, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq,
                       module.sparse)


def _check_embedding(module: nn.Embedding, name: str) -> None:
    if module.max_norm is not None:
        raise ValueError(f"layer {name!r} (Embedding) has max_norm={module.max_norm}, which renormalises its weight "
                         "in place; a palettized embedding cannot, so use max_norm=None or leave this layer float")


_aten = torch.ops.aten
_KINDS: dict[type, LayerKind] = {}

# Weight-bearing layers the palettized modules cannot represent (or whose weight is read outside
# forward, as nn.MultiheadAttention does with its out_proj): asking to cluster one is an error.
UNSUPPORTED_TYPES: tuple[type, ...] = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                                       nn.EmbeddingBag, nn.Bilinear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add (or replace) a supported layer kind. Returns it."""
    if not issubclass(kind.palettized_type, PalettizedModule):
        raise ValueError(f"LayerKind {kind.name!r}: palettized_type {kind.palettized_type.__name__} is not a "
                         "PalettizedModule")
    _KINDS[kind.float_type] = kind
    return kind


def unregister_layer_kind(kind: LayerKind) -> None:
    """Remove a kind added with `register_layer_kind`."""
    if _KINDS.get(kind.float_type) is kind:
        del _KINDS[kind.float_type]


def layer_kinds() -> tuple[LayerKind, ...]:
    """Every supported kind, in registration order."""
    _register_transformers_kinds()
    return tuple(_KINDS.values())


def kind_named(name: str) -> LayerKind:
    """The registered kind whose `by_type` name is `name` ("Linear")."""
    for kind in layer_kinds():
        if kind.name == name:
            return kind
    raise ValueError(f"no layer kind named {name!r}; registered: {', '.join(k.name for k in layer_kinds())}")


def kind_of(module: nn.Module, exact: bool = True) -> Optional[LayerKind]:
    """The kind of a float layer (exact type), or with exact=False of any subclass instance
    (a QAT or fake-quantized layer); None when unsupported."""
    _register_transformers_kinds()
    if exact:
        return _KINDS.get(type(module))
    for cls in type(module).__mro__:  # the most specific registered base
        if cls in _KINDS:
            return _KINDS[cls]
    return None


for _kind in (
    LayerKind("Linear", nn.Linear, PalettizedLinear, lambda m, x, w: F.linear(x, w, m.bias), _aten.linear.default),
    LayerKind("Conv1d", nn.Conv1d, PalettizedConv1d, _conv_forward, _aten.conv1d.default),
    LayerKind("Conv2d", nn.Conv2d, PalettizedConv2d, _conv_forward, _aten.conv2d.default),
    LayerKind("Embedding", nn.Embedding, PalettizedEmbedding, _embedding_forward, _aten.embedding.default,
              weight_arg=0, check=_check_embedding),
):
    register_layer_kind(_kind)


def _register_transformers_kinds() -> None:
    """Hugging Face's Conv1D (GPT-2 family), once the user's code has imported transformers (never imported here)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    if conv1d is not None and conv1d not in _KINDS:
        register_layer_kind(LayerKind("Conv1D", conv1d, PalettizedConv1D,
                                      lambda m, x, w: conv1d_forward(x, w, m.bias),
                                      clustered_weight=lambda m: m.weight.t()))


def as_model_config(model_config: ConfigLike) -> ModelConfig:
    """A ModelConfig from a ModelConfig or one ClusterConfig for every layer."""
    if isinstance(model_config, ClusterConfig):
        return ModelConfig(default=model_config)
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config={model_config!r} is not allowed; expected an idkm_plugin.ModelConfig or "
                         "ClusterConfig")
    return model_config


def check_clusterable(name: str, type_name: str, weight_shape: Sequence[int], config: ClusterConfig) -> None:
    """Raise ValueError naming the layer if `config` cannot cluster a weight of this shape."""
    vector_shape(tuple(weight_shape), config.dim, config.lut_group_size, f"layer {name!r} ({type_name})")


def checked_config(model_config: ModelConfig, name: str, type_name: str, weight_shape: Sequence[int],
                   config: ClusterConfig, check: Callable[[], None] = lambda: None) -> Optional[ClusterConfig]:
    """`config` if it can cluster the layer; otherwise the one policy: raise ValueError naming the layer,
    or with `skip_unclusterable` warn and return None (the layer stays float).

    `check` runs first (kind-specific limits; raises ValueError). Then the size rule: with
    `keep_float_if_larger` (default), a layer whose palettized form would take at least its float32 bytes
    is left float with a warning (returns None).
    """
    try:
        check()
        check_clusterable(name, type_name, weight_shape, config)
    except ValueError as err:
        if not model_config.skip_unclusterable:
            raise ValueError(f"{err} (or set ModelConfig.skip_unclusterable=True to leave it float)") from None
        warnings.warn(f"{err}; skip_unclusterable=True: leaving it float", stacklevel=4)
        return None
    reason = larger_than_float(weight_shape, config) if model_config.keep_float_if_larger else None
    if reason is not None:
        warnings.warn(f"layer {name!r} ({type_name}): {reason}; leaving it float "
                      "(ModelConfig.keep_float_if_larger=False palettizes it anyway)", stacklevel=4)
        return None
    return config


def larger_than_float(weight_shape: Sequence[int], config: ClusterConfig) -> Optional[str]:
    """Why palettizing a weight of this shape with `config` would not shrink it (None if it would)."""
    numel = 1
    for s in weight_shape:
        numel *= int(s)
    nbytes = config.palettized_nbytes(tuple(int(s) for s in weight_shape))
    if nbytes < 4 * numel:
        return None
    return (f"palettized with bits={config.bits}, dim={config.dim} it would take {nbytes:,} B "
            f"({8 * nbytes / max(numel, 1):.1f} bits per weight, LUTs and scales counted), not less than its "
            f"{4 * numel:,} B in float32")


def _supported_names(supports: Callable[[LayerKind], bool]) -> str:
    return ", ".join(k.name for k in layer_kinds() if supports(k))


def _all_kinds(kind: LayerKind) -> bool:
    return True


def resolve_layers(model: nn.Module, model_config: ConfigLike, *,
                   unwrap: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
                   supports: Callable[[LayerKind], bool] = _all_kinds, flow: str = "this flow",
                   ) -> Iterator[tuple[str, nn.Module, Optional[ClusterConfig]]]:
    """Yield (name, module, config or None) for every weight-bearing layer `model_config` could cluster.

    Layers of a supported kind are always yielded (None: leave float). A layer the resolved config
    cannot cluster (unsupported or unknown-to-`flow` type, `dim` / `group_size` that do not divide the
    weight, a kind-specific limit) raises ValueError naming it, or with `skip_unclusterable` warns and
    is yielded with None.

    Args:
        unwrap: module -> the float layer it wraps (torch.ao fused modules: their conv / linear), or None
            when it wraps none; the wrapper's children are then not visited again.
        supports: which registry kinds this flow can cluster (Brevitas has no layer for some).
        flow: the flow's name for error messages.
    """
    mp = as_model_config(model_config)
    check_type_names(mp, model)
    seen: dict[str, str] = {}  # name -> type name of every weight-bearing layer visited
    tied: dict[int, tuple[str, Optional[ClusterConfig]]] = {}  # id(weight Parameter) -> first (name, config)
    wrapped: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in wrapped:
            continue
        layer = unwrap(module) if unwrap is not None else None
        if layer is not None:
            wrapped.update(id(m) for m in module.modules() if m is not module)
        else:
            layer = module
        kind = kind_of(layer)
        if kind is None and not isinstance(layer, UNSUPPORTED_TYPES):
            continue
        type_name = type(layer).__name__
        seen[name] = type_name
        cfg = mp.resolve(name, layer)
        if cfg is None:
            if kind is not None:
                _check_tie(tied, name, layer, None)
                yield name, module, None
            continue
        shape = (kind.clustered_weight(layer) if kind is not None else layer.weight).shape
        cfg = checked_config(mp, name, type_name, shape, cfg,
                             functools.partial(_check_kind, kind, layer, name, supports, flow))
        _check_tie(tied, name, layer, cfg)
        yield name, module, cfg
    report_unmatched(mp, seen)


def _check_tie(tied: dict, name: str, layer: nn.Module, cfg: Optional[ClusterConfig]) -> None:
    """Layers sharing one weight Parameter (tied embedding / lm_head) must share one config."""
    key = id(layer.weight)
    first = tied.setdefault(key, (name, cfg))
    if first[1] != cfg:
        raise ValueError(f"layers {first[0]!r} and {name!r} share one (tied) weight but resolve to different configs "
                         f"({_describe(first[1])} vs {_describe(cfg)}); give both the same config, e.g. by_name "
                         f"{{{first[0]!r}: ..., {name!r}: ...}}, so the weight is clustered once with one LUT")


def _describe(cfg: Optional[ClusterConfig]) -> str:
    return "float (None)" if cfg is None else f"bits={cfg.bits}, dim={cfg.dim}, method={cfg.method.value}"


def check_type_names(model_config: ModelConfig, model: nn.Module) -> None:
    """ValueError for a `by_type` key that names no layer kind and no class of the model (a typo)."""
    known = {k.name for k in layer_kinds()} | {t.__name__ for t in UNSUPPORTED_TYPES}
    present = {type(m).__name__ for m in model.modules()}
    unknown = sorted(set(model_config.by_type) - known - present)
    if unknown:
        with_weights = sorted({type(m).__name__ for m in model.modules()
                               if isinstance(getattr(m, "weight", None), torch.Tensor)})
        raise ValueError(f"ModelConfig.by_type {unknown} names no layer type of this model; its layer types are "
                         f"{with_weights} (registered kinds: {sorted(k.name for k in layer_kinds())})")


def report_unmatched(model_config: ModelConfig, seen: dict[str, str]) -> None:
    """Warn (ValueError with `strict`) for each by_name key or regex, and each by_type key, that matched
    none of the layers `seen` ({name: type name})."""
    unmatched = [f"by_name {key!r}" for key in model_config.by_name
                 if not any(_key_matches(key, name) for name in seen)]
    unmatched += [f"by_type {key!r}" for key in model_config.by_type if key not in seen.values()]
    for entry in unmatched:
        message = f"ModelConfig {entry} matches no clusterable layer of this model; it has no effect"
        if model_config.strict:
            raise ValueError(message + f" (strict=True); the layers are {sorted(seen)}")
        warnings.warn(message, stacklevel=3)


def _key_matches(key: str, name: str) -> bool:
    return re.fullmatch(key[3:], name) is not None if key.startswith("re:") else key == name


def _check_kind(kind: Optional[LayerKind], layer: nn.Module, name: str, supports: Callable[[LayerKind], bool],
                flow: str) -> None:
    if kind is None or not supports(kind):
        raise ValueError(f"layer {name!r} ({type(layer).__name__}) cannot be clustered in {flow}: supported layers "
                         f"are {_supported_names(supports)}; map it to None in the ModelConfig "
                         f"(by_name={{{name!r}: None}})")
    kind.check(layer, name)


def subclass_instance(module: nn.Module, cls: type) -> nn.Module:
    """A new `cls` instance (a subclass of type(module)) sharing `module`'s parameters, buffers,
    children and attributes: the toolkits' fake-quantized layers are built this way for any kind."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key, value in state.items():
        if isinstance(value, dict):  # parameters, buffers, children, hooks: own containers, same tensors
            state[key] = type(value)(value)
    new.__dict__.update(state)
    return new


def palettized_class(module: nn.Module) -> type:
    """The palettized class for a float, QAT or fake-quantized layer of a registered kind."""
    kind = kind_of(module, exact=False)
    if kind is None:
        supported = ", ".join(k.name for k in layer_kinds())
        raise ValueError(f"{type(module).__name__} cannot be palettized; supported: {supported}")
    return kind.palettized_type


def palettize_module(module: nn.Module, clusterer: WeightClusterer, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> PalettizedModule:
    """The palettized form of `module` from `clusterer`'s LUT (every toolkit converts through this).

    weight / bias override the module's own (e.g. with BatchNorm folded in); the codes are the hard
    nearest-centroid assignment of that weight, so the result computes what the eval-mode QAT layer does.
    A pruned clusterer's mask (bool [groups, m]) goes with it (`set_mask`: packed 1 bit per vector, codes 0).
    """
    palettized = palettized_class(module)
    weight = kind_of(module, exact=False).clustered_weight(module) if weight is None else weight
    codes, lut = clusterer.codes_and_lut(weight)
    layer = palettized.from_float(module, codes, lut, clusterer.config.bits, weight, bias)
    layer.set_scales(**clusterer.scales(weight))
    layer.set_mask(clusterer.pruning_mask())
    _share_tied_storage(layer, weight)
    return layer


@dataclass(frozen=True)
class PlanRow:
    """One layer of `ModelConfig.plan`: config None means it stays float (`note` says why)."""

    name: str
    kind: str
    rule: str  # the ModelConfig rule that resolved it ("default", "by_type:Linear", ...)
    config: Optional[ClusterConfig]
    weights: int
    nbytes: int  # palettized (codes + LUTs + scales + pruning mask), or float32 when left float; bias not counted
    note: str = ""

    @property
    def float32_bytes(self) -> int:
        return 4 * self.weights

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.weights, 1)


@dataclass(frozen=True)
class Plan:
    """What every flow will do with each layer: `rows`, `to_markdown()`."""

    rows: tuple[PlanRow, ...]

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self.rows)

    @property
    def float32_bytes(self) -> int:
        return sum(row.float32_bytes for row in self.rows)

    def to_markdown(self) -> str:
        lines = ["| layer | kind | rule | config | weights | bits/weight | bytes | float32 bytes |",
                 "|---|---|---|---|---:|---:|---:|---:|"]
        for r in self.rows:
            if r.config is None:
                cfg = "float" + (f" ({r.note})" if r.note else "")
            else:
                c = r.config
                cfg = f"{c.method.value} {c.bits} bit" + (f", dim {c.dim}" if c.dim > 1 else "")
                if c.lut_group_size:
                    cfg += f", LUT per {c.lut_group_size} ch"
                if c.per_channel_scale:
                    cfg += f", scale {c.per_channel_scale.value}" + ("" if c.scale_dtype == "float32" else f" {c.scale_dtype}")
                if c.lut_dtype != "float32":
                    cfg += f", {c.lut_dtype} LUT"
                if c.sparsity:
                    cfg += f", sparsity {c.sparsity:g}"
            lines.append(f"| {r.name} | {r.kind} | {r.rule} | {cfg} | {r.weights:,} | {r.bits_per_weight:.2f} | "
                         f"{r.nbytes:,} | {r.float32_bytes:,} |")
        total = max(self.float32_bytes, 1)
        lines.append(f"\nLayers with weights: {self.nbytes:,} B vs {self.float32_bytes:,} B float32 "
                     f"({self.float32_bytes / max(self.nbytes, 1):.2f}x, {8 * self.nbytes / (total / 4):.3f} bits "
                     "per weight).")
        return "\n".join(lines)


def plan_layers(model: nn.Module, model_config: ConfigLike) -> Plan:
    """`ModelConfig.plan`: each layer `resolve_layers` yields, with what it will cost (see `Plan`)."""
    mp = as_model_config(model_config)
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = list(resolve_layers(model, mp))
    for name, module, cfg in resolved:
        kind = kind_of(module)
        shape = tuple((kind.clustered_weight(module) if kind is not None else module.weight).shape)
        weights = 1
        for s in shape:
            weights *= s
        wanted, rule = mp.resolve_rule(name, module)
        note = ""
        if cfg is None and wanted is not None:
            too_big = mp.keep_float_if_larger and larger_than_float(shape, wanted) is not None
            note = f"{wanted.bits} bit would not shrink it" if too_big else "not clusterable"
        nbytes = 4 * weights if cfg is None else cfg.palettized_nbytes(shape)
        rows.append(PlanRow(name, type(module).__name__, rule, cfg, weights, nbytes, note))
    for w in caught:  # the same warnings the flows give, shown once here
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Plan(tuple(rows))


# id(weight Parameter) -> (the Parameter, the palettized module first converted from it), weakly
_CONVERTED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _share_tied_storage(layer: PalettizedModule, weight: torch.Tensor) -> None:
    """A second layer converted from the same tied weight, to the same codes and LUT, holds the first
    one's tensors (stored once, as the float model stored its shared Parameter once)."""
    if not isinstance(weight, nn.Parameter):
        return
    entry = _CONVERTED.get(id(weight))
    other = None if entry is None or entry[0]() is not weight else entry[1]()
    if other is None:
        _CONVERTED[id(weight)] = (weakref.ref(weight), weakref.ref(layer))
    elif (other.codes.shape == layer.codes.shape and torch.equal(other.codes, layer.codes)
          and other.lut.shape == layer.lut.shape and torch.equal(other.lut, layer.lut)):
        layer.codes, layer.lut = other.codes, other.lut
        for name in ("channel_scale", "lut_scale", "mask"):  # same weight, same config: same scales and mask
            mine, theirs = getattr(layer, name), getattr(other, name)
            if mine is not None and theirs is not None and torch.equal(mine, theirs):
                setattr(layer, name, theirs)
