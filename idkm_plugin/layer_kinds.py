"""The one registry of supported layer kinds.

Every integration reads the supported kinds from `layer_kinds()`; nothing else lists layer types. Adding a kind
is one `register_layer_kind` call:

    register_layer_kind(LayerKind(name="MyLinear", float_type=MyLinear,
                                  forward_with_weight=lambda m, x, w: F.linear(x, w, m.bias)))

after which torchao's `quantize_`, torch.ao's `prepare_qat(mapping=qat_module_mapping())` and every convert
handle it (Brevitas only where it has a Quant layer for the kind; otherwise the walk names the layer in a clear
error). A converted layer keeps its float class; only its weight becomes a `PalettizedTensor`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerKind", "UNSUPPORTED_TYPES", "conv1d_forward", "kind_named", "kind_of", "layer_kinds",
           "register_layer_kind", "subclass_instance", "unregister_layer_kind"]


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
        forward_with_weight: (module, input, weight) -> output: the float forward with `weight` (laid out as
            `clustered_weight` gives it) in place of the module's own (the fake-quantized layers of every
            toolkit run this).
        clustered_weight: module -> its weight laid out [out, ...] (output channels first), the tensor that
            is clustered and palettized; `module.weight` unless the layer stores it otherwise (a view).
        transposed: the module stores its weight as the transpose of `clustered_weight` (Conv1D: [in, out]);
            the converted weight then decodes transposed.
        aten_op, weight_arg: the op a `torch.export`ed graph calls for this layer and the index of its
            weight argument (PT2E annotates those); None when the kind has no single op.
        check: (module, name) -> None, raising ValueError when this instance cannot be palettized.
    """

    name: str
    float_type: type
    forward_with_weight: Callable[[nn.Module, Any, torch.Tensor], Any]
    aten_op: Optional[Any] = None
    weight_arg: int = 1
    check: Callable[[nn.Module, str], None] = _no_check
    clustered_weight: Callable[[nn.Module], torch.Tensor] = _own_weight
    transposed: bool = False


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
    LayerKind("Linear", nn.Linear, lambda m, x, w: F.linear(x, w, m.bias), _aten.linear.default),
    LayerKind("Conv1d", nn.Conv1d, _conv_forward, _aten.conv1d.default),
    LayerKind("Conv2d", nn.Conv2d, _conv_forward, _aten.conv2d.default),
    LayerKind("Embedding", nn.Embedding, _embedding_forward, _aten.embedding.default,
              weight_arg=0, check=_check_embedding),
):
    register_layer_kind(_kind)


def _register_transformers_kinds() -> None:
    """Hugging Face's Conv1D (GPT-2 family), once the user's code has imported transformers (never imported here)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    if conv1d is not None and conv1d not in _KINDS:
        register_layer_kind(LayerKind("Conv1D", conv1d, lambda m, x, w: conv1d_forward(x, w, m.bias),
                                      clustered_weight=lambda m: m.weight.t(), transposed=True))


def conv1d_forward(x: torch.Tensor, weight_out_in: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Conv1D's forward with its weight given [out, in]: x [..., in] -> [..., out] (same addmm, same rounding)."""
    out = weight_out_in.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, flat, weight_out_in.t()) if bias is not None else flat @ weight_out_in.t()
    return y.view(*x.shape[:-1], out)



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


