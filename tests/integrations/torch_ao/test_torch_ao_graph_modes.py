"""PT2E and FX on transformer-style models: deterministic eval, converted == eval QAT, clear limits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.torch_ao import (IDKMQuantizer, convert_pt2e_palettized, pt2e_eval,  # noqa: E402
                                               pt2e_train, qconfig_mapping)

CFG = ModelConfig(default=ClusterConfig(bits=2, max_iter=3), by_type={"Embedding": None})


class Attention(nn.Module):
    """Self-attention with dropout on the attention weights and on the output. x [N, T, 16] -> [N, T, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out, self.drop = nn.Linear(16, 48), nn.Linear(16, 16), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        return self.drop(self.out(y.transpose(1, 2).reshape(n, t, 16)))


def _first(out):
    """The main output: a tensor, or the first field of a tuple / ModelOutput."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _assert_eval_deterministic_and_converted_equal(model: nn.Module, x, config: ModelConfig = CFG) -> None:
    exported = torch.export.export(model.train(), (x,)).module()
    qat = prepare_qat_pt2e(exported, IDKMQuantizer(config))
    _first(qat(x)).square().mean().backward()  # a training step
    pt2e_eval(qat)
    assert torch.equal(_first(qat(x)), _first(qat(x)))  # no dropout left in the eval-mode graph
    pt2e_train(qat)  # the dropouts come back for training
    torch.manual_seed(0)
    a = _first(qat(x))
    torch.manual_seed(1)
    assert not torch.equal(a, _first(qat(x)))
    pt2e_eval(qat)
    expected = _first(qat(x))
    deployed = convert_pt2e_palettized(qat)
    assert torch.equal(_first(deployed(x)), expected)


def test_pt2e_attention_dropout_is_off_in_eval_and_converted_equals_eval():
    torch.manual_seed(0)
    _assert_eval_deterministic_and_converted_equal(Attention(), torch.randn(2, 5, 16), ModelConfig(default=CFG.default))


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False)


def test_pt2e_tiny_bert_eval_is_deterministic_and_converted_equals_eval():
    _assert_eval_deterministic_and_converted_equal(_tiny_bert(), torch.randint(0, 64, (2, 8)))


def test_fx_on_an_untraceable_model_names_the_flows_that_work():
    with pytest.raises(ValueError, match=r"BertModel could not be traced.*quantize_.*PT2E.*the tracer said: "):
        qconfig_mapping(CFG, _tiny_bert())
