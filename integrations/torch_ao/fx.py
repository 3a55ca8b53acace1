"""FX graph mode: our counterpart of `convert_fx` for models prepared with `prepare_qat_fx`.

Stock `convert_fx` turns QAT modules with an unknown weight fake-quant back into float layers
(the clustering is silently lost), so `convert_fx_palettized` swaps them itself:

    qat = prepare_qat_fx(model.train(), qconfig_mapping(mp, model), example_inputs)
    ...train...
    deployed = convert_fx_palettized(qat.eval())
"""
from __future__ import annotations

import copy

from torch import fx
from torch.ao.quantization import FakeQuantizeBase

from .convert import palettize_qat_module
from .fake_quantize import IDKMFakeQuantize

__all__ = ["convert_fx_palettized"]


def convert_fx_palettized(prepared: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """A GraphModule whose clustered QAT layers are palettized (packed codes + LUT).

    Fused QAT modules (ConvBnReLU2d, ...) fold their BatchNorm; activation fake-quants the graph
    holds (when activations were quantized too) are kept in eval mode with their observers off, so
    the result computes what `prepared.eval()` computes. Returns a new GraphModule unless inplace.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise ValueError(f"convert_fx_palettized expects the GraphModule from prepare_qat_fx, got {type(prepared).__name__}")
    gm = prepared if inplace else copy.deepcopy(prepared)
    gm.eval()
    for name, module in list(gm.named_modules()):
        if isinstance(getattr(module, "weight_fake_quant", None), IDKMFakeQuantize):
            gm.set_submodule(name, palettize_qat_module(module))
        elif isinstance(module, FakeQuantizeBase) and not isinstance(module, IDKMFakeQuantize):
            module.disable_observer()
    for module in gm.modules():
        if "qconfig" in vars(module):
            del module.qconfig
    gm.recompile()
    return gm
