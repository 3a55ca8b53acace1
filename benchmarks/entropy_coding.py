"""Entropy-coded storage benchmark: Huffman encode / decode time of a 10M-code layer, and file bytes of
save_palettized(codec="raw") vs codec="huffman".

One intra-op thread; times are the median of --repeats runs. The big layer is a Linear of 10,000,000
weights, 4-bit codes (d = 1) of Gaussian weights on 16 evenly spaced centroids (Deep Compression's
linear init: a skewed, bell-shaped code histogram), unpruned and with 50% magnitude pruning.
With --demo FILE (the model.safetensors that examples/mnist_qat.py writes), the demo CNN is re-saved
with both codecs and reloaded (outputs compared).

    python benchmarks/entropy_coding.py                                  # ~1 minute
    python benchmarks/entropy_coding.py --demo outputs/demo/model.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from idkm_plugin.atomic import atomic_write_text
from idkm_plugin.export import huffman, load_palettized, save_palettized
from idkm_plugin.export.code_layouts import layer_codes
from idkm_plugin.export.safetensors_format import read_safetensors
from idkm_plugin.nn import PalettizedLinear

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def big_layer(out_features: int, in_features: int, bits: int, sparsity: float) -> PalettizedLinear:
    """A Linear [out, in] whose codes are Gaussian weights rounded to 2**bits evenly spaced centroids."""
    torch.manual_seed(0)
    weight = torch.randn(out_features * in_features)
    lut = torch.linspace(-3, 3, 1 << bits)
    codes = torch.bucketize(weight, (lut[1:] + lut[:-1]) / 2)
    layer = PalettizedLinear(in_features, out_features, codes.view(1, -1), lut.view(1, -1, 1), bits)
    if sparsity:
        layer.set_mask(weight.abs() > weight.abs().kthvalue(int(sparsity * weight.numel())).values)
    return layer


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def layer_rows(repeats: int, folder: str) -> list[str]:
    rows = ["| layer | codes | layout | raw file (B) | huffman file (B) | saving | encode (s) | decode (s) "
            "| save huffman (s) | load huffman (s) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for sparsity in (0.0, 0.5):
        layer = big_layer(4000, 2500, 4, sparsity)
        model = torch.nn.Sequential(layer)
        codes, _ = layer_codes(layer)
        t_enc, blob = median_time(lambda: huffman.encode(codes, 16), repeats)
        t_dec, (decoded, _) = median_time(lambda: huffman.decode(blob, 0, codes.numel(), 16), repeats)
        assert torch.equal(decoded, codes)
        raw = save_palettized(model, os.path.join(folder, "raw.safetensors"))
        path = os.path.join(folder, "huffman.safetensors")
        t_save, coded = median_time(lambda: save_palettized(model, path, codec="huffman"), repeats)
        t_load, loaded = median_time(lambda: load_palettized(path, torch.nn.Sequential(torch.nn.Linear(2500, 4000))),
                                     repeats)
        assert torch.equal(loaded[0].codes, layer.codes)
        assert (layer.mask is None and loaded[0].mask is None) or torch.equal(loaded[0].mask, layer.mask)
        layout = json.loads(read_safetensors(path)[1]["idkm_plugin.layers"])["0"].get("layout", "packed")
        rows.append(f"| Linear 4000x2500, 4 bit, sparsity {sparsity:.0%} | {codes.numel():,} | {layout} | {raw:,} | "
                    f"{coded:,} | {1 - coded / raw:.1%} | {t_enc:.2f} | {t_dec:.2f} | {t_save:.2f} | {t_load:.2f} |")
        print(rows[-1], flush=True)
    return rows


def demo_rows(demo: str, folder: str) -> list[str]:
    from ccexam.models import MNISTNet

    model = load_palettized(demo, MNISTNet(28)).eval()
    raw = save_palettized(model, os.path.join(folder, "demo_raw.safetensors"))
    coded = save_palettized(model, os.path.join(folder, "demo_huffman.safetensors"), codec="huffman")
    loaded = load_palettized(os.path.join(folder, "demo_huffman.safetensors"), MNISTNet(28)).eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        equal = torch.equal(loaded(x), model(x))
    return ["| demo CNN | raw file (B) | huffman file (B) | saving | reloaded outputs equal |",
            "|---|---:|---:|---:|---|",
            f"| {os.path.basename(demo)} | {raw:,} | {coded:,} | {1 - coded / raw:.1%} | {equal} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", help="a model.safetensors written by examples/mnist_qat.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        lines = [f"One thread, median of {args.repeats} runs.", ""] + layer_rows(args.repeats, folder)
        if args.demo:
            lines += [""] + demo_rows(args.demo, folder)
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(os.path.join(RESULTS, "entropy_coding.md"), text)


if __name__ == "__main__":
    sys.exit(main())
