"""Core ML export of a palettized model: every palettized weight becomes a `constexpr_lut_to_dense` op.

    from idkm_plugin.export import to_coreml
    mlmodel = to_coreml(deployed, (example_input,), "model.mlpackage")   # extra: pip install 'idkm-plugin[coreml]'

In a copy of the model, each palettized weight is replaced by its decoded float weight plus the palettization
metadata coremltools' own `DKMPalettizer.finalize()` writes (buffers `_COREML_/weight/lut`, `/compression_type`, `/vector_axis`); `ct.convert` turns that
into an ML program whose weights are LUT + n-bit indices (times the per-channel scales
`_COREML_/weight/palettization_scale` where the layer has them; an int8 LUT is written as its float values).
What Core ML cannot express raises ValueError naming the layer: more than 8 bits, vectors (d > 1) that
cross the weight's last axis.
Core ML has no 5- or 7-bit indices: those LUTs are padded to 6 / 8 bits (same weights, 1 more bit each).
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..nn.palettized_tensor import PalettizedTensor, palettized_parameters
from ..quiet import quiet_imports
from ..atomic import atomic_path
from .progress import stage

__all__ = ["coreml_lut", "count_ops", "to_coreml", "with_coreml_metadata"]

_COREML_BITS = (1, 2, 3, 4, 6, 8)  # iOS18 constexpr_lut_to_dense index types
_PALETTIZATION = 2  # coremltools' CompressionType.palettization


def _require_coremltools():
    try:
        with quiet_imports():
            import coremltools as ct
    except ImportError as err:
        raise ImportError("to_coreml needs coremltools: pip install 'idkm-plugin[coreml]' (coremltools==9.0); "
                          f"import failed: {err}") from None
    return ct


def coreml_lut(name: str, module: PalettizedTensor) -> tuple[torch.Tensor, Optional[int]]:
    """The LUT in coremltools' layout and the vector axis (None for d = 1).

    Ours: lut [groups, 2**bits, d], groups = consecutive blocks of output channels, vectors = d
    consecutive elements of the row-major weight. Core ML's: lut [groups, 1, ..., 1, 2**n, d] (rank =
    weight rank + 2, n in 1, 2, 3, 4, 6, 8) and vectors along one axis: here the last one. A pruned
    layer gets the next width up, so that its zeros decode from a spare all-zero entry.
    """
    bits, d, shape = module.bits, module.cluster_dim, module.weight_shape
    pruned = module.mask is not None
    # a pruned layer's zeros need a LUT entry of their own: the next width up, whose spare entries are 0
    coreml_bits = next((b for b in _COREML_BITS if b > bits or (b == bits and not pruned)), None)
    if coreml_bits is None:
        allowed = "at most 7 bits for a pruned layer (its zeros take a LUT entry)" if pruned else "at most 8 bits"
        raise ValueError(f"layer {name!r}: Core ML palettizes with {allowed}; this layer has bits={bits}")
    if d > 1 and shape[-1] % d:
        raise ValueError(f"layer {name!r}: Core ML vectors run along one axis, but dim={d} does not divide the "
                         f"last axis of the {list(shape)} weight, so its vectors cross rows; use a dim dividing "
                         f"{shape[-1]}")
    lut = module.decoded_lut().detach()  # an int8 LUT as its values (lut * lut_scale, float32)
    if lut.dtype not in (torch.float16, torch.float32):
        lut = lut.to(torch.float32)  # exact for bfloat16
    if coreml_bits > bits:  # pad with unused entries
        lut = torch.cat([lut, lut.new_zeros(lut.shape[0], (1 << coreml_bits) - (1 << bits), d)], 1)
    lut = lut.reshape(lut.shape[0], *([1] * (len(shape) - 1)), lut.shape[1], d)
    return lut, (len(shape) - 1 if d > 1 else None)


def with_coreml_metadata(model: nn.Module) -> nn.Module:
    """A copy of `model` whose palettized weights are float weights carrying Core ML palettization metadata. A tied
    weight (an embedding shared with the LM head) stays one Parameter, shared by all its layers, with the metadata
    on each, so the ML program holds one LUT + indices for it."""
    model = copy.deepcopy(model).eval()
    weights = palettized_parameters(model)
    if not weights:
        raise ValueError("to_coreml: the model has no palettized layer; convert it first")
    holders: dict[int, list[str]] = {}  # id(weight) -> every layer path holding it
    for path, weight in model.named_parameters(remove_duplicate=False):
        if isinstance(weight, PalettizedTensor):
            holders.setdefault(id(weight), []).append(path)
    for path, weight in weights.items():
        lut, vector_axis = coreml_lut(path.rpartition(".")[0], weight)
        dense = nn.Parameter(weight.dequantize().t() if weight.spec.transposed else weight.dequantize(),
                             requires_grad=False)
        for path in holders[id(weight)]:
            name, _, attr = path.rpartition(".")
            if attr != "weight":
                raise ValueError(f"{path!r}: a palettized weight outside a layer (a PT2E graph) cannot be converted "
                                 "to Core ML; convert the model through the eager torch.ao or torchao flow instead")
            layer = model.get_submodule(name) if name else model
            if weight.spec.transposed:  # Hugging Face's Conv1D: an nn.Linear computes it on the [out, in] weight
                linear = nn.Linear(weight.shape[0], weight.shape[1], bias=layer.bias is not None, device="meta")
                linear.bias = layer.bias
                layer = linear
            layer.weight = dense
            layer.register_buffer("_COREML_/weight/lut", lut)
            layer.register_buffer("_COREML_/weight/compression_type", torch.tensor([_PALETTIZATION]))
            if vector_axis is not None:
                layer.register_buffer("_COREML_/weight/vector_axis", torch.tensor(vector_axis))
            if weight.channel_scale is not None:  # per-channel scale: constexpr_blockwise_shift_scale after the LUT
                scale = _coreml_scale(name, weight)
                layer.register_buffer("_COREML_/weight/palettization_scale", scale)
            if not name:
                return _with_version(layer)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    return _with_version(model)


def _coreml_scale(name: str, weight) -> torch.Tensor:
    """The per-channel scales as coremltools' torch frontend takes them: [out, 1, ...], the weight's rank."""
    scale = weight.channel_scale.detach().float()
    if scale.dim() != 1:
        # the frontend divides the dense weight by the scale with broadcasting: it takes no block layout
        raise ValueError(f"{name}: block scales {list(scale.shape)} (scale_block_size) have no Core ML export; "
                         "use per-channel scales (scale_block_size=0) for a model bound for Core ML, or export "
                         "it with to_executorch")
    return scale.view(-1, *([1] * (len(weight.weight_shape) - 1)))


def _with_version(model: nn.Module) -> nn.Module:
    model.register_buffer("_COREML_/metadata_version", torch.tensor(1))
    return model


def to_coreml(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Optional[str | os.PathLike] = None,
              progress: bool = False, **convert_kwargs: Any):
    """Convert `model` to a Core ML ML program (iOS18+) with every palettized weight as LUT + indices.

    convert_kwargs go to `coremltools.convert` (defaults: `inputs` from the example inputs' shapes,
    `minimum_deployment_target=ct.target.iOS18`, `convert_to="mlprogram"`; pass
    `compute_precision=ct.precision.FLOAT32` to keep float32 LUTs, the default rounds them to float16).
    Saves the .mlpackage atomically when `path` is given. Returns the `ct.models.MLModel`.
    An op coremltools cannot convert raises NotImplementedError naming it and the ways around it.
    Decoder LLMs from transformers: `llm_export.llm_to_coreml` (precomputed causal mask, no `torch.diff`).
    """
    ct = _require_coremltools()
    example_inputs = tuple(example_inputs)
    with stage("to_coreml: trace", progress):
        dense = with_coreml_metadata(model)
        with torch.no_grad(), warnings.catch_warnings():
            # coremltools reads the palettization metadata from a TorchScript trace's state_dict
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(dense, example_inputs)
    convert_kwargs.setdefault("inputs", [ct.TensorType(name=f"input_{i}", shape=tuple(x.shape))
                                         for i, x in enumerate(example_inputs)])
    convert_kwargs.setdefault("minimum_deployment_target", ct.target.iOS18)
    convert_kwargs.setdefault("convert_to", "mlprogram")
    with stage("to_coreml: coremltools.convert", progress), quiet_imports(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"coremltools\.")  # NumPy 1.25 notices
        try:
            mlmodel = ct.convert(traced, **convert_kwargs)
        except NotImplementedError as err:
            op = re.search(r"op '([^']+)'", str(err))
            raise NotImplementedError(
                f"Core ML conversion of {type(model).__name__}: coremltools {ct.__version__} cannot convert the torch "
                f"op {op.group(1) if op else '?'!r} ({err}). Ways around it: keep the op out of the traced forward "
                "(for a transformers LLM, use llm_export.llm_to_coreml, which passes a precomputed causal mask and "
                "positions), replace the module that calls it by one written with supported ops, or register a "
                "converter with coremltools.converters.mil.frontend.torch.register_torch_op") from err
    if path is not None:
        with stage("to_coreml: save", progress), atomic_path(path) as tmp:
            mlmodel.save(tmp)
    return mlmodel


def count_ops(mlmodel, op_type: str) -> int:
    """How many ops of `op_type` (e.g. "constexpr_lut_to_dense") the ML program's functions hold."""
    spec = mlmodel.get_spec()
    total = 0

    def walk(block) -> None:
        nonlocal total
        for op in block.operations:
            total += op.type == op_type
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return total
