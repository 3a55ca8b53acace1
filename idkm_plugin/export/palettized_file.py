"""Self-describing files of palettized models: `save_palettized` / `load_palettized`.

A safetensors file (written and read by the `safetensors` library) holding, for every palettized weight
"<path>" (e.g. "fc.weight"), its tensors "<path>.codes" (packed uint8), "<path>.lut", and where it has them
"<path>.channel_scale", "<path>.lut_scale" and "<path>.mask" (packed, 1 bit per d-vector), and every other
state_dict tensor as it is. The header's metadata describes each palettized weight:

    "idkm_plugin.weights": {"fc.weight": {"kind": "Linear", "bits": 4, "dim": 1, "shape": [10, 240]}, ...}

(the `PaletteSpec` with defaults left out, plus the owning module's class), so
`load_palettized(path, FloatModel())` puts palettized weights on the float skeleton without any training or
conversion code. A tied weight is stored once ("idkm_plugin.aliases": {"head.weight": "embed.weight"}).

Codecs (metadata "idkm_plugin.codec"): "raw" stores the packed codes; "huffman" replaces a weight's codes (and
mask) by one uint8 tensor "<path>.huffman" where that is smaller, recording "layout" (and "index_bits") in its
entry (see `code_layouts`). Integrity: metadata "idkm_plugin.crc32" holds the CRC32 of every tensor and of the
header (`integrity`); loading checks them and every length before building anything, and raises ValueError
naming the file on a truncated or corrupted file.

Files of the earlier formats "/2" and "/1" (one palettized module class per layer, tensors "<layer>.codes") load
into the same form.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..nn.packing import pack_codes
from ..nn.palettized_tensor import PaletteSpec, PalettizedTensor, palettized_parameters
from .code_layouts import decode_codes, encode_codes, layer_codes
from .integrity import CHECKSUMS_KEY, seal, verify
from .safetensors_format import read_safetensors, write_safetensors

__all__ = ["CODECS", "FORMAT", "load_palettized", "save_palettized"]

FORMAT = "idkm_plugin.palettized/3"
_LEGACY_FORMATS = ("idkm_plugin.palettized/2", "idkm_plugin.palettized/1")  # /1: raw, without checksums
CODECS = ("raw", "huffman")
_CODEC_KEY = "idkm_plugin.codec"
_WEIGHTS_KEY = "idkm_plugin.weights"
_LEGACY_LAYERS_KEY = "idkm_plugin.layers"
_ALIASES_KEY = "idkm_plugin.aliases"  # a tied weight (or tensor): its key -> the key it is stored under
_INNER = ("codes", "lut", "channel_scale", "lut_scale", "mask")


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    module_name, _, attr = path.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def save_palettized(model: nn.Module, path: str | os.PathLike, codec: str = "raw") -> int:
    """Write `model` (with its palettized weights) to a safetensors file, atomically; returns its size in bytes.

    codec "raw": the packed codes as the weights hold them; "huffman": each weight's codes (and pruning mask) in
    the smallest of the layouts of `code_layouts`, entropy-coded where that wins.
    """
    if codec not in CODECS:
        raise ValueError(f"save_palettized: codec={codec!r} is not one of {list(CODECS)}")
    weights = palettized_parameters(model)
    if not weights:
        raise ValueError("save_palettized: the model has no palettized layer; convert it first "
                         "(or save a float model with torch.save / safetensors directly)")
    aliases = {name: _first_name(model, p) for name, p in model.named_parameters(remove_duplicate=False)
               if isinstance(p, PalettizedTensor) and name not in weights}
    state = {k: v for k, v in model.state_dict().items() if k not in weights and k not in aliases}
    tensors, tensor_aliases = _deduplicated(state)
    aliases.update(tensor_aliases)
    described = {}
    for name, weight in weights.items():
        owner, _ = _owner(model, name)
        described[name] = {"kind": type(owner).__name__, **weight.spec.to_metadata()}
        tensors.update({f"{name}.{k}": t for k, t in weight.inner_tensors().items()})
    if codec == "huffman":
        _entropy_code(weights, tensors, described)
    compact = {"separators": (",", ":")}
    metadata = {"format": "pt", "idkm_plugin.format": FORMAT, _CODEC_KEY: codec,
                _WEIGHTS_KEY: json.dumps(described, **compact)}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, **compact)
    metadata[CHECKSUMS_KEY] = seal(tensors, metadata)
    return write_safetensors(path, tensors, metadata)


def _first_name(model: nn.Module, parameter: nn.Parameter) -> str:
    return next(name for name, p in model.named_parameters() if p is parameter)


def _entropy_code(weights: dict[str, PalettizedTensor], tensors: dict[str, torch.Tensor],
                  described: dict[str, dict]) -> None:
    """Replace each weight's stored codes (+ mask) by its "<path>.huffman" blob where that is smaller."""
    for name, weight in weights.items():
        keys = [f"{name}.codes"] + ([f"{name}.mask"] if weight.mask is not None else [])
        encoded = encode_codes(*layer_codes(weight), weight.bits)
        if encoded.layout == "packed":
            continue
        for key in keys:
            del tensors[key]
        tensors[f"{name}.huffman"] = encoded.blob
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


