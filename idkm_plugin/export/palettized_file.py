"""Self-describing files of palettized models: `save_palettized` / `load_palettized`.

The file is a safetensors file holding the model's whole state_dict as it is (for a palettized
layer: its packed uint8 codes, LUT and bias; for every other module: its float tensors) and, in
the header's `__metadata__["idkm_plugin.layers"]`, a JSON description of each palettized layer:

    {"features.0": {"kind": "PalettizedConv2d", "bits": 8, "dim": 1, "weight_shape": [32, 1, 3, 3],
                    "lut_groups": 1, "weight_dtype": "float32", "lut_dtype": "float32",
                    "hyperparameters": {"stride": [1, 1], "padding": [0, 0], ...}}, ...}

written compactly: entries equal to their default (dim 1, lut_groups 1, float32 dtypes, a weight_shape
the hyperparameters already hold) are left out, and read back as those defaults.

so `load_palettized(path, FloatModel())` rebuilds the palettized layers from the float skeleton
without any QAT or conversion code. A pruned layer's mask (uint8 [packed_nbytes(num_codes, 1)], 1 bit
per d-vector) is the tensor "<layer>.mask".

Codecs (metadata "idkm_plugin.codec"): "raw" stores the state_dict as it is; "huffman" replaces a
layer's "<layer>.codes" (and "<layer>.mask") by one uint8 tensor "<layer>.huffman" when that is
smaller, recording "layout" (and "index_bits") in the layer's entry (see `code_layouts`).
Integrity: metadata "idkm_plugin.crc32" holds the CRC32 of every tensor and of the header
(`integrity`); `load_palettized` checks them and every length before building anything, and raises
ValueError naming the file on a truncated or corrupted file. Files of format "/1" (raw, written
before checksums existed) still load, unchecked.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..layers import layer_kinds
from ..nn.packing import packed_nbytes
from ..nn.palettized import PalettizedModule, PalettizedWeight
from .code_layouts import decode_packed_codes, encode_codes, layer_codes
from .integrity import CHECKSUMS_KEY, seal, verify
from .safetensors_format import read_safetensors, write_safetensors

__all__ = ["CODECS", "FORMAT", "load_palettized", "palettized_layers", "save_palettized"]

FORMAT = "idkm_plugin.palettized/2"
_LEGACY_FORMAT = "idkm_plugin.palettized/1"  # raw, without checksums
CODECS = ("raw", "huffman")
_CODEC_KEY = "idkm_plugin.codec"
_LAYERS_KEY = "idkm_plugin.layers"
_ALIASES_KEY = "idkm_plugin.aliases"  # tied weights: state_dict key -> the key whose tensor it is


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the file's metadata")
    return dtype


_LAYER_DEFAULTS = {"dim": 1, "lut_groups": 1, "weight_dtype": "float32", "lut_dtype": "float32"}


def layer_metadata(module: PalettizedModule) -> dict[str, Any]:
    """The JSON description of one palettized layer (every key; see `_compact`)."""
    meta = {"kind": type(module).__name__, "bits": module.bits, "dim": module.dim,
            "weight_shape": list(module.weight_shape), "lut_groups": module.groups_lut,
            "weight_dtype": _dtype_name(module.weight_dtype), "lut_dtype": _dtype_name(module.lut.dtype),
            "hyperparameters": module.hyperparameters()}
    # per-channel scales: tensor "<layer>.channel_scale" float32 or float16 [out] (an int8 LUT's: "<layer>.lut_scale" [groups])
    if module.channel_scale is not None:
        meta["per_channel_scale"] = True
    return meta


def _compact(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` without the entries `_expanded` restores (defaults, a weight_shape the hyperparameters hold)."""
    out = {k: v for k, v in meta.items() if _LAYER_DEFAULTS.get(k, _MISSING) != v}
    if out["weight_shape"] == out["hyperparameters"].get("weight_shape"):
        del out["weight_shape"]
    return out


