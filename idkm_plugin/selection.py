"""Selection and plan: the one walk that picks each layer's config, and what it will cost.

Every integration selects layers through `resolve_layers`; `plan(model, model_config)` shows, before training,
what every flow will do with each layer.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .config import ClusterConfig, ModelConfig
from .core.vectors import vector_shape
from .layer_kinds import UNSUPPORTED_TYPES, LayerKind, kind_of, layer_kinds

__all__ = ["ConfigLike", "Plan", "PlanRow", "as_model_config", "check_clusterable", "checked_config",
           "check_type_names", "larger_than_float", "plan", "report_unmatched", "resolve_layers"]

ConfigLike = Union[ModelConfig, ClusterConfig]


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



@dataclass(frozen=True)
class PlanRow:
    """One layer of `plan`: config None means it stays float (`note` says why). A layer whose weight is another
    layer's (tied) has `tied_to` set and costs nothing of its own: the weight is stored once."""

    name: str
    kind: str
    rule: str  # the ModelConfig rule that resolved it ("default", "by_type:Linear", ...)
    config: Optional[ClusterConfig]
    weights: int
    nbytes: int  # palettized (codes + LUTs + scales + pruning mask), or float32 when left float; bias not counted
    note: str = ""
    tied_to: str = ""  # the layer that holds this layer's (shared) weight

    @property
    def float32_bytes(self) -> int:
        return 0 if self.tied_to else 4 * self.weights

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.weights, 1) if not self.tied_to else 0.0


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
            if r.tied_to:
                cfg = f"tied to {r.tied_to} (stored there)"
            elif r.config is None:
                cfg = "float" + (f" ({r.note})" if r.note else "")
            else:
                c = r.config
                cfg = f"{c.method.value} {c.bits} bit" + (f", dim {c.dim}" if c.dim > 1 else "")
                if c.lut_group_size:
                    cfg += f", LUT per {c.lut_group_size} ch"
                if c.per_channel_scale:
                    cfg += f", scale {c.per_channel_scale.value}" + ("" if c.scale_dtype == "float32" else f" {c.scale_dtype}")
                    cfg += f" per <= {c.scale_block_size} weights" if c.scale_block_size else ""
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


def plan(model: nn.Module, model_config: ConfigLike) -> Plan:
    """Per layer of `model` (the walk every flow uses): the rule and config it resolves to, its weights, bits per
    weight (LUTs and scales counted) and bytes vs float32, before any training. A tied weight (an embedding shared
    with the LM head) is counted once. Layers that would not shrink are shown as float (with the reason), as every
    flow will leave them. Returns a `Plan` (rows, `to_markdown()`)."""
    mp = as_model_config(model_config)
    rows = []
    owners: dict[int, str] = {}  # id(weight Parameter) -> the first layer holding it
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
        owner = owners.setdefault(id(module.weight), name)
        tied_to = owner if owner != name else ""
        rows.append(PlanRow(name, type(module).__name__, rule, cfg, weights, 0 if tied_to else nbytes, note, tied_to))
    for w in caught:  # the same warnings the flows give, shown once here
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Plan(tuple(rows))
