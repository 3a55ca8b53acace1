"""A small tied LLaMA at 4 bits: .pte with a KV cache generates PyTorch's greedy tokens under executorch.runtime,
Core ML has one constexpr_lut_to_dense per palettized weight (the tied one shared), and plan / size_report / the
file count the tied embedding + LM head once."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao")

from idkm_plugin import ClusterConfig, ModelConfig, plan  # noqa: E402
from idkm_plugin.export import save_palettized, size_report  # noqa: E402
from idkm_plugin.export.llm_export import CausalMaskLM, StaticCacheLM  # noqa: E402
from idkm_plugin.integrations.torchao import IDKMQATConfig, fqn_to_config  # noqa: E402
from idkm_plugin.nn import PalettizedTensor, palettized_parameters  # noqa: E402

VOCAB = 512
PROMPT = [3, 17, 101, 7]


def tiny_llama(seed: int = 0, vocab: int = VOCAB, hidden: int = 64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the init's, so greedy tokens vary and ties are unlikely
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model.eval()


def convert_4bit(model):
    """The torchao flow: prepare, one training forward (centroids), convert."""
    from torchao.quantization import quantize_

    mc = ModelConfig(default=ClusterConfig(bits=4))
    quantize_(model, fqn_to_config(mc, model), filter_fn=None)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 8)))
    model.eval()
    quantize_(model, IDKMQATConfig(step="convert"), filter_fn=None)
    return model


@pytest.fixture(scope="module")
def llama():
    return convert_4bit(tiny_llama())


def greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_the_tied_weight_is_one_palettized_parameter(llama):
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert isinstance(llama.lm_head.weight, PalettizedTensor)
    assert len(palettized_parameters(llama)) == 2 * 7 + 1  # 7 linears a layer + the shared embedding / head


def test_static_cache_wrapper_matches_the_model(llama):
    """One token at a time through StaticCacheLM gives the full-sequence forward's logits at every position."""
    wrapped = StaticCacheLM(llama, max_cache_len=16).eval()
    ids = torch.tensor([PROMPT + [5, 9]])
    with torch.no_grad():
        full = llama(ids).logits[0]
        steps = torch.cat([wrapped(ids[:, i:i + 1], torch.tensor([i]))[0] for i in range(ids.shape[1])])
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_causal_mask_wrapper_matches_the_model(llama):
    wrapped = CausalMaskLM(llama, seq_len=8).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids), llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_sizes_count_the_tied_weight_once(tmp_path):
    """plan, size_report and the file agree within 1% on a tied LLaMA large enough that the file's JSON header
    (~6 KB) and the float norms are under 1% (2 layers, hidden 256, vocab 8192: ~3.2M weights)."""
    float_model = tiny_llama(vocab=8192, hidden=256)
    planned = plan(float_model, ModelConfig(default=ClusterConfig(bits=4)))
    assert [row.tied_to for row in planned.rows if row.name == "lm_head"] == ["model.embed_tokens"]
    model = convert_4bit(float_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    file = tmp_path / "llama.safetensors"
    save_palettized(model, file)
    file_bytes = os.path.getsize(file)
    report = size_report(model)
    assert sum(layer.params == model.lm_head.weight.numel() for layer in report.layers) == 1
    weights_bytes = sum(layer.code_bytes + layer.lut_bytes + layer.scale_bytes for layer in report.layers)
    assert planned.nbytes == weights_bytes
    assert abs(report.total_bytes / file_bytes - 1) < 0.01
    assert abs(planned.nbytes / file_bytes - 1) < 0.01


def test_pte_generates_pytorchs_greedy_tokens(llama, tmp_path):
    pytest.importorskip("executorch.runtime")
    from idkm_plugin.export.llm_export import generate_pte, llm_to_executorch

    path = tmp_path / "llama.pte"
    size = llm_to_executorch(llama, path, max_cache_len=32, progress=False)
    assert size == os.path.getsize(path)
    assert generate_pte(path, PROMPT, 12) == greedy(llama, PROMPT, 12)
    # a random model's greedy tokens repeat: also feed 12 varied tokens and compare every step's logits
    from idkm_plugin.export.executorch_export import load_pte_method

    method = load_pte_method(path)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    steps = torch.cat([method.execute([ids[:, i:i + 1], torch.tensor([i])])[0][0] for i in range(12)])
    with torch.no_grad():
        full = llama(ids).logits[0]
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(steps.argmax(-1), full.argmax(-1))


def test_pte_keeps_the_tied_weight_once(llama):
    """The exported program's constants hold the tied weight's packed codes once, and no dense weight."""
    from idkm_plugin.export.executorch_export import export_program

    program = export_program(StaticCacheLM(llama, max_cache_len=8), (torch.zeros(1, 1, dtype=torch.long),
                                                                     torch.zeros(1, dtype=torch.long)))
    constants = {**program.state_dict, **program.constants}
    codes = [name for name in constants if name.endswith("weight_codes")]
    assert len(codes) == len(palettized_parameters(llama))
    # the rest: the KV cache (not stored in a .pte: mutable state), the cache's position counters and the
    # decode's 16-byte shift constants
    rest = ("cache_", "cumulative_length_", "lifted_tensor_")
    stored = sum(t.numel() * t.element_size() for name, t in constants.items()
                 if not any(r in name for r in rest))
    assert stored == size_report(llama).total_bytes


def test_coreml_has_one_lut_op_per_palettized_weight(llama):
    pytest.importorskip("coremltools")
    from idkm_plugin.export.coreml_export import count_ops
    from idkm_plugin.export.llm_export import llm_to_coreml

    mlmodel = llm_to_coreml(llama, seq_len=8, progress=False)
    assert count_ops(mlmodel, "constexpr_lut_to_dense") == len(palettized_parameters(llama))
    assert count_ops(mlmodel, "gather") == 1  # the embedding, on the LUT op the LM head's linear also reads


def test_coreml_names_an_unsupported_op():
    """A model whose forward needs an op coremltools lacks (transformers' own mask code: torch.diff) fails with
    an error naming the op and the way around it."""
    pytest.importorskip("coremltools")
    from idkm_plugin.export.coreml_export import to_coreml

    class Diff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.diff(self.linear(x), dim=-1)

    model = Diff()
    from idkm_plugin.clusterer import WeightClusterer
    from idkm_plugin.layers import palettize_module

    clusterer = WeightClusterer(ClusterConfig(bits=2), "linear")
    clusterer(model.linear.weight)
    model.linear = palettize_module(model.linear, clusterer.eval())
    with pytest.raises(NotImplementedError, match=r"'diff'.*llm_to_coreml"):
        to_coreml(model.eval(), (torch.randn(2, 8),))