def _expanded(meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `_compact`."""
    full = {**_LAYER_DEFAULTS, **meta}
    if "weight_shape" not in full and isinstance(meta.get("hyperparameters"), dict):
        full["weight_shape"] = meta["hyperparameters"].get("weight_shape")
    return full


_MISSING = object()


def palettized_layers(model: nn.Module) -> dict[str, PalettizedModule]:
    """name -> palettized module, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PalettizedModule)}


def save_palettized(model: nn.Module, path: str | os.PathLike, codec: str = "raw") -> int:
    """Write `model` (with its palettized layers) to a safetensors file, atomically; returns its size in bytes.

    codec "raw": every tensor as the state_dict holds it (packed codes); "huffman": each layer's codes
    (and pruning mask) in the smallest of the layouts of `code_layouts`, entropy-coded where that wins.
    """
    if codec not in CODECS:
        raise ValueError(f"save_palettized: codec={codec!r} is not one of {list(CODECS)}")
    layers = palettized_layers(model)
    if not layers:
        raise ValueError("save_palettized: the model has no palettized layer; convert it first "
                         "(or save a float model with torch.save / safetensors directly)")
    tensors, aliases = _deduplicated(model.state_dict())
    described = {name: _compact(layer_metadata(module)) for name, module in layers.items()}
    if codec == "huffman":
        _entropy_code(layers, tensors, described)
    compact = {"separators": (",", ":")}
    metadata = {"format": "pt", "idkm_plugin.format": FORMAT, _CODEC_KEY: codec,
                _LAYERS_KEY: json.dumps(described, **compact)}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, **compact)
    metadata[CHECKSUMS_KEY] = seal(tensors, metadata)
    return write_safetensors(path, tensors, metadata)


def _entropy_code(layers: dict[str, PalettizedModule], tensors: dict[str, torch.Tensor],
                  described: dict[str, dict]) -> None:
    """Replace each layer's stored codes (+ mask) by its "<layer>.huffman" blob where that is smaller.

    A layer whose codes or mask are another layer's (tied) is left to the layer that stores them."""
    for name, module in layers.items():
        prefix = f"{name}." if name else ""
        keys = [prefix + "codes"] + ([prefix + "mask"] if module.mask is not None else [])
        if not all(key in tensors for key in keys):
            continue
        encoded = encode_codes(*layer_codes(module), module.bits)
        if encoded.layout == "packed":
            continue
        for key in keys:
            del tensors[key]
        tensors[prefix + "huffman"] = encoded.blob
        described[name]["layout"] = encoded.layout
        if encoded.index_bits is not None:
            described[name]["index_bits"] = encoded.index_bits


def _deduplicated(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors stored once, alias key -> stored key) for entries that are one tensor (tied weights)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"save_palettized: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                    tuple(value.stride()), value.dtype) if value.numel() else None
        if identity is not None and identity in first:
            aliases[key] = first[identity]
        else:
            tensors[key] = value
            if identity is not None:
                first[identity] = key
    return tensors, aliases


def _palettized_classes() -> dict[str, type]:
    found, stack = {}, [PalettizedModule]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            stack.append(sub)
    return found


def _float_type(cls: type) -> type:
    for kind in layer_kinds():
        if kind.palettized_type is cls:
            return kind.float_type
    raise ValueError(f"{cls.__name__} has no registered float layer kind")


def _describe_mismatch(name: str, cls: type, found: dict, expected: dict, target: nn.Module) -> str:
    keys = sorted(set(found) | set(expected))
    diffs = ", ".join(f"{k}: file {expected.get(k)!r} vs model {found.get(k)!r}" for k in keys
                      if found.get(k) != expected.get(k))
    return f"layer {name!r}: the file's {cls.__name__} does not match the model's {type(target).__name__} ({diffs})"


