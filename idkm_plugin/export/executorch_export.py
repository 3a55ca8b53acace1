"""ExecuTorch export of a palettized model: a .pte that keeps every weight as packed codes + LUT.

    from idkm_plugin.export import to_executorch
    to_executorch(deployed, (example_input,), "model.pte")     # extra: pip install 'idkm-plugin[executorch]'

`torch.export` traces the palettized weights' Core ATen decode (`nn/portable_dequantize.py`), so the
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

from ..nn.palettized_tensor import PalettizedTensor, decode
from ..quiet import quiet_imports
from ..atomic import atomic_write_bytes

__all__ = ["export_program", "to_executorch"]


def _require_executorch():
    try:
        with quiet_imports():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise ImportError("to_executorch needs ExecuTorch: pip install 'idkm-plugin[executorch]' "
                          f"(executorch==1.5.1 with torch 2.13); import failed: {err}") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def without_weight_cache(model: nn.Module, dense_convolutions: bool = False) -> nn.Module:
    """A copy of `model` in eval mode, wrapped so that its palettized weights are decoded inside the traced graph:
    each one becomes plain buffers (codes, LUT, scales, mask) on its layer, decoded with Core ATen ops before the
    model runs (outside the layer, so that backends see the layer's own op with a computed weight). With
    dense_convolutions, the palettized weights of its convolutions become float ones."""
    model = copy.deepcopy(model).eval()
    palettized = [(p, w) for p, w in model.named_parameters(remove_duplicate=False) if isinstance(w, PalettizedTensor)]
    decoded = []
    for path, weight in palettized:
        name, _, attr = path.rpartition(".")
        layer = model.get_submodule(name) if name else model
        del layer._parameters[attr]
        if dense_convolutions and isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            layer.register_parameter(attr, nn.Parameter(weight.dequantize(), requires_grad=False))
            continue
        for inner, tensor in weight.inner_tensors().items():
            layer.register_buffer(f"{attr}_{inner}", tensor)
        decoded.append((name, attr, weight.spec))
    return _DecodingRoot(model, decoded)


class _DecodingRoot(nn.Module):
    """forward(*args) = model(*args) after setting each palettized layer's weight attribute to the weight decoded
    from its `<attr>_codes` / `_lut` / `_channel_scale` / `_lut_scale` / `_mask` buffers."""

    def __init__(self, model: nn.Module, decoded: list) -> None:
        super().__init__()
        self.model = model
        self.decoded = decoded

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, attr, spec in self.decoded:
            layer = self.model.get_submodule(name) if name else self.model
            lut, lut_scale = getattr(layer, f"{attr}_lut"), getattr(layer, f"{attr}_lut_scale", None)
            if lut_scale is not None:
                lut = lut.to(torch.float32) * lut_scale.view(-1, 1, 1)
            layer.__dict__[attr] = decode(spec, getattr(layer, f"{attr}_codes"), lut,
                                          getattr(layer, f"{attr}_channel_scale", None),
                                          getattr(layer, f"{attr}_mask", None))
        return self.model(*args, **kwargs)


def export_program(model: nn.Module, example_inputs: Sequence[Any],
                   dense_convolutions: bool = False) -> torch.export.ExportedProgram:
    """`torch.export` of the model's inference graph, the palettized weights decoded inside it."""
    with torch.no_grad(), warnings.catch_warnings():  # torch.export's own deprecation notice, once per tree spec
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        return torch.export.export(without_weight_cache(model, dense_convolutions), tuple(example_inputs))


def _partitioners() -> list:
    """XNNPACK twice: first everything but convolutions, with linears whose weights the program
    decodes included (XNNPACK takes non-constant fully-connected weights when asked to), then the
    convolutions with the default settings (that option would also make conv biases non-constant,
    which XNNPACK's depthwise convolutions and conv+BatchNorm fusion reject)."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import ConvolutionConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    no_convs = [config for config in ALL_PARTITIONER_CONFIGS if config is not ConvolutionConfig]
    return [XnnpackPartitioner(configs=no_convs, force_non_static_weights_for_f32_linear=True),
            XnnpackPartitioner()]


def to_executorch(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike,
                  delegate: bool = True, dense_convolutions: bool = False) -> int:
    """Write an ExecuTorch program (.pte) for `model` called on `example_inputs`; returns its size in bytes.

    delegate: lower what XNNPACK supports to XNNPACK (default: linears, activations, pooling...);
    False keeps everything on the portable kernels.
    dense_convolutions: store the palettized convolutions' weights decoded (float), so XNNPACK runs
    them: much faster on CPU (XNNPACK convolutions need constant weights; the portable ones are slow),
    at the cost of those weights' float size. Default False: every palettized weight stays packed.
    The file is written atomically.
    """
    to_edge_transform_and_lower, _ = _require_executorch()
    partitioners = _partitioners() if delegate else []
    with warnings.catch_warnings():  # ExecuTorch 1.5's serializer still calls importlib.resources.read_binary
        warnings.filterwarnings("ignore", message="read_binary is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = to_edge_transform_and_lower(export_program(model, example_inputs, dense_convolutions),
                                              partitioner=partitioners)
        buffer = program.to_executorch().buffer
    atomic_write_bytes(path, buffer)
    return len(buffer)
