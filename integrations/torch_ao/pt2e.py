"""PT2E (torchao's `prepare_qat_pt2e` / `convert_pt2e` on a `torch.export`ed model).

    exported = torch.export.export(model, example_inputs).module()
    qat = prepare_qat_pt2e(exported, IDKMQuantizer(model_config))
    ...train...
    pt2e_eval(qat)                               # eval-mode QAT model (hard assignment)
    deployed = convert_pt2e_palettized(qat)      # codes + LUT stay in the graph

`IDKMQuantizer` annotates the weight input of every linear / conv1d / conv2d / embedding node
with an `IDKMFakeQuantize` (config resolved per layer by its module path, as in eager mode).
`convert_pt2e_palettized` replaces each of those fake-quant calls by a palettized weight (a `PalettizedTensor`
Parameter of the graph module: packed uint8 codes + LUT, decoded where the graph uses it) and then runs torchao's
own `convert_pt2e` for everything else (activation fake-quants, if the quantizer was composed
with one that quantizes activations).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn


from idkm_plugin.layers import (ConfigLike, as_model_config, check_type_names, checked_config, layer_kinds,
                                report_unmatched)

from .fake_quantize import IDKMFakeQuantize

from torchao.quantization.pt2e.observer import _with_args  # noqa: E402
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer  # noqa: E402

__all__ = ["IDKMQuantizer", "convert_pt2e_palettized", "pt2e_eval", "pt2e_train"]



def _layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


class IDKMQuantizer(Quantizer):
    """Annotates linear / conv1d / conv2d / embedding weights with `IDKMFakeQuantize` (weight-only).

    Args:
        model_config: a ModelConfig (per-layer, resolved by module path such as "features.0") or
            one ClusterConfig for every layer.
    Compose with a torchao activation quantizer (ComposableQuantizer) to quantize activations too.
    """

    def __init__(self, model_config: ConfigLike) -> None:
        super().__init__()
        self.model_config = as_model_config(model_config)

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        check_type_names(self.model_config, model)
        kinds = {kind.aten_op: kind for kind in layer_kinds() if kind.aten_op is not None}
        seen: dict[str, str] = {}
        for node in model.graph.nodes:
            kind = kinds.get(node.target) if node.op == "call_function" else None
            if kind is None:
                continue
            index = kind.weight_arg
            weight = node.args[index]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue
            name = _layer_name(node)
            seen[name] = kind.name
            shape = _get_attr(model, weight.target).shape
            cfg = self.model_config.resolve(name, kind.name, shape)
            cfg = None if cfg is None else checked_config(self.model_config, name, kind.name, shape, cfg)
            if cfg is None:
                continue
            # torchao's own PartialWrapper: its prepare reads the class name through `.p.func`
            ctr = _with_args(IDKMFakeQuantize, config=cfg, name=name)
            qspec = QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=ctr)
            annotation = node.meta.setdefault("quantization_annotation", QuantizationAnnotation())
            annotation.input_qspec_map = _with_weight_spec(node, index, annotation.input_qspec_map, qspec)
            annotation._annotated = True
        report_unmatched(self.model_config, seen)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        pass


def _with_weight_spec(node: fx.Node, index: int, qspec_map: dict, qspec: QuantizationSpec) -> dict:
    """input_qspec_map with the weight's spec, ordered (input, weight, rest) as torchao's conv-bn
    QAT rewrite expects; an input nobody quantizes gets None (no observer)."""
    if index == 0:  # embedding(weight, indices)
        return {**qspec_map, node.args[0]: qspec}
    x = node.args[0]
    rest = {k: v for k, v in qspec_map.items() if k is not x and k is not node.args[1]}
    return {x: qspec_map.get(x), node.args[1]: qspec, **rest}


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _evaluate(model: fx.GraphModule, node: Any, cache: dict) -> Any:
    """Value of a node computed from parameters / buffers only (the weight subgraph)."""
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return type(node)(_evaluate(model, n, cache) for n in node)
        return node
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = _get_attr(model, node.target)
    elif node.op == "call_function":
        args = _evaluate(model, node.args, cache)
        kwargs = {k: _evaluate(model, v, cache) for k, v in node.kwargs.items()}
        value = node.target(*args, **kwargs)
    else:
        raise ValueError(f"the weight of {node.name} depends on {node.op} {node.target}; expected parameters only")
    cache[node] = value
    return value


def _delete_unused_attrs(model: fx.GraphModule, targets: set[str]) -> None:
    """Delete the parameters / buffers in `targets` that no get_attr node reads any more."""
    used = {n.target for n in model.graph.nodes if n.op == "get_attr"}
    for target in targets - used:
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        delattr(owner, attr)


def _free_name(model: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(model, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _set_fake_quant_training(model: nn.Module, mode: bool) -> None:
    for module in model.modules():
        if isinstance(module, IDKMFakeQuantize):
            module.train(mode)


_aten = torch.ops.aten
# op -> (position, keyword) of the argument that switches its dropout, and that argument's "off" value
_DROPOUT_SWITCH = {op: (2, "train", False) for op in (_aten.dropout.default, _aten.native_dropout.default,
                                                     _aten.feature_dropout.default, _aten.alpha_dropout.default,
                                                     _aten.feature_alpha_dropout.default)}
_DROPOUT_SWITCH[_aten.scaled_dot_product_attention.default] = (4, "dropout_p", 0.0)
_SAVED_DROPOUT = "idkm_dropout_switch"


def _set_dropout(model: fx.GraphModule, training: bool) -> None:
    """Turn every dropout of the graph off (training=False), remembering its value, or restore it.

    `torch.export` of a model in train mode bakes dropout into the graph, including attention's
    `dropout_p`, which torchao's move_exported_model_to_eval does not reach.
    """
    changed = False
    for node in model.graph.nodes:
        switch = _DROPOUT_SWITCH.get(node.target) if node.op == "call_function" else None
        if switch is None:
            continue
        index, key, off = switch
        if training:
            if _SAVED_DROPOUT not in node.meta:
                continue
            value = node.meta.pop(_SAVED_DROPOUT)
        else:
            current = node.args[index] if len(node.args) > index else node.kwargs.get(key)
            if current is None or current == off:
                continue
            node.meta[_SAVED_DROPOUT], value = current, off
        if len(node.args) > index:
            node.args = node.args[:index] + (value,) + node.args[index + 1:]
        else:
            node.kwargs = {**node.kwargs, key: value}
        changed = True
    if changed:
        model.recompile()


def pt2e_eval(model: fx.GraphModule) -> fx.GraphModule:
    """torchao's move_exported_model_to_eval, every dropout off (nn.Dropout and attention's dropout_p),
    and the IDKM fake-quants to eval (hard assignment): the eval-mode QAT model is deterministic."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(model)
    _set_dropout(model, training=False)
    _set_fake_quant_training(model, False)
    return model