def _check_target(name: str, cls: type, hyperparameters: dict, target: nn.Module) -> None:
    """Raise ValueError naming the layer if `target` in the skeleton cannot take the saved layer."""
    if isinstance(target, cls):
        found = json.loads(json.dumps(target.hyperparameters()))
    elif cls is PalettizedWeight:
        raise ValueError(f"layer {name!r}: the file holds a PalettizedWeight (a weight inside a PT2E graph); "
                         f"load it into the converted graph module, which has one at this path, not into "
                         f"a {type(target).__name__}")
    else:
        float_type = _float_type(cls)
        if not isinstance(target, float_type):
            raise ValueError(f"layer {name!r}: the file holds a {cls.__name__} but the model has a "
                             f"{type(target).__name__} there (expected {float_type.__name__})")
        found = json.loads(json.dumps(cls.float_hyperparameters(target)))
    if found != hyperparameters:
        raise ValueError(_describe_mismatch(name, cls, found, hyperparameters, target))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _read_layers(path: str | os.PathLike, tensors: dict, metadata: dict) -> dict[str, dict]:
    """The layers' metadata, after checking the file's format and (format /2) checksums."""
    found = metadata.get("idkm_plugin.format")
    if found not in (FORMAT, _LEGACY_FORMAT) or _LAYERS_KEY not in metadata:
        raise ValueError(f"{path}: not a palettized model file (no {FORMAT!r} metadata); "
                         "write it with idkm_plugin.export.save_palettized")
    if found == FORMAT or CHECKSUMS_KEY in metadata:
        verify(path, tensors, metadata)
    layers = _json(path, metadata, _LAYERS_KEY)
    if not isinstance(layers, dict) or not all(isinstance(m, dict) for m in layers.values()):
        raise ValueError(f"{path}: corrupted file: {_LAYERS_KEY!r} is not a JSON object of layers")
    return {name: _expanded(meta) for name, meta in layers.items()}


def _json(path: str | os.PathLike, metadata: dict, key: str, default: str = "{}"):
    try:
        return json.loads(metadata.get(key, default))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupted file: metadata {key!r} is not valid JSON ({error})") from None


def _num_codes(meta: dict) -> int:
    numel = 1
    for size in meta["weight_shape"]:
        numel *= size
    return numel // meta["dim"]


def _decode_layers(path: str | os.PathLike, layers: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
    """Replace each "<layer>.huffman" blob by the "<layer>.codes" (+ "<layer>.mask") tensors it encodes."""
    for name, meta in layers.items():
        layout = meta.get("layout", "packed")
        if layout == "packed":
            continue
        prefix = f"{name}." if name else ""
        blob = tensors.pop(prefix + "huffman", None)
        if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"{path}: layer {name!r} ({layout}) lacks its uint8 tensor {prefix + 'huffman'!r}")
        try:
            codes, mask = decode_packed_codes(layout, blob, _num_codes(meta), meta["bits"], meta.get("index_bits"))
        except ValueError as error:
            raise ValueError(f"{path}: layer {name!r}: {error}") from None
        tensors[prefix + "codes"] = codes
        if mask is not None:
            tensors[prefix + "mask"] = mask


def _attach_mask(name: str, layer: PalettizedModule, mask: torch.Tensor) -> None:
    """Give `layer` its pruning mask uint8 [packed_nbytes(num_codes, 1)]."""
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != packed_nbytes(layer.num_codes, 1):
        raise ValueError(f"layer {name!r}: mask {mask.dtype} {list(mask.shape)} is not the packed 1-bit mask "
                         f"of its {layer.num_codes} codes (uint8 [{packed_nbytes(layer.num_codes, 1)}])")
    layer.set_mask(mask)


