"""Hugging Face models built from small configs (random weights, seconds each): tied embeddings, bf16."""
import pytest
import torch

pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")

from torchao.quantization import quantize_  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable, fqn_to_config  # noqa: E402
from idkm_plugin.nn import PalettizedEmbedding, PalettizedLinear  # noqa: E402


def tiny_llama(dtype=torch.float32):
    """LLaMA-style decoder with lm_head tied to the token embedding: 64 x 32."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _train_step(model, ids) -> None:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def _convert(model):
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embedding_and_lm_head_one_lut_stored_once(dtype):
    model = tiny_llama(dtype)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_(model, fqn_to_config(ModelConfig(default=ClusterConfig(bits=3, max_iter=5)), model), filter_fn=None)
    emb, head = model.model.embed_tokens.weight_clusterer, model.lm_head.weight_clusterer
    ids = torch.randint(0, 64, (2, 8))
    _train_step(model, ids)
    assert int(emb.tie_owner(model.lm_head.weight).step) == 1  # clustered once per step, not twice
    assert emb.centroids is head.centroids  # one LUT
    model.eval()
    expected = model(input_ids=ids).logits
    _convert(model)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, PalettizedEmbedding) and isinstance(head, PalettizedLinear)
    assert head.codes is emb.codes and head.lut is emb.lut  # the tie kept: stored once
    assert torch.equal(model(input_ids=ids).logits, expected)
    state = model.state_dict()
    assert state["lm_head.codes"].untyped_storage().data_ptr() == state["model.embed_tokens.codes"].untyped_storage().data_ptr()


def test_tied_layers_with_different_configs_are_refused():
    model = tiny_llama()
    mc = ModelConfig(default=ClusterConfig(bits=3), by_type={"Embedding": ClusterConfig(bits=4)})
    with pytest.raises(ValueError, match=r"'model.embed_tokens' and 'lm_head' share one \(tied\) weight"):
        fqn_to_config(mc, model)
