"""Bytes held for backward by the clustering of SmolLM2-135M layers, per QAT method (4 bits, one LUT per tensor).

Which methods can train the whole model here: the held bytes per weight of one layer's clustering, measured
exactly with saved_tensors_hooks (`SavedTensorBytes`) on a warm step (the weight changed since the last call, as
after an optimizer step), then scaled to the model's weights. dkm t = 3 keeps every unrolled iteration's
attention; idkm and idkm_jfb keep the weight-sized inputs of their implicit backward.

    HF_HUB_OFFLINE=1 python benchmarks/llm_method_memory.py     # prints a markdown table
"""
from __future__ import annotations

import argparse
import os

import torch

from idkm_plugin import ClusterConfig
from idkm_plugin.clusterer import WeightClusterer
from idkm_plugin.profiling import SavedTensorBytes

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
METHODS = {"dkm t=3": dict(method="dkm", max_iter=3, uniquify="off"), "idkm": dict(method="idkm"),
           "idkm_jfb": dict(method="idkm_jfb")}


def held_bytes(weight: torch.Tensor, config: ClusterConfig) -> int:
    """Bytes autograd keeps between the clustering's forward and backward on a warm step."""
    clusterer = WeightClusterer(config)
    w = torch.nn.Parameter(weight.clone())
    clusterer(w)  # initialises the LUT; the next call is a warm step
    with torch.no_grad():
        w.mul_(1.0001)  # a new weight version, as after an optimizer step
    with SavedTensorBytes() as saved:
        clusterer(w)
    return saved.bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.path.join(HERE, "..", "outputs", "llm", "smollm2"))
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--layers", default="model.layers.3.mlp.down_proj,model.layers.3.self_attn.q_proj")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    total = sum(t.numel() for t in model.parameters())
    print(f"SmolLM2-135M: {total:,} weights (the tied embedding once); 4 bits, one LUT per tensor, float32\n")
    print("| layer | method | held for backward | bytes per weight | x the float32 weight | scaled to the model |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.layers.split(","):
        weight = model.get_submodule(name).weight.detach()
        for method, fields in METHODS.items():
            held = held_bytes(weight, ClusterConfig(bits=4, **fields))
            per_weight = held / weight.numel()
            print(f"| {name.removeprefix('model.')} {tuple(weight.shape)} | {method} | {held / 2**20:,.1f} MiB | "
                  f"{per_weight:.1f} | {per_weight / 4:.1f}x | {per_weight * total / GIB:,.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
