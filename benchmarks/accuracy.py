"""Method comparison on real data: the pretrained MNIST CNN compressed at several bits/dim.

    python benchmarks/accuracy.py                                  # everything (long on 2 CPU cores)
    python benchmarks/accuracy.py --steps 50 --configs 1/1,4/4 --methods ptq,idkm_t30
    python benchmarks/accuracy.py --configs 8/8 --methods dkm_t3 --merge   # replace those rows, keep the rest

For every configuration bits/dim (applied to the two big layers, features.3 and classifier.0;
the two small layers, 1,568 weights in all, stay at 8 bits in every method) and every method:
  float      the pretrained model;
  ptq        post-training k-means (Deep Compression: linear init + Lloyd), no fine-tuning;
  uniform    weight-only QAT with torch.ao's FakeQuantize, per-channel affine, round(bits/dim) bits;
  dkm_t3, dkm_t30, idkm_t30, idkm_jfb_t30   clustering QAT through idkm_qconfig / prepare_qat / convert;
all trained with the same budget (--steps of Adam, batch, lr, seed). Reported: test accuracy on the
10k MNIST test images, model size, bits per weight, median time per training step and the memory
held for backward in one training step (bytes of unique storages seen by
torch.autograd.graph.saved_tensors_hooks). Writes results/accuracy.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings

import torch
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, ptq
from idkm_plugin.export import size_report
from idkm_plugin.profiling import SavedTensorBytes
from idkm_plugin.workloads.mnist import evaluate, finetune, load_mnist, load_pretrained_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_CONFIGS = "1/1,2/1,4/4,8/8,4/1"
ALL_METHODS = "float,ptq,uniform,dkm_t3,dkm_t30,idkm_t30,idkm_jfb_t30"
BIG_LAYERS = ("features.3", "classifier.0")
SMALL_BITS = 8
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def model_config(bits: int, dim: int, method: str = "idkm", max_iter: int = 30) -> ModelConfig:
    big = ClusterConfig(method=method, bits=bits, dim=dim, max_iter=max_iter, tol=1e-3, chunk_size=0)
    return ModelConfig(default=big, small_layer_params=4096,
                       small_layer=big.replace(bits=SMALL_BITS, dim=1))


def held_for_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one training step."""
    with SavedTensorBytes() as saved:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes


def uniform_qat(model: nn.Module, bits: int):
    """torch.ao weight-only uniform QAT: per-channel affine FakeQuantize at `bits` (8 for the small layers)."""
    from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver, QConfig, prepare_qat
    from torch.ao.quantization.observer import PlaceholderObserver

    def qconfig(b: int) -> QConfig:
        weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=0,
                                        quant_max=(1 << b) - 1, dtype=torch.quint8,
                                        qscheme=torch.per_channel_affine, ch_axis=0)
        return QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float32), weight=weight)

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.qconfig = qconfig(bits if module.weight.numel() >= 4096 else SMALL_BITS)
    return prepare_qat(model.train())


def uniform_size(model: nn.Module, bits: int) -> tuple[int, int]:
    """(stored bytes, float32 bytes): codes + per-channel scale and zero point (float32 + int32)."""
    total = f32 = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            b = bits if module.weight.numel() >= 4096 else SMALL_BITS
            total += math.ceil(module.weight.numel() * b / 8) + 8 * module.weight.shape[0]
            bias = 0 if module.bias is None else module.bias.numel()
            total += 4 * bias
            f32 += 4 * (module.weight.numel() + bias)
    return total, f32


def run_one(method: str, bits: int, dim: int, data, args) -> dict:
    from torch.ao.quantization import convert, disable_observer, prepare_qat

    from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping

    x_train, y_train, x_test, y_test = data
    device = torch.device(args.device)
    model = load_pretrained_cnn().to(device)
    row = {"config": f"{bits}/{dim}", "method": method, "bits": bits, "dim": dim, "step_ms": None,
           "held_MiB": None, "steps": 0}
    if method in ("float", "ptq"):
        final = model if method == "float" else ptq.palettize(model, model_config(bits, dim))
        rep = size_report(final)
        size, f32 = rep.total_bytes, rep.float32_bytes
    else:
        torch.manual_seed(args.seed)
        if method == "uniform":
            qbits = max(1, round(bits / dim))
            row["uniform_bits"] = qbits
            qat = uniform_qat(model, qbits)
        else:
            kind, t = method.rsplit("_t", 1)
            assign_qconfigs(model, model_config(bits, dim, kind, int(t)))
            qat = prepare_qat(model.train())
        probe = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(y_train), generator=probe)[:args.batch_size]
        qat.train()
        row["held_MiB"] = held_for_backward(qat, x_train[idx].to(device), y_train[idx].to(device)) / 2**20
        train = finetune(qat, x_train, y_train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, progress=not args.no_progress, desc=f"{method} {bits}/{dim}")
        row.update(step_ms=train.step_seconds * 1e3, steps=args.steps, train_seconds=train.seconds)
        if method == "uniform":
            qat.apply(disable_observer)
            final = qat.eval()
            size, f32 = uniform_size(model, qbits)
        else:
            final = convert(qat.eval(), mapping=palettize_mapping())
            rep = size_report(final)
            size, f32 = rep.total_bytes, rep.float32_bytes
    row["test_acc"] = evaluate(final, x_test, y_test)
    row.update(size_kb=size / 1024, compression=f32 / size, bits_per_weight=8 * size / (f32 / 4))
    return row


