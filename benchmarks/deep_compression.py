"""Deep Compression on MNIST, reproduced and compared: pruning, clustering, Huffman coding.

    python benchmarks/deep_compression.py                        # both LeNets, every row (~30 min, 2 cores)
    python benchmarks/deep_compression.py --nets lenet300 --methods idkm --epochs 1   # a quick look
    python benchmarks/deep_compression.py --quick     # a smoke run (MNIST subsets, a few steps), writes nothing

For LeNet-300-100 and LeNet-5 (Caffe layout), trained from scratch and cached (benchmarks/lenet.py):
  float            the baseline (test error on the 10k MNIST test images);
  DC pruned        Deep Compression's per-layer pruning (the paper's kept fractions) + retraining, float weights
                   (size: 32-bit values + relative indices, as the paper counts it);
  DC recipe        Deep Compression itself: prune -> retrain -> k-means with linear init -> centroid
                   fine-tuning -> Huffman (the paper's bits per layer), stored with our huffman codec;
  ours cluster     clustering alone (no pruning), each method;
  ours prune+cl.   `ClusterConfig(sparsity=..., prune_steps=...)`: pruning and clustering in one QAT run,
                   each method (dkm t=3, idkm, idkm_jfb), through torch.ao's prepare_qat / convert.
Compression is the float32 model's bytes (weights and biases) over the bytes of the saved file that rebuilds
the model (`save_palettized(..., codec=...)`: codes, LUTs, masks, biases, metadata; nothing left out).
Writes benchmarks/results/deep_compression_<nets><tag>.{json,md}; --merge gathers them in
deep_compression.md and a plot of error vs compression, deep_compression.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call

from lenet import NETS, QUICK_IMAGES, float_model, train  # benchmarks/lenet.py, beside this script

from idkm_plugin import ClusterConfig, ModelConfig
from idkm_plugin.atomic import atomic_write_text
from idkm_plugin.core.prune import magnitude_mask, num_pruned
from idkm_plugin.export import load_palettized, save_palettized
from idkm_plugin.nn import PaletteSpec, PalettizedTensor
from idkm_plugin.workloads.mnist import evaluate, load_mnist

HERE = os.path.dirname(os.path.abspath(__file__))

# Deep Compression's Table (LeNet rows): per layer (fraction of weights pruned, bits per code)
DC_RECIPE = {
    "lenet300": {"fc1": (0.92, 6), "fc2": (0.91, 6), "fc3": (0.74, 6)},
    "lenet5": {"conv1": (0.34, 8), "conv2": (0.88, 8), "fc1": (0.92, 5), "fc2": (0.81, 5)},
}
DC_PAPER = {"lenet300": (1.64, 1.58, 40), "lenet5": (0.80, 0.74, 39)}  # float error, DC error, compression
DC_INDEX_BITS = {nn.Linear: 5, nn.Conv2d: 8}  # the paper's relative-index widths

# ours: per layer (sparsity, bits) (--ours overrides them)
OURS = {
    "lenet300": {"fc1": (0.95, 3), "fc2": (0.9, 3), "fc3": (0.7, 4)},
    "lenet5": {"conv1": (0.3, 4), "conv2": (0.85, 3), "fc1": (0.97, 3), "fc2": (0.8, 3)},
}
QUICK_EPOCHS, QUICK_TEST = 0.5, 1000  # --quick: 8 steps of batch 128 per run, test images

METHODS = {"dkm": {"method": "dkm", "max_iter": 3}, "idkm": {"method": "idkm"}, "idkm_jfb": {"method": "idkm_jfb"}}


def float_bytes(model: nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def saved_bytes(model: nn.Module, skeleton: nn.Module, codec: str, probe: torch.Tensor) -> int:
    """Bytes of the file `save_palettized(model, codec=codec)` writes; checks that it rebuilds the model exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"model.{codec}.safetensors")
        save_palettized(model, path, codec=codec)
        rebuilt = load_palettized(path, copy.deepcopy(skeleton)).eval()
        with torch.no_grad():
            if not torch.equal(rebuilt(probe), model.eval()(probe)):
                raise AssertionError(f"the {codec} file does not rebuild the model exactly")
        return os.path.getsize(path)


# ---------------------------------------------------------------- Deep Compression's recipe
def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def magnitude_masks(model: nn.Module, pruned: dict[str, float]) -> dict[str, torch.Tensor]:
    """name -> bool mask [weight shape] keeping all but round(s * numel) smallest-|w| weights of each layer."""
    masks = {}
    for name, layer in weighted_layers(model).items():
        w = layer.weight.detach().reshape(1, -1, 1)  # one group of 1-D vectors: the core's magnitude pruning
        masks[name] = magnitude_mask(w, num_pruned(pruned[name], w.shape[1])).view_as(layer.weight)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in weighted_layers(model).items():
            layer.weight.mul_(masks[name])


