"""examples/llm_qat.py end to end on a tiny random Llama (tied embeddings) in seconds: PTQ rows, QAT from the
PTQ LUTs, converted == eval QAT, the saved file and the reports."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import llm_qat  # noqa: E402


class ByteTokenizer:
    """Bytes as token ids 0..255, 256 = end of sequence: what the example needs of a tokenizer."""

    eos_token_id = 256

    def __call__(self, text, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids):
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


TEXT = [open(llm_qat.__file__).read(), open(os.path.join(os.path.dirname(llm_qat.__file__), "ptq.py")).read()]


def test_example_end_to_end_on_a_tiny_llama(tmp_path):
    out = tmp_path / "run"
    result = llm_qat.main(["--bits", "3", "--steps", "3", "--batch", "2", "--seq-len", "32", "--calib-batches", "2",
                           "--eval-tokens", "256", "--kmeans-iters", "10", "--lr", "1e-3", "--no-progress",
                           "--out", str(out)], model=tiny_llama(), tokenizer=ByteTokenizer(), texts=TEXT,
                          held_out=TEXT[0][:3000])
    whats = [r["what"] for r in result["rows"]]
    assert whats == ["float", "3 bit k-means PTQ", "3 bit sensitivity PTQ", "3 bit QAT idkm_jfb, 3 steps"]
    sensitivity = result["rows"][2]["perplexity"]
    # QAT starts exactly at the sensitivity PTQ result: the same LUTs, the same codes
    assert result["qat_start_perplexity"] == pytest.approx(sensitivity, rel=1e-6)
    assert result["converted_equals_qat_eval"] is True
    assert (out / "model.safetensors").stat().st_size == result["file_bytes"]
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == result["rows"] and "| float |" in (out / "report.md").read_text()
    assert result["sample"].startswith(llm_qat.PROMPT)


def test_bits_per_weight_counts_the_tied_weight_once():
    from idkm_plugin import ModelConfig

    model = tiny_llama()
    mc = ModelConfig.llm(bits=4)
    bpw, nbytes, weights = llm_qat.bits_per_weight(model, mc)
    from idkm_plugin import plan

    plan = plan(model, mc)
    head = next(r for r in plan.rows if r.name == "lm_head")
    assert weights == sum(r.weights for r in plan.rows) - head.weights
    assert nbytes == plan.nbytes - head.nbytes


@pytest.mark.parametrize("name,bits_per_weight", [("llm_4bit_row_scales.yaml", 4.235), ("llm_4bit_block32.yaml", 4.500)])
def test_bits_config_yamls_load_with_the_method_override(name, bits_per_weight):
    from idkm_plugin import ModelConfig

    path = os.path.join(os.path.dirname(llm_qat.__file__), name)
    mc = llm_qat.model_config(llm_qat.parse_args(["--bits-config", path, "--method", "idkm"]), 4)
    assert mc == ModelConfig.from_yaml(path).with_overrides(method="idkm")
    # SmolLM2-135M's shapes: the bits per weight docs/llm.md gives for each layout
    decoder = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    embedding = (49152, 576)
    weights = 30 * sum(o * i for o, i in decoder) + embedding[0] * embedding[1]
    ends = mc.by_type.get("Embedding", mc.default)
    nbytes = 30 * sum(mc.default.palettized_nbytes(s) for s in decoder) + ends.palettized_nbytes(embedding)
    assert 8 * nbytes / weights == pytest.approx(bits_per_weight, abs=5e-4)
