"""What a distilled student shares with its teacher (examples/minilm_distill.py, examples/mobilenet_distill.py)."""
from __future__ import annotations

from torch import nn


def without_dropout(model: nn.Module) -> nn.Module:
    """Set every nn.Dropout's p to 0, in place; returns `model`.

    A student distilled to reproduce its float teacher should see the teacher's (eval-mode) function: dropout
    in the student's train mode only adds noise to the target it must match. p = 0 rather than eval() because
    Hugging Face attention reads `self.dropout.p` under its own module's training flag.
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model