def sparse_float_bytes(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Deep Compression's count for a pruned float model: 32-bit values + relative indices of the layer's
    index width (a filler entry when a gap exceeds it), biases in float32."""
    total = 0
    for name, layer in weighted_layers(model).items():
        width = DC_INDEX_BITS[type(layer)]
        positions = masks[name].flatten().nonzero().flatten()
        gaps = torch.diff(positions, prepend=positions.new_tensor([-1]))
        entries = int(((gaps + (1 << width) - 1) // (1 << width)).sum())  # fillers included
        total += (entries * (32 + width) + 7) // 8 + 4 * layer.bias.numel()
    return total


def linear_kmeans(w: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D Lloyd k-means of w [n] from Deep Compression's linear init; returns (codes [n] int64, lut [k])."""
    lut = torch.linspace(float(w.min()), float(w.max()), k)
    for _ in range(iters):
        codes = (w[:, None] - lut[None]).abs().argmin(1)
        sums = torch.zeros(k).index_add_(0, codes, w)
        counts = torch.zeros(k).index_add_(0, codes, torch.ones_like(w))
        lut = torch.where(counts > 0, sums / counts.clamp(min=1), lut)
    return (w[:, None] - lut[None]).abs().argmin(1), lut


class SharedWeights(nn.Module):
    """`model` with every weighted layer's weight = lut[codes] * mask; only the LUTs train (DC's centroid
    fine-tuning: each centroid's gradient is the sum of its weights' gradients)."""

    def __init__(self, model: nn.Module, codes: dict, luts: dict, masks: dict) -> None:
        super().__init__()
        self.model, self.codes, self.masks = model, codes, masks
        self.luts = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(l.clone()) for n, l in luts.items()})

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in weighted_layers(self.model).items():
            lut = self.luts[name.replace(".", "_")]
            out[f"{name}.weight"] = lut[self.codes[name]].view_as(layer.weight) * self.masks[name]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.weights(), (x,))


def palettized_from_codes(model: nn.Module, codes: dict, luts: dict, masks: dict, bits: dict) -> nn.Module:
    """A copy of `model` whose weighted layers' weights are palettized: codes [numel] (row-major, one per weight),
    LUT [k] (one per layer, d = 1), mask [weight shape] (pruned weights decode to 0)."""
    out = copy.deepcopy(model)
    for name, layer in weighted_layers(out).items():
        spec = PaletteSpec(bits[name], 1, tuple(layer.weight.shape))
        weight = PalettizedTensor.build(codes[name], luts[name].detach().view(1, -1, 1), spec,
                                        mask=masks[name].flatten())
        layer.weight = nn.Parameter(weight, requires_grad=False)
    return out.eval()


def deep_compression_recipe(name: str, base: nn.Module, data: dict, epochs: float, seed: int) -> tuple[nn.Module, nn.Module, dict]:
    """Deep Compression: prune -> retrain -> linear-init k-means -> centroid fine-tuning.

    Returns (pruned float model, palettized model, masks)."""
    recipe = DC_RECIPE[name]
    pruned = copy.deepcopy(base)
    masks = magnitude_masks(pruned, {n: s for n, (s, _) in recipe.items()})
    apply_masks(pruned, masks)
    train(pruned, *data["train"], epochs=epochs, lr=1e-3, seed=seed, after_step=lambda m: apply_masks(m, masks),
          desc=f"{name} DC retrain")
    codes, luts, bits = {}, {}, {}
    for lname, layer in weighted_layers(pruned).items():
        bits[lname] = recipe[lname][1]
        w = layer.weight.detach().flatten()
        keep = masks[lname].flatten()
        c, lut = linear_kmeans(w[keep], 1 << bits[lname])
        codes[lname] = torch.zeros(w.numel(), dtype=torch.long).masked_scatter_(keep, c)
        luts[lname] = lut
    shared = SharedWeights(copy.deepcopy(pruned), codes, luts, masks)
    train(shared, *data["train"], epochs=epochs, lr=1e-4, seed=seed, params=shared.luts.parameters(),
          desc=f"{name} DC centroids")
    tuned = {n: shared.luts[n.replace(".", "_")].detach() for n in codes}
    return pruned.eval(), palettized_from_codes(pruned, codes, tuned, masks, bits), masks


