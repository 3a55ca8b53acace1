"""torch.ao integration: DKM / IDKM / IDKM-JFB weight fake-quant for eager, FX and PT2E QAT.

    model.qconfig = idkm_qconfig(ClusterConfig(method="idkm", bits=2))   # or assign_qconfigs(model, mp)
    qat = torch.ao.quantization.prepare_qat(model.train())
    ...train...
    deployed = torch.ao.quantization.convert(qat.eval(), mapping=palettize_mapping())

PT2E (`IDKMQuantizer`, `convert_pt2e_palettized`) needs torchao and is imported on first use.
"""
from .assign import assign_qconfigs, qconfig_mapping
from .convert import palettize_mapping, palettize_qat_module
from .fx import convert_fx_palettized
from .fake_quantize import IDKMFakeQuantize
from .qat import qat_module_mapping
from .qconfig import idkm_qconfig

_PT2E = ("IDKMQuantizer", "convert_pt2e_palettized", "pt2e_eval", "pt2e_train")


def __getattr__(name: str):
    """PT2E names import torchao on first use, so this package works without torchao."""
    if name in _PT2E:
        from . import pt2e

        return getattr(pt2e, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_PT2E, "IDKMFakeQuantize", "assign_qconfigs", "convert_fx_palettized", "idkm_qconfig", "palettize_mapping", "palettize_qat_module",
           "qat_module_mapping", "qconfig_mapping"]
