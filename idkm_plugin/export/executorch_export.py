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

import contextlib
import copy
import os
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..nn.palettized_tensor import PalettizedTensor, decode
from ..quiet import quiet_imports
from ..atomic import atomic_write_bytes
from .progress import stage

__all__ = ["export_program", "load_pte_method", "lower_to_pte", "to_executorch", "without_weight_cache"]


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
    each one becomes plain buffers (codes, LUT, scales, mask) on its (first) layer, decoded with Core ATen ops before
    the model runs (outside the layer, so that backends see the layer's own op with a computed weight). A tied
    weight (one Parameter in several layers) keeps one set of buffers and is decoded once for all its layers. With
    dense_convolutions, the palettized weights of its convolutions become float ones."""
    model = copy.deepcopy(model).eval()
    owners: dict[int, list[tuple[str, str]]] = {}  # id(weight) -> every (layer path, attribute) holding it
    weights: dict[int, PalettizedTensor] = {}
    for path, weight in model.named_parameters(remove_duplicate=False):
        if isinstance(weight, PalettizedTensor):
            name, _, attr = path.rpartition(".")
            owners.setdefault(id(weight), []).append((name, attr))
            weights[id(weight)] = weight
    decoded = []
    for key, holders in owners.items():
        weight = weights[key]
        for name, attr in holders:
            del (model.get_submodule(name) if name else model)._parameters[attr]
        name, attr = holders[0]
        layer = model.get_submodule(name) if name else model
        if dense_convolutions and isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            dense = nn.Parameter(weight.dequantize(), requires_grad=False)
            for name, attr in holders:
                (model.get_submodule(name) if name else model).register_parameter(attr, dense)
            continue
        for inner, tensor in weight.inner_tensors().items():
            layer.register_buffer(f"{attr}_{inner}", tensor)
        decoded.append((holders, weight.spec))
    return _DecodingRoot(model, decoded)


class _DecodingRoot(nn.Module):
    """forward(*args) = model(*args) after setting each palettized weight's layers' weight attribute to the weight
    decoded from the `<attr>_codes` / `_lut` / `_channel_scale` / `_lut_scale` / `_mask` buffers of its first layer.
    decoded: [([(layer path, attribute), ...], PaletteSpec)], one entry per palettized weight."""

    def __init__(self, model: nn.Module, decoded: list) -> None:
        super().__init__()
        self.model = model
        self.decoded = decoded

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for holders, spec in self.decoded:
            name, attr = holders[0]
            layer = self.model.get_submodule(name) if name else self.model
            lut, lut_scale = getattr(layer, f"{attr}_lut"), getattr(layer, f"{attr}_lut_scale", None)
            if lut_scale is not None:
                lut = lut.to(torch.float32) * lut_scale.view(-1, 1, 1)
            weight = decode(spec, getattr(layer, f"{attr}_codes"), lut, getattr(layer, f"{attr}_channel_scale", None),
                            getattr(layer, f"{attr}_mask", None))
            for name, attr in holders:
                (self.model.get_submodule(name) if name else self.model).__dict__[attr] = weight
        return self.model(*args, **kwargs)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the notices torch.export / ExecuTorch 1.5 give on every export (scoped, not global)."""
    with warnings.catch_warnings(), quiet_imports():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        # the decoded weights are set as layer attributes on purpose: they are computed from the buffers
        warnings.filterwarnings("ignore", message=r"The tensor attributes .* were assigned during export")
        warnings.filterwarnings("ignore", message="read_binary is deprecated", category=DeprecationWarning)
        # a KV cache is a mutated buffer: its initial state is not stored (the program resets it by position)
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        yield


def export_program(model: nn.Module, example_inputs: Sequence[Any],
                   dense_convolutions: bool = False) -> torch.export.ExportedProgram:
    """`torch.export` of the model's inference graph, the palettized weights decoded inside it."""
    with torch.no_grad(), _quiet_export():
        return torch.export.export(without_weight_cache(model, dense_convolutions), tuple(example_inputs))


def _partitioners(convolutions: bool = True) -> list:
    """XNNPACK twice: first everything but convolutions, with linears whose weights the program
    decodes included (XNNPACK takes non-constant fully-connected weights when asked to), then the
    convolutions with the default settings (that option would also make conv biases non-constant,
    which XNNPACK's depthwise convolutions and conv+BatchNorm fusion reject). Without convolutions, the first
    alone: each partitioner adds passes over the whole graph (decompositions, partitioning; measured on
    SmolLM2-135M: the edge conversion 84 s with both, 36 s with one)."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import ConvolutionConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    no_convs = [config for config in ALL_PARTITIONER_CONFIGS if config is not ConvolutionConfig]
    first = XnnpackPartitioner(configs=no_convs, force_non_static_weights_for_f32_linear=True)
    return [first, XnnpackPartitioner()] if convolutions else [first]


def _has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.conv._ConvNd) for module in model.modules())


def to_executorch(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike,
                  delegate: bool = True, dense_convolutions: bool = False, progress: bool = False) -> int:
    """Write an ExecuTorch program (.pte) for `model` called on `example_inputs`; returns its size in bytes.

    delegate: lower what XNNPACK supports to XNNPACK (default: linears, activations, pooling...);
    False keeps everything on the portable kernels.
    dense_convolutions: store the palettized convolutions' weights decoded (float), so XNNPACK runs
    them: much faster on CPU (XNNPACK convolutions need constant weights; the portable ones are slow),
    at the cost of those weights' float size. Default False: every palettized weight stays packed.
    progress: one line per stage (export, lowering, serialization) on stderr.
    The file is written atomically. Decoder LLMs from transformers: `llm_export.llm_to_executorch` (KV cache).
    """
    return lower_to_pte(model, example_inputs, path, delegate, dense_convolutions, progress)


def lower_to_pte(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike, delegate: bool = True,
                 dense_convolutions: bool = False, progress: bool = False) -> int:
    """`to_executorch`'s stages: torch.export (weights decoded in the graph), edge + XNNPACK lowering,
    serialization, atomic write. Returns the file's size in bytes."""
    to_edge_transform_and_lower, _ = _require_executorch()
    partitioners = _partitioners(_has_convolutions(model)) if delegate else []
    with stage("to_executorch: torch.export", progress):
        program = export_program(model, example_inputs, dense_convolutions)
        _drop_provenance(program)
    with stage("to_executorch: edge dialect + XNNPACK lowering", progress), _quiet_export(), _shallow_provenance(), \
            _sort_in_place():
        edge = to_edge_transform_and_lower(program, partitioner=partitioners)
    with stage("to_executorch: serialize", progress), _quiet_export(), _shallow_provenance():
        buffer = edge.to_executorch().buffer
        atomic_write_bytes(path, buffer)
    return len(buffer)


def _drop_provenance(program: torch.export.ExportedProgram) -> None:
    """Drop torch.fx's node provenance (`meta["from_node"]`) from the exported graph. Every later pass deep-copies
    each node's whole history, so the lowering's time grows with the passes already run; the .pte does not use it
    (measured: the lowering of a 2-layer LLaMA with a KV cache, 57 s -> 36 s)."""
    for node in program.graph.nodes:
        node.meta.pop("from_node", None)


@contextlib.contextmanager
def _shallow_provenance() -> Iterator[None]:
    """Within the block, a node's provenance record (`torch.fx.traceback.NodeSource`) names its source node but not
    that node's own history. torch.fx deep-copies the whole history into every new record, and ExecuTorch's
    lowering re-traces the graph for each pass and each XNNPACK partition, so the histories grow with the passes
    run and their copying dominated the export of an LLM (time quadratic in its depth). ExecuTorch's debug handles
    then come from each node's latest source rather than its first. Restored on exit."""
    from torch.fx import traceback as fx_traceback

    original = fx_traceback.NodeSource.__init__

    def shallow(self, node, pass_name="", action=None):
        original(self, None, pass_name, action)
        if node is not None:
            self.node_info = self.NodeInfo(node.name, str(node.target), id(node.graph))

    fx_traceback.NodeSource.__init__ = shallow
    try:
        yield
    finally:
        fx_traceback.NodeSource.__init__ = original


@contextlib.contextmanager
def _sort_in_place() -> Iterator[None]:
    """Within the block, ExecuTorch's `create_submodule_from_nodes` (one call per XNNPACK partition) restores the
    graph's topological order by moving the few nodes the fused partition left out of order, in place. Its
    `legalize_graph` copies the whole graph into a new one (reordered) for every partition: time partitions x
    nodes (measured on SmolLM2-135M, 155 partitions: 75 s of a 233 s lowering; 24 s in place). Restored on exit."""
    from executorch.exir import lowered_backend_module

    original = lowered_backend_module.legalize_graph

    def sort_in_place(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        if _stable_topological_sort(gm.graph):
            gm.recompile()
        return gm

    lowered_backend_module.legalize_graph = sort_in_place
    try:
        yield
    finally:
        lowered_backend_module.legalize_graph = original


def _stable_topological_sort(graph: torch.fx.Graph) -> bool:
    """Reorder `graph` in place so that every node follows its inputs, moving only the nodes that precede one of
    their inputs (each after the last of them); the others keep their order. Returns whether a node moved."""
    pending = list(reversed(graph.nodes))  # popped in graph order
    ready: set = set()
    waiting: dict = {}  # input node -> the nodes waiting for it
    cursor, moved = None, False
    while pending:
        node = pending.pop()
        missing = [arg for arg in node.all_input_nodes if arg not in ready]
        if missing:
            waiting.setdefault(missing[-1], []).append(node)
            continue
        ready.add(node)
        if cursor is not None and cursor.next is not node:
            cursor.append(node)
            moved = True
        cursor = node
        pending.extend(reversed(waiting.pop(node, ())))
    if waiting:
        raise RuntimeError(f"graph has a cycle through {list(waiting)}")
    return moved


def load_pte_method(path: str | os.PathLike, method: str = "forward"):
    """The `executorch.runtime` method of a .pte (call `.execute([tensors])`)."""
    with quiet_imports():
        from executorch.runtime import Runtime
    return Runtime.get().load_program(os.fspath(path)).load_method(method)
