"""Toolkit adapters: `idkm_plugin.integrations.{torch_ao, torchao, brevitas}`.

The adapter contract. An adapter only translates a toolkit's conventions into calls of the core;
every decision lives in the core, once:

1. Select layers through the registry: `idkm_plugin.layers.resolve_layers(model, model_config, ...)`
   yields (name, module, ClusterConfig or None) with the one `skip_unclusterable` policy and message, and
   the one size rule (`keep_float_if_larger`: a layer that palettization would not shrink stays float, warned);
   supported kinds come from `idkm_plugin.layers.layer_kinds()` (never a list of types of its own).
   Pass `supports=` for kinds the toolkit has no layer for, and `unwrap=` for wrapper modules (torch.ao's
   fused ConvBn*). Where only a graph exists (PT2E), use `ModelConfig.resolve(name, type_name, shape)`
   and `idkm_plugin.layers.checked_config`.
2. Wrap `idkm_plugin.clusterer.WeightClusterer`: one per clustered weight; the adapter sets `enabled` /
   `lut_frozen` from its own switches and calls `clusterer(weight)` (soft in training, frozen-LUT soft,
   hard in eval). It never calls `idkm_plugin.core` itself.
3. Convert through `idkm_plugin.layers.palettize_module(module, clusterer, weight=, bias=)`, so every
   toolkit produces the same form (and the same files and exports): the layer's float class whose weight is a
   `PalettizedTensor` (codes, LUT, scales, pruning mask and spec, exported once by the clusterer); where a
   graph needs a bare weight (PT2E), register `clusterer.export_parameter(weight)` and read it with get_attr.
4. Import the toolkit lazily (the package `__init__` may import it; `import idkm_plugin` never does).

Adding a layer kind is one registry entry; the torchao and torch.ao adapters then handle it without changes
(see `tests/integrations/test_adapter_contract.py`):

    from idkm_plugin.layers import LayerKind, register_layer_kind
    register_layer_kind(LayerKind("ScaledLinear", ScaledLinear,
                                  forward_with_weight=lambda m, x, w: F.linear(x, w, m.bias) * m.scale))

Adding a toolkit is one new folder here (package discovery ships it; `tests/test_wheel.py` checks).
"""