# ---- reading --------------------------------------------------------------------------------------------------
def _json(path: str | os.PathLike, metadata: dict, key: str, default: str = "{}"):
    try:
        return json.loads(metadata.get(key, default))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupted file: metadata {key!r} is not valid JSON ({error})") from None


def _read_weights(path: str | os.PathLike, tensors: dict, metadata: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """(palettized weights' metadata, aliases), after checking the format and checksums; earlier formats are
    translated (their tensors renamed in `tensors`)."""
    found = metadata.get("idkm_plugin.format")
    if found not in (FORMAT, *_LEGACY_FORMATS):
        raise ValueError(f"{path}: not a palettized model file (no {FORMAT!r} metadata); "
                         "write it with idkm_plugin.export.save_palettized")
    if found != _LEGACY_FORMATS[1] or CHECKSUMS_KEY in metadata:
        verify(path, tensors, metadata)
    aliases = _json(path, metadata, _ALIASES_KEY)
    if found == FORMAT:
        weights = _json(path, metadata, _WEIGHTS_KEY)
    else:
        weights, aliases = _legacy_weights(path, _json(path, metadata, _LEGACY_LAYERS_KEY), tensors, aliases)
    if not isinstance(weights, dict) or not weights or not all(isinstance(m, dict) for m in weights.values()):
        raise ValueError(f"{path}: corrupted file: its metadata does not describe the palettized weights")
    return weights, aliases


# the module classes of formats /1 and /2 -> the float class (and parameter) their weight is on now
_LEGACY_KINDS = {"PalettizedLinear": "Linear", "PalettizedConv1d": "Conv1d", "PalettizedConv2d": "Conv2d",
                 "PalettizedEmbedding": "Embedding", "PalettizedConv1D": "Conv1D", "PalettizedWeight": None}


def _legacy_weights(path, layers: Any, tensors: dict, aliases: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """Formats /1 and /2 (one entry per palettized module, tensors "<layer>.codes"): the same description as
    format /3 gives, keyed by the weight's path, with the tensors renamed to match."""
    if not isinstance(layers, dict) or not all(isinstance(m, dict) for m in layers.values()):
        raise ValueError(f"{path}: corrupted file: {_LEGACY_LAYERS_KEY!r} is not a JSON object of layers")
    weights, renamed = {}, {}
    for layer, meta in layers.items():
        if meta.get("kind") not in _LEGACY_KINDS:
            raise ValueError(f"{path}: layer {layer!r}: unknown palettized kind {meta.get('kind')!r}; known: "
                             f"{sorted(_LEGACY_KINDS)}")
        kind = _LEGACY_KINDS[meta["kind"]]
        target = layer if kind is None else (f"{layer}.weight" if layer else "weight")
        shape = meta.get("weight_shape") or (meta.get("hyperparameters") or {}).get("weight_shape")
        if shape is None:  # Linear / Embedding / Conv1D: the shape was left to their hyperparameters
            h = meta["hyperparameters"]
            shape = {"Linear": lambda: [h["out_features"], h["in_features"]], "Conv1D": lambda: [h["nf"], h["nx"]],
                     "Embedding": lambda: [h["num_embeddings"], h["embedding_dim"]]}[kind]()
        entry = {"bits": meta["bits"], "dim": meta.get("dim", 1), "shape": shape,
                 "lut_groups": meta.get("lut_groups", 1), "dtype": meta.get("weight_dtype", "float32"),
                 "transposed": kind == "Conv1D"}
        if kind is not None:
            entry["kind"] = kind
        entry.update({k: meta[k] for k in ("layout", "index_bits") if k in meta})
        weights[target] = entry
        prefix = f"{layer}." if layer else ""
        for inner in (*_INNER, "huffman"):
            if prefix + inner in tensors:
                tensors[f"{target}.{inner}"] = tensors.pop(prefix + inner)
            renamed[prefix + inner] = f"{target}.{inner}"
    new_aliases = {}
    for alias, key in aliases.items():
        if alias in renamed and key in renamed:  # a tied layer's codes / LUT: the whole weight is tied
            new_aliases[renamed[alias].rpartition(".")[0]] = renamed[key].rpartition(".")[0]
        else:
            new_aliases[alias] = key
    for alias in new_aliases:  # a tied layer is described by the layer that stores its weight
        weights.pop(alias, None)
    return weights, new_aliases


def _decode_codes(path, name: str, meta: dict, spec: PaletteSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a "<path>.huffman" blob by the "<path>.codes" (+ "<path>.mask") tensors it encodes."""
    layout = meta.get("layout", "packed")
    if layout == "packed":
        return
    blob = tensors.pop(f"{name}.huffman", None)
    if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{path}: weight {name!r} ({layout}) lacks its uint8 tensor {name + '.huffman'!r}")
    try:
        codes, mask = decode_codes(layout, blob, spec.num_codes, spec.bits, meta.get("index_bits"))
    except ValueError as error:
        raise ValueError(f"{path}: weight {name!r}: {error}") from None
    tensors[f"{name}.codes"] = pack_codes(codes, spec.bits)
    if mask is not None:
        tensors[f"{name}.mask"] = pack_codes(mask, 1)


def _build_weight(path, name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> PalettizedTensor:
    try:
        spec = PaletteSpec.from_metadata(meta)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: weight {name!r}: invalid description {meta} ({error})") from None
    _decode_codes(path, name, meta, spec, tensors)
    inner = {k: tensors.pop(f"{name}.{k}") for k in _INNER if f"{name}.{k}" in tensors}
    if "codes" not in inner or "lut" not in inner:
        missing = next(k for k in ("codes", "lut") if k not in inner)
        raise ValueError(f"weight {name!r}: the file lacks tensor {name + '.' + missing!r}")
    try:
        return PalettizedTensor.build(inner["codes"], inner["lut"], spec, inner.get("channel_scale"),
                                      inner.get("lut_scale"), inner.get("mask"))
    except ValueError as error:
        raise ValueError(f"weight {name!r}: {error}") from None


def _check_target(name: str, meta: dict, spec_shape: tuple, model: nn.Module) -> tuple[nn.Module, str]:
    """The module and attribute of the skeleton that take weight `name`; ValueError naming it if they cannot."""
    module_name, _, attr = name.rpartition(".")
    modules = dict(model.named_modules())
    module = modules.get(module_name)
    if module is None or not isinstance(getattr(module, attr, None), torch.Tensor):
        raise ValueError(f"weight {name!r}: the file has a palettized weight there but the model has no such "
                         "parameter")
    kind = meta.get("kind")
    if kind is not None and type(module).__name__ != kind:
        raise ValueError(f"layer {module_name!r}: the file holds a palettized {kind} but the model has a "
                         f"{type(module).__name__} there")
    current = getattr(module, attr)
    if tuple(current.shape) != spec_shape:
        raise ValueError(f"layer {module_name!r}: the file's {attr} has shape {list(spec_shape)} but the model's "
                         f"{type(module).__name__} has {list(current.shape)}")
    return module, attr


def load_palettized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """The float skeleton `model` with the file's palettized weights put on its layers and every other tensor
    loaded from the file; returns it.

    The skeleton must have the structure of the saved model (same module names; where the file has a palettized
    weight, a layer of the same class whose weight has that shape, float or palettized). Any mismatch raises
    ValueError naming the layer or tensor.
    """
    tensors, metadata = read_safetensors(path)
    weights, aliases = _read_weights(path, tensors, metadata)
    built: dict[str, nn.Parameter] = {}
    for name, meta in weights.items():
        weight = _build_weight(path, name, meta, tensors)
        module, attr = _check_target(name, meta, tuple(weight.shape), model)
        built[name] = parameter = nn.Parameter(weight, requires_grad=False)
        setattr(module, attr, parameter)
    for alias, key in aliases.items():
        if key in built:  # a tied weight: the same Parameter again
            module, attr = _check_target(alias, {}, tuple(built[key].shape), model)
            setattr(module, attr, built[key])
        elif key in tensors:
            tensors[alias] = tensors[key]
        else:
            raise ValueError(f"{path}: alias {alias!r} names tensor {key!r}, which the file lacks")
    _load_rest(model, tensors, set(built) | {a for a, k in aliases.items() if k in built})
    return model


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], palettized: set[str]) -> None:
    """Load every other tensor of the file, requiring exactly the model's other state_dict keys and shapes."""
    expected = {k: v for k, v in model.state_dict().items() if k not in palettized}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the file does not match the model's structure: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for key, value in expected.items():
        if value.shape != tensors[key].shape:
            raise ValueError(f"tensor {key!r}: the file has shape {list(tensors[key].shape)}, "
                             f"the model {list(value.shape)}")
    result = model.load_state_dict(tensors, strict=False)
    leftover = [k for k in result.missing_keys if k not in palettized]
    if leftover or result.unexpected_keys:
        raise ValueError(f"the file does not match the model's structure: missing {leftover[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
