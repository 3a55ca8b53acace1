"""The layer walk's public names in one place: the registry (`layer_kinds`), selection and plan (`selection`) and
conversion (`conversion`), each in its own module.
"""
from .conversion import float_layer, palettize_module
from .layer_kinds import (UNSUPPORTED_TYPES, LayerKind, conv1d_forward, kind_named, kind_of, layer_kinds,
                          register_layer_kind, subclass_instance, unregister_layer_kind)
from .selection import (ConfigLike, Plan, PlanRow, as_model_config, check_clusterable, check_type_names,
                        checked_config, larger_than_float, plan, report_unmatched, resolve_layers)

__all__ = ["ConfigLike", "LayerKind", "Plan", "PlanRow", "UNSUPPORTED_TYPES", "as_model_config", "check_clusterable",
           "check_type_names", "checked_config", "conv1d_forward", "float_layer", "kind_named", "kind_of",
           "larger_than_float", "layer_kinds", "palettize_module", "plan", "register_layer_kind", "report_unmatched",
           "resolve_layers", "subclass_instance", "unregister_layer_kind"]