def pt2e_train(model: fx.GraphModule) -> fx.GraphModule:
    """torchao's move_exported_model_to_train, the dropouts `pt2e_eval` turned off back on, and the IDKM
    fake-quants to training (soft clustering)."""
    from torchao.quantization.pt2e import move_exported_model_to_train

    move_exported_model_to_train(model)
    _set_dropout(model, training=True)
    _set_fake_quant_training(model, True)
    return model


@torch.no_grad()
def convert_pt2e_palettized(model: fx.GraphModule, **convert_kwargs: Any) -> fx.GraphModule:
    """Replace every IDKM fake-quant call by its palettized weight (a `PalettizedTensor` Parameter of the graph
    module, read by get_attr), then `convert_pt2e`.

    The codes are the hard nearest-centroid assignment of exactly the tensor the fake-quant sees
    in the graph (for a conv followed by BatchNorm, the BN-scaled weight of torchao's QAT conv-bn
    pattern), so the result equals the eval-mode QAT model (`pt2e_eval`). `convert_kwargs` go to
    torchao's convert_pt2e. Modifies and returns `model`.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    pt2e_eval(model)
    cache: dict = {}
    for node in list(model.graph.nodes):
        if node.op != "call_module":
            continue
        fq = model.get_submodule(node.target)
        if not isinstance(fq, IDKMFakeQuantize):
            continue
        weight = _evaluate(model, node.args[0], cache)
        target = _free_name(model, fq.clusterer.name.replace(".", "_") + "_palettized_weight")
        model.register_parameter(target, fq.clusterer.export_parameter(weight))
        node.op, node.target, node.args = "get_attr", target, ()
    model.graph.eliminate_dead_code()
    _delete_unused_attrs(model, {n.target for n in cache if n.op == "get_attr"})
    model.delete_all_unused_submodules()
    model.recompile()
    if not _has_other_quantizers(model):
        # Weight-only: nothing left for torchao to convert. (Its convert_pt2e would spend about a
        # second per conv-bn pattern export in _fold_conv_bn_qat, whose q/dq patterns cannot
        # match a palettized weight; the BatchNorm stays a separate eval-mode op.)
        return model
    return convert_pt2e(model, **convert_kwargs)


def _has_other_quantizers(model: nn.Module) -> bool:
    """Whether activation observers / fake-quants (torch.ao's or torchao's) remain in the model."""
    import torchao.quantization.pt2e as ao_pt2e
    from torch.ao.quantization import FakeQuantizeBase as TorchFakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase as TorchObserverBase

    kinds = (ao_pt2e.ObserverBase, ao_pt2e.FakeQuantizeBase, TorchObserverBase, TorchFakeQuantizeBase)
    return any(isinstance(m, kinds) for m in model.modules())
