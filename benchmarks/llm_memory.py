"""Memory held for backward of a 4-bit QAT step on a Llama-3.2-1B-shaped decoder (issue 25, item 7).

A random-weight LlamaForCausalLM from a transformers config with Llama-3.2-1B's shapes (hidden 2048, MLP 8192,
32 heads / 8 KV heads, vocab 128,256, tied embedding and head, bfloat16), cut to --layers decoder layers (all 16
would need ~2.5 GB of weights plus their gradients on this 24 GiB machine beside other jobs; every decoder layer has
the same shapes, so held bytes per layer are measured once and scaled to 16). Measured exactly with saved_tensors_hooks
(`SavedTensorBytes`: bytes of the unique storages autograd keeps between forward and backward) for one step
(forward + loss) at batch 1 x --tokens:
  - the float model;
  - QAT through the torchao flow, every Linear and the tied embedding clustered (idkm_jfb, 4 bits, one LUT per
    tensor), so the clustering's share = QAT - float;
and projects the largest decoder of this family whose QAT step fits in 16 GiB (weights + gradients + Adam state in
float32 + held for backward), beside coremltools' DKMPalettizer (t = 3), whose held bytes per weight come from
benchmarks/transformer_memory.py's measured layer (151.8x the float32 weight).

    python benchmarks/llm_memory.py                 # writes benchmarks/results/llm_memory.md
    python benchmarks/llm_memory.py --layers 1 --tokens 16 --quick   # a smoke run, no file
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from idkm_plugin import ClusterConfig, ModelConfig
from idkm_plugin.profiling import SavedTensorBytes

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
COREML_DKM_HELD_PER_FLOAT32_BYTE = 151.8  # benchmarks/results/transformer_memory.md, coremltools 9.0, t = 3


def llama_1b_config(layers: int, vocab: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=2048, tie_word_embeddings=True,
                                    attn_implementation="eager")


def build(layers: int, vocab: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(llama_1b_config(layers, vocab)).to(torch.bfloat16)
    return model.train()


def held(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, float]:
    """(bytes held for backward by one forward + loss, seconds of forward + backward)."""
    start = time.perf_counter()
    with SavedTensorBytes() as saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return saved.bytes, time.perf_counter() - start


def prepare(model: torch.nn.Module, config: ClusterConfig) -> torch.nn.Module:
    from idkm_plugin.integrations.torchao import fqn_to_config  # imports torchao quietly
    from torchao.quantization import quantize_

    quantize_(model, fqn_to_config(ModelConfig(default=config), model), filter_fn=None)
    return model


def measure(layers: int, vocab: int, tokens: int, config: ClusterConfig) -> dict:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    model = build(layers, vocab)
    weights = sum(p.numel() for p in model.parameters())
    float_held, float_s = held(model, ids)
    model.zero_grad(set_to_none=True)
    prepare(model, config)
    held(model, ids)  # the first clustered step initialises the LUTs
    model.zero_grad(set_to_none=True)
    qat_held, qat_s = held(model, ids)
    return {"layers": layers, "weights": weights, "float_held": float_held, "qat_held": qat_held,
            "float_s": float_s, "qat_s": qat_s}


def fits_16gib(held_per_weight: float, bytes_per_weight: float = 4 + 4 + 8) -> float:
    """Weights of the largest model whose step fits: float32 weights, gradients and Adam state + held for backward."""
    return 16 * GIB / (bytes_per_weight + held_per_weight)


def report(a: dict, b: dict, tokens: int, vocab: int) -> str:
    per_layer_weights = (b["weights"] - a["weights"]) / (b["layers"] - a["layers"])
    per_layer_clustering = ((b["qat_held"] - b["float_held"]) - (a["qat_held"] - a["float_held"])) / (
        b["layers"] - a["layers"])
    base_clustering = (a["qat_held"] - a["float_held"]) - a["layers"] * per_layer_clustering
    full_weights = b["weights"] + (16 - b["layers"]) * per_layer_weights
    full_clustering = base_clustering + 16 * per_layer_clustering
    ours = full_clustering / full_weights
    coreml = COREML_DKM_HELD_PER_FLOAT32_BYTE * 4
    rows = [f"| {r['layers']} | {r['weights']:,} | {r['float_held'] / GIB:.2f} GiB | {r['qat_held'] / GIB:.2f} GiB | "
            f"{(r['qat_held'] - r['float_held']) / GIB:.2f} GiB | {(r['qat_held'] - r['float_held']) / (2 * r['weights']):.2f}x | "
            f"{r['float_s']:.1f} | {r['qat_s']:.1f} |" for r in (a, b)]
    return "\n".join([
        f"Measured by `python benchmarks/llm_memory.py` (CPU, batch 1 x {tokens} tokens, bfloat16, vocab {vocab:,}, "
        "idkm_jfb 4 bits per tensor, the tied embedding clustered once; held = bytes autograd keeps for backward).",
        "",
        "| decoder layers | weights | held, float step | held, QAT step | held by the clustering | / bf16 weights | "
        "float step (s) | QAT step (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Llama-3.2-1B shape (16 layers, {full_weights / 1e9:.2f}B weights), projected from the per-layer difference: "
        f"the clustering holds {full_clustering / GIB:.2f} GiB ({ours:.2f} B per weight) for backward; coremltools' "
        f"DKMPalettizer (t = 3) would hold {coreml * full_weights / GIB:.0f} GiB ({coreml:.0f} B per weight).",
        "",
        "Largest model whose 4-bit QAT step fits in 16 GiB (float32 weights + gradients + Adam state, 16 B per weight, "
        f"+ held for backward): ours ~{fits_16gib(ours) / 1e9:.2f}B weights, coremltools DKM ~"
        f"{fits_16gib(coreml) / 1e9:.3f}B.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the larger measured model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--quick", action="store_true", help="print, write no file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ClusterConfig(method="idkm_jfb", bits=4)
    a = measure(args.layers - 1, args.vocab, args.tokens, config)
    b = measure(args.layers, args.vocab, args.tokens, config)
    text = report(a, b, args.tokens, args.vocab)
    print(text)
    if not args.quick:
        with open(os.path.join(HERE, "results", "llm_memory.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
