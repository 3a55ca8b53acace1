"""ExecuTorch export of a palettized model: a .pte that keeps every weight as packed codes + LUT.

    from idkm_plugin.export import to_executorch
    to_executorch(deployed, (example_input,), "model.pte")     # extra: pip install 'idkm-plugin[executorch]'

`torch.export` traces the palettized modules' Core ATen decode (`nn/portable_dequantize.py`), so the
program's constants are the packed uint8 codes and the LUTs, decoded by the program when it runs;
XNNPACK takes the layers it can delegate, linears with decoded weights included (convolutions need
constant weights in XNNPACK, so those run on ExecuTorch's portable kernels).
Run it with `executorch.runtime.Runtime.get().load_program(path).load_method("forward")`.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from ..nn.palettized import PalettizedModule
from .atomic import atomic_write_bytes

__all__ = ["export_program", "to_executorch"]


def _require_executorch():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise ImportError("to_executorch needs ExecuTorch: pip install 'idkm-plugin[executorch]' "
                          f"(executorch==1.5.1 with torch 2.13); import failed: {err}") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def without_weight_cache(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose palettized layers decode in the traced graph (no cached dense weight)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, PalettizedModule):
            module.clear_weight_cache()
            module.cache_weight = False
    return model


def export_program(model: nn.Module, example_inputs: Sequence[Any]) -> torch.export.ExportedProgram:
    """`torch.export` of the model's inference graph, the palettized weights decoded inside it."""
    with torch.no_grad():
        return torch.export.export(without_weight_cache(model), tuple(example_inputs))


def to_executorch(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike,
                  delegate: bool = True) -> int:
    """Write an ExecuTorch program (.pte) for `model` called on `example_inputs`; returns its size in bytes.

    delegate: lower what XNNPACK supports to XNNPACK (default: linears, activations, pooling...);
    False keeps everything on the portable kernels. The file is written atomically.
    """
    to_edge_transform_and_lower, XnnpackPartitioner = _require_executorch()
    # linears whose weight the program decodes go to XNNPACK too (it takes non-constant weights for
    # fully-connected layers only; convolutions with a decoded weight stay on the portable kernels)
    partitioners = [XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)] if delegate else []
    with warnings.catch_warnings():  # ExecuTorch 1.5's serializer still calls importlib.resources.read_binary
        warnings.filterwarnings("ignore", message="read_binary is deprecated", category=DeprecationWarning)
        program = to_edge_transform_and_lower(export_program(model, example_inputs), partitioner=partitioners)
        buffer = program.to_executorch().buffer
    atomic_write_bytes(path, buffer)
    return len(buffer)
