"""Hugging Face models built from small configs (random weights, seconds each): tied embeddings, bf16."""
import pytest
import torch

pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")

from torchao.quantization import quantize_  # noqa: E402

from idkm_plugin import ClusterConfig, ModelConfig  # noqa: E402
from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable, fqn_to_config  # noqa: E402
from idkm_plugin.nn import PalettizedTensor, palettized_parameters  # noqa: E402


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
    assert type(emb) is torch.nn.Embedding and type(head) is torch.nn.Linear
    assert isinstance(emb.weight, PalettizedTensor) and head.weight is emb.weight  # the tie kept: stored once
    assert torch.equal(model(input_ids=ids).logits, expected)
    weights = palettized_parameters(model)  # a shared Parameter once, under its first name
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    state = model.state_dict()
    assert state["lm_head.weight"].codes.untyped_storage().data_ptr() == \
        state["model.embed_tokens.weight"].codes.untyped_storage().data_ptr()


def test_tied_layers_with_different_configs_are_refused():
    model = tiny_llama()
    mc = ModelConfig(default=ClusterConfig(bits=3), by_type={"Embedding": ClusterConfig(bits=4)})
    with pytest.raises(ValueError, match=r"'model.embed_tokens' and 'lm_head' share one \(tied\) weight"):
        fqn_to_config(mc, model)


def tiny_gpt2():
    """GPT-2 (transformers' Conv1D layers, weight stored [in, out]; lm_head tied to wte)."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config)


MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}
# Rules that read naturally on HF names; a head tied to the embedding must get the embedding's config
CFG = ModelConfig(default=ClusterConfig(bits=3, max_iter=5),
                  by_type={"Linear": ClusterConfig(bits=2, dim=2, max_iter=5)},
                  by_name={r"re:lm_head|cls\.predictions\.decoder": ClusterConfig(bits=3, max_iter=5)})


def _prepare_torchao(model):
    quantize_(model, fqn_to_config(CFG, model), filter_fn=None)
    return model


def _prepare_torch_ao(model):
    import torch.ao.quantization as tq
    from idkm_plugin.integrations.torch_ao import assign_qconfigs, qat_module_mapping

    return tq.prepare_qat(assign_qconfigs(model, CFG, mapping=qat_module_mapping()).train(),
                          mapping=qat_module_mapping())


def _convert_torch_ao(model):
    import torch.ao.quantization as tq
    from idkm_plugin.integrations.torch_ao import palettize_mapping

    return tq.convert(model, mapping=palettize_mapping())


FLOWS = {"torchao": (_prepare_torchao, _convert), "torch.ao": (_prepare_torch_ao, _convert_torch_ao)}


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("arch", MODELS)
def test_hf_models_convert_exactly_to_eval_qat(arch, flow):
    prepare, convert = FLOWS[flow]
    model = MODELS[arch]()
    if arch == "gpt2":  # Hugging Face's Conv1D is a registered kind (weight clustered [out, in])
        conv = model.transformer.h[0].attn.c_attn
        assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (16, 48)
    model = prepare(model)
    if arch == "gpt2":
        conv = model.transformer.h[0].attn.c_attn
        assert conv.weight_fake_quant.config.bits == 3 if flow == "torch.ao" else conv.cluster_config.bits == 3
    ids = torch.randint(0, 64, (2, 8))
    _train_step(model, ids)
    model.eval()
    expected = model(input_ids=ids).logits
    deployed = convert(model)
    assert torch.equal(deployed(input_ids=ids).logits, expected)
    palettized = [m for m in deployed.modules() if isinstance(getattr(m, "weight", None), PalettizedTensor)]
    assert len(palettized) >= 6
    float_types = (torch.nn.Linear, torch.nn.Embedding, transformers.pytorch_utils.Conv1D)
    assert all(type(m) in float_types for m in palettized)  # every converted layer keeps its float class
    if arch == "gpt2":
        conv = deployed.transformer.h[0].attn.c_attn
        assert type(conv).__name__ == "Conv1D" and isinstance(conv.weight, PalettizedTensor)
        assert conv.weight.shape == (16, 48) and conv.weight.spec.transposed  # stored [in, out] as HF keeps it
    if arch in ("gpt2", "llama"):  # the tie is kept through both flows
        head = deployed.lm_head
        emb = deployed.transformer.wte if arch == "gpt2" else deployed.model.embed_tokens
        assert isinstance(emb.weight, PalettizedTensor) and isinstance(head.weight, PalettizedTensor)
        assert head.weight.codes is emb.weight.codes and head.weight.lut is emb.weight.lut
