"""Brevitas integration: differentiable k-means clustering as injectable weight quantizers.

    import brevitas.nn as qnn
    from idkm_plugin.integrations.brevitas import IDKMWeightQuant, palettize

    fc = qnn.QuantLinear(512, 10, weight_quant=IDKMWeightQuant, weight_bit_width=2)
    conv = qnn.QuantConv2d(16, 32, 3, weight_quant=IDKMWeightQuant, weight_bit_width=4, weight_cluster_dim=4)
    ... train ...
    deployed = palettize(model.eval())      # packed codes + LUT, same outputs

A float model with a `ModelConfig`: `quantize_model(model, model_config)` (through Brevitas'
layer map). Importing this package imports Brevitas; `import idkm_plugin` never does.
"""
from ._import import import_brevitas

import_brevitas()

from .convert import ActQuantPalettized, palettize, palettize_layer  # noqa: E402
from .layerwise import compute_layer_map, quantize_model, resolve_layers  # noqa: E402
from .proxy import ClusterTensorQuant, ClusterWeightQuantProxy, check_layer_supported  # noqa: E402
from .quantizers import (FIELD_TO_ATTR, ClusterWeightQuant, DKMWeightQuant, IDKMWeightQuant,  # noqa: E402
                         JFBWeightQuant, weight_quant_kwargs)

__all__ = ["ActQuantPalettized", "ClusterTensorQuant", "ClusterWeightQuant", "ClusterWeightQuantProxy",
           "DKMWeightQuant", "FIELD_TO_ATTR", "IDKMWeightQuant", "JFBWeightQuant", "check_layer_supported",
           "compute_layer_map", "palettize", "palettize_layer", "quantize_model", "resolve_layers",
           "weight_quant_kwargs"]