def _build_layer(name: str, meta: dict, tensors: dict, classes: dict) -> PalettizedModule:
    cls = classes.get(meta["kind"])
    if cls is None:
        raise ValueError(f"layer {name!r}: unknown palettized kind {meta['kind']!r}; known: {sorted(classes)}")
    prefix = f"{name}." if name else ""
    try:
        codes, lut = tensors[prefix + "codes"], tensors[prefix + "lut"]
    except KeyError as missing:
        raise ValueError(f"layer {name!r}: the file lacks tensor {missing.args[0]!r}") from None
    if list(lut.shape) != [meta["lut_groups"], 1 << meta["bits"], meta["dim"]]:
        raise ValueError(f"layer {name!r}: lut {list(lut.shape)} does not match its metadata "
                         f"(lut_groups={meta['lut_groups']}, bits={meta['bits']}, dim={meta['dim']})")
    layer = cls.from_hyperparameters(meta["hyperparameters"], codes, lut, meta["bits"], tensors.get(prefix + "bias"),
                                     _dtype(meta["weight_dtype"]))
    if meta.get("per_channel_scale") and prefix + "channel_scale" not in tensors:
        raise ValueError(f"layer {name!r}: the file lacks tensor {prefix + 'channel_scale'!r} (per-channel scales)")
    if lut.dtype == torch.int8 and prefix + "lut_scale" not in tensors:
        raise ValueError(f"layer {name!r}: the file lacks tensor {prefix + 'lut_scale'!r} (its int8 LUT's scales)")
    layer.set_scales(tensors.get(prefix + "channel_scale") if meta.get("per_channel_scale") else None,
                     tensors.get(prefix + "lut_scale") if lut.dtype == torch.int8 else None)
    if prefix + "mask" in tensors:
        _attach_mask(name, layer, tensors[prefix + "mask"])
    if list(layer.weight_shape) != meta["weight_shape"]:
        raise ValueError(f"layer {name!r}: weight shape {list(layer.weight_shape)} does not match its "
                         f"metadata {meta['weight_shape']}")
    return layer


def load_palettized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """The float skeleton `model` with its layers replaced by the file's palettized ones and every
    other tensor loaded from the file; returns it (a new module only when the root itself is palettized).

    The skeleton must have the structure of the saved model (same module names; a float layer of the
    matching kind and hyperparameters, or the same palettized kind, where the file has a palettized
    layer). Any mismatch raises ValueError naming the layer or tensor.
    """
    tensors, metadata = read_safetensors(path)
    layers = _read_layers(path, tensors, metadata)
    aliases = _json(path, metadata, _ALIASES_KEY)
    _decode_layers(path, layers, tensors)
    missing = sorted(key for key in aliases.values() if key not in tensors)
    if missing:
        raise ValueError(f"{path}: aliases name tensors the file lacks: {missing[:8]}")
    tensors.update({alias: tensors[key] for alias, key in aliases.items()})
    classes = _palettized_classes()
    modules = dict(model.named_modules())
    built: dict[str, PalettizedModule] = {}
    for name, meta in layers.items():
        if name not in modules:
            raise ValueError(f"layer {name!r}: the file has a {meta['kind']} there but the model has no such module")
        cls = classes.get(meta["kind"])
        if cls is not None:
            _check_target(name, cls, meta["hyperparameters"], modules[name])
        built[name] = layer = _build_layer(name, meta, tensors, classes)
        if name:
            _set_submodule(model, name, layer)
        else:
            model = layer
    _retie(built, aliases)
    _load_rest(model, tensors)
    return model


def _retie(built: dict[str, PalettizedModule], aliases: dict[str, str]) -> None:
    """Layers whose codes / LUT were one tensor when saved (tied weights) share one tensor again."""
    for alias, key in aliases.items():
        (layer, _, attr), (owner, _, owner_attr) = alias.rpartition("."), key.rpartition(".")
        if attr in ("codes", "lut", "channel_scale", "lut_scale", "mask") and layer in built and owner in built:
            setattr(built[layer], attr, getattr(built[owner], owner_attr))


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load every tensor of the file, requiring exactly the model's state_dict keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the file does not match the model's structure: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for key, value in expected.items():
        if value.shape != tensors[key].shape:
            raise ValueError(f"tensor {key!r}: the file has shape {list(tensors[key].shape)}, "
                             f"the model {list(value.shape)}")
    model.load_state_dict(tensors, strict=True)