def write_outputs(rows: list[dict], args, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    meta = {"batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "device": args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
                                     f" ({torch.get_num_threads()} threads)"),
            "test_images": args.test_subset or 10000}
    with open(os.path.join(out, "accuracy.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"Pretrained ccexam MNISTNet, {meta['test_images']:,} MNIST test images; trained methods: "
             f"the steps column's Adam steps of batch {args.batch_size} (lr {args.lr}, seed {args.seed}) on "
             f"{meta['device']}. bits/dim applies to features.3 and classifier.0 (99.6% of the weights); "
             f"the two small layers are at 8 bits in every method. Uniform QAT uses round(bits/dim) bits per "
             "channel. Memory: bytes held for backward in one training step (whole model).\n",
             "| bits/dim | method | test acc (%) | size (KB) | compression | bits/weight | steps | step (ms) | "
             "held for backward (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = "" if r["step_ms"] is None else f"{r['step_ms']:.0f}"
        held = "" if r["held_MiB"] is None else f"{r['held_MiB']:.1f}"
        lines.append(f"| {r['config']} | {r['method']} | {r['test_acc']:.2f} | {r['size_kb']:.1f} | "
                     f"{r['compression']:.1f}x | {r['bits_per_weight']:.3f} | {r['steps'] or ''} | {step} | {held} |")
    with open(os.path.join(out, "accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(out, "accuracy.png"), meta)


def plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    floats = [r for r in rows if r["method"] == "float"]
    if floats:
        ax.axhline(floats[0]["test_acc"], color="gray", ls="--", lw=1,
                   label=f"float32 ({floats[0]['size_kb']:.0f} KB)")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "float"]
    for i, method in enumerate(methods):
        pts = sorted((r["size_kb"], r["test_acc"], r["config"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD<>"[i % 7], label=method)
        for s, a, c in pts:
            ax.annotate(c, (s, a), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model size (KB, log scale)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_ylim(max(0.0, min([r["test_acc"] for r in rows] + [90]) - 1), 100)
    steps = "/".join(str(s) for s in sorted({r["steps"] for r in rows if r["steps"]}))
    ax.set_title(f"Accuracy vs size, {steps} fine-tuning steps, {meta['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=ALL_CONFIGS, help="bits/dim list; default: %(default)s")
    p.add_argument("--methods", default=ALL_METHODS, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per trained method")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--out", default=RESULTS, help="output folder; default: %(default)s")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing OUT/accuracy.json, replacing those (config, method) rerun")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*adjoint solve did not converge.*")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS.split(",")))
    if unknown:
        raise SystemExit(f"--methods {unknown} not known; use some of {ALL_METHODS}")
    configs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",") if c.strip()]
    data = (*load_mnist("train", args.train_subset), *load_mnist("test", args.test_subset))
    kept = previous_rows(args.out) if args.merge else []
    rows: list[dict] = []
    if "float" in methods:
        rows.append(run_one("float", 32, 1, data, args))
        rows[-1]["config"] = "32/1"
    for bits, dim in configs:
        for method in methods:
            if method == "float":
                continue
            t0 = time.perf_counter()
            row = run_one(method, bits, dim, data, args)
            rows.append(row)
            print(f"{bits}/{dim} {method:13s} acc {row['test_acc']:.2f}%  {row['size_kb']:.1f} KB  "
                  f"{row['bits_per_weight']:.3f} b/w  step {row['step_ms'] or 0:.0f} ms  "
                  f"held {row['held_MiB'] or 0:.1f} MiB  ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_outputs(merged(kept, rows), args, args.out)  # partial results survive an interrupted run
    write_outputs(merged(kept, rows), args, args.out)
    return rows


def previous_rows(out: str) -> list[dict]:
    path = os.path.join(out, "accuracy.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def merged(kept: list[dict], new: list[dict]) -> list[dict]:
    """kept rows in their order with same-(config, method) rows replaced by new ones; other new rows appended."""
    fresh = {(r["config"], r["method"]): r for r in new}
    out = [fresh.pop((r["config"], r["method"]), r) for r in kept]
    return out + [r for r in new if (r["config"], r["method"]) in fresh]


if __name__ == "__main__":
    main()