# ---------------------------------------------------------------- ours
def ours(name: str, base: nn.Module, method: str, prune: bool, data: dict, epochs: float, seed: int,
         lr: float = 3e-4) -> nn.Module:
    """Pruning (if `prune`) and clustering in one torch.ao QAT run; returns the converted model."""
    from torch.ao.quantization import convert, prepare_qat

    from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping

    steps = int(epochs * len(data["train"][1]) // 128)
    by_name = {}
    for lname, (sparsity, bits) in OURS[name].items():
        # prune gradually over the first 30% of the steps, retrain the float survivors until half-way, then
        # cluster them (Deep Compression's order, in one QAT run)
        extra = {"sparsity": sparsity, "prune_start": 0, "prune_steps": int(0.3 * steps), "start_step": steps // 2} \
            if prune else {}
        by_name[lname] = ClusterConfig(bits=bits, seed=seed, **METHODS[method], **extra)
    mp = ModelConfig(default=None, by_name=by_name, strict=True)
    qat = prepare_qat(assign_qconfigs(copy.deepcopy(base), mp).train())
    train(qat, *data["train"], epochs=epochs, lr=lr, seed=seed, desc=f"{name} {method}{' prune' if prune else ''}")
    deployed = convert(copy.deepcopy(qat).eval(), mapping=palettize_mapping())
    probe = data["test"][0][:512]
    with torch.no_grad():
        if not torch.equal(deployed(probe), qat.eval()(probe)):
            raise AssertionError("converted model != eval-mode QAT model")
    return deployed


def row(net: str, label: str, model: nn.Module, data: dict, size: int, base_bytes: int, **extra) -> dict:
    err = 100 - evaluate(model, *data["test"])
    r = {"net": net, "row": label, "error": err, "bytes": size, "compression": base_bytes / size, **extra}
    print(f"{net:9s} {label:34s} error {err:5.2f}%  {size / 1024:8.1f} KB  {r['compression']:6.1f}x", flush=True)
    return r


def parse_layers(text: str) -> dict[str, tuple[float, int]]:
    """"fc1=0.95:3,fc2=0.9:3" -> {"fc1": (0.95, 3), "fc2": (0.9, 3)}."""
    out = {}
    for item in text.split(","):
        lname, _, spec = item.partition("=")
        sparsity, _, bits = spec.partition(":")
        out[lname.strip()] = (float(sparsity), int(bits))
    return out


def run_net(name: str, args, data: dict) -> list[dict]:
    base = float_model(name, args.seed, quick=args.quick)
    fbytes = float_bytes(base)
    probe = data["test"][0][:256]
    rows = [row(name, "float", base, data, fbytes, fbytes)]
    if "dc" in args.rows:
        pruned, dc, masks = deep_compression_recipe(name, base, data, args.epochs, args.seed)
        rows.append(row(name, "DC pruned (float, paper's count)", pruned, data, sparse_float_bytes(pruned, masks), fbytes))
        rows.append(row(name, "DC recipe + raw file", dc, data, saved_bytes(dc, NETS[name](), "raw", probe), fbytes))
        rows.append(row(name, "DC recipe + Huffman", dc, data, saved_bytes(dc, NETS[name](), "huffman", probe), fbytes))
    for method in args.methods:
        for prune in ([False] if "cluster" in args.rows else []) + ([True] if "prune" in args.rows else []):
            start = time.perf_counter()
            deployed = ours(name, base, method, prune, data, args.epochs, args.seed, args.lr)
            seconds = time.perf_counter() - start
            what = f"{method} {'prune+cluster' if prune else 'cluster'}"
            for codec in ("raw", "huffman"):
                rows.append(row(name, f"{what} + {codec}", deployed, data,
                                saved_bytes(deployed, NETS[name](), codec, probe), fbytes, seconds=seconds))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| network | row | test error | file bytes | compression |", "|---|---|---:|---:|---:|"]
    for net, (f_err, dc_err, dc_ratio) in DC_PAPER.items():
        if any(r["net"] == net for r in rows):
            lines.append(f"| {net} | Deep Compression paper (float {f_err}%) | {dc_err:.2f}% | | {dc_ratio}x |")
        lines += [f"| {r['net']} | {r['row']} | {r['error']:.2f}% | {r['bytes']:,} | {r['compression']:.1f}x |"
                  for r in rows if r["net"] == net]
    return "\n".join(lines)


def _series(label: str) -> str:
    """A merged row's plot series: its label without the layer list ("idkm prune+cluster (12 ep, lr 0.001)")."""
    parts = label.split(" (")
    return parts[0] + (f" ({parts[1].split(';')[0]})" if len(parts) > 1 and not label.startswith("DC") else "")


def plot(rows: list[dict], path: str) -> None:
    """Test error vs compression (log scale), one panel per network; lines at float, float + 0.1, + 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({r["net"] for r in rows})
    fig, axes = plt.subplots(1, len(nets), figsize=(7 * len(nets), 5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        float_err = next(r["error"] for r in rows if r["net"] == net and r["row"] == "float")
        for delta, style in ((0, "-"), (0.1, "--"), (0.5, ":")):
            ax.axhline(float_err + delta, color="grey", lw=0.8, ls=style)
        groups: dict[str, list] = {}
        for r in rows:
            if r["net"] == net and r["row"] != "float":
                groups.setdefault(_series(r["row"]), []).append(r)
        for key, group in groups.items():
            marker = "*" if key.startswith("DC") else ("s" if "huffman" in key else "o")
            ax.scatter([r["compression"] for r in group], [r["error"] for r in group], marker=marker, s=50,
                       label=key)
        _, paper_err, paper_ratio = DC_PAPER[net]
        ax.scatter([paper_ratio], [paper_err], marker="*", s=120, color="black", label="Deep Compression paper")
        ax.set_xscale("log")
        ax.set(title=f"{net} (lines: float, +0.1, +0.5 points)", xlabel="compression (float32 bytes / file bytes)",
               ylabel="test error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", choices=sorted(NETS), default=sorted(NETS))
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["dkm", "idkm", "idkm_jfb"])
    p.add_argument("--rows", nargs="+", choices=["dc", "cluster", "prune"], default=["dc", "cluster", "prune"])
    p.add_argument("--epochs", type=float, default=4, help="epochs of each retraining / QAT run")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of our QAT runs (cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads than free cores stall)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--ours", nargs="*", metavar="NET:LAYER=SPARSITY:BITS,...",
                   help="override our per-layer (sparsity, bits), e.g. lenet300:fc1=0.95:3,fc2=0.9:3,fc3=0.7:4")
    p.add_argument("--merge", action="store_true",
                   help="only merge the deep_compression_*.json under --out into deep_compression.md / .png")
    p.add_argument("--tag", default="", help="suffix of the output files' names")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: float nets from one epoch of {QUICK_IMAGES} images, --epochs {QUICK_EPOCHS:g} "
                        f"on them, {QUICK_TEST} test images; writes nothing")
    return p.parse_args(argv)


def merge(out: str) -> list[dict]:
    """Every deep_compression_*.json under `out` -> one table (deep_compression.md) and plot (.png)."""
    import glob

    rows, seen = [], set()
    for path in sorted(glob.glob(os.path.join(out, "deep_compression_*.json"))):
        with open(path) as f:
            run = json.load(f)
        setting = f"{run['meta']['epochs']:g} ep, lr {run['meta'].get('lr', 3e-4):g}"
        for r in run["rows"]:
            if r["row"] == "float":
                if r["net"] in seen:
                    continue
                seen.add(r["net"])
            ours_cfg = run["meta"]["ours"][r["net"]]
            pruned = "prune" in r["row"]
            layers = ", ".join(f"{k} {s:g}/{b}" if pruned else f"{k} {b}" for k, (s, b) in ours_cfg.items())
            label = r["row"] if r["row"] == "float" or r["row"].startswith("DC") else \
                f"{r['row']} ({setting}; {'sparsity/bits' if pruned else 'bits'}: {layers})"
            rows.append({**r, "row": label})
    rows.sort(key=lambda r: (r["net"], r["row"] != "float", not r["row"].startswith("DC"), -r["compression"]))
    atomic_write_text(os.path.join(out, "deep_compression.md"), markdown(rows) + "\n")
    plot(rows, os.path.join(out, "deep_compression.png"))
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.out)
    for item in args.ours or []:
        net, _, layers = item.partition(":")
        OURS[net] = parse_layers(layers)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notice
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs = QUICK_EPOCHS
    data = {"train": load_mnist("train", QUICK_IMAGES if args.quick else None),
            "test": load_mnist("test", QUICK_TEST if args.quick else None)}
    rows = [r for net in args.nets for r in run_net(net, args, data)]
    if args.quick:
        print(markdown(rows))
        return rows
    os.makedirs(args.out, exist_ok=True)
    meta = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "ours": OURS, "dc_recipe": DC_RECIPE}
    stem = os.path.join(args.out, f"deep_compression_{'_'.join(args.nets)}{args.tag}")
    atomic_write_text(stem + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    atomic_write_text(stem + ".md", markdown(rows) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
