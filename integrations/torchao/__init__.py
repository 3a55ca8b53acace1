"""torchao integration: `quantize_` configs for differentiable k-means clustering QAT.

    from torchao.quantization import quantize_
    from idkm_plugin import ClusterConfig
    from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable

    quantize_(model, IDKMQATConfig(ClusterConfig(method="idkm", bits=4), step="prepare"), filter_fn=clusterable)
    ... train ...
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)

Per-layer mixed precision: torchao's `FqnToConfig` (exact names and `re:` keys) with
`IDKMQATConfig` values, or `fqn_to_config(model_config, model)` from our `ModelConfig`;
both are applied with `quantize_(model, fqn_cfg, filter_fn=None)`.

Importing this package imports torchao (quietly); `import idkm_plugin` never does.
"""
from ._import import import_torchao

import_torchao()

from .codebook import to_codebook_tensor  # noqa: E402  (EXPERIMENTAL)
from .config import IDKMQATConfig, QATStep, clusterable, convert_module, prepare_module  # noqa: E402
from .fqn import fqn_to_config  # noqa: E402
from .modules import (IDKMFakeQuantConv1d, IDKMFakeQuantConv2d, IDKMFakeQuantEmbedding,  # noqa: E402
                      IDKMFakeQuantLinear, IDKMFakeQuantMixin)

__all__ = ["IDKMFakeQuantConv1d", "IDKMFakeQuantConv2d", "IDKMFakeQuantEmbedding", "IDKMFakeQuantLinear",
           "IDKMFakeQuantMixin", "IDKMQATConfig", "QATStep", "clusterable", "convert_module", "fqn_to_config",
           "prepare_module", "to_codebook_tensor"]
