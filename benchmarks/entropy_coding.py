"""Entropy-coded storage benchmark: Huffman encode / decode speed (native op vs the PyTorch path), load time of
an LLM-sized Huffman file, and file bytes of save_palettized(codec="raw") vs codec="huffman".

One intra-op thread; times are the median of --repeats runs (the PyTorch path: one run).

1. Speed: --codes (20M) codes at 2, 3, 4 and 8 bits from 1-D k-means (Lloyd) of Gaussian weights, the
   histogram a clustered layer has; `huffman.encode` / `huffman.decode` in M codes/s, native vs PyTorch,
   plus `huffman.decode_packed` (what load_palettized runs for an unpruned layer).
2. Load: a 4-bit Linear of --big-codes (134,217,728, SmolLM2-135M's count) such codes saved with both codecs;
   load_palettized time of each (the PyTorch path once).
3. Files: a Linear of 10,000,000 weights, 4-bit codes of Gaussian weights on 16 evenly spaced centroids
   (Deep Compression's linear init: a skewed, bell-shaped code histogram), unpruned and with 50% magnitude
   pruning. With --demo FILE (the model.safetensors that examples/mnist_qat.py writes), the demo CNN is
   re-saved with both codecs and reloaded (outputs compared).

    python benchmarks/entropy_coding.py                                  # ~6 minutes, ~5 GB of memory
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

from unittest import mock

from idkm_plugin import native
from idkm_plugin.atomic import atomic_write_text
from idkm_plugin.export import huffman, load_palettized, save_palettized
from idkm_plugin.export.code_layouts import layer_codes
from idkm_plugin.export.safetensors_format import read_safetensors

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def palettized_linear(in_features: int, out_features: int, codes: torch.Tensor, lut: torch.Tensor, bits: int,
                      mask: torch.Tensor | None = None) -> torch.nn.Module:
    """A Linear [out, in] without bias whose weight is lut [2**bits][codes int64 [out * in]], pruned where mask
    bool [out * in] is False (the converted form: a PalettizedTensor weight on nn.Linear)."""
    from idkm_plugin.nn import PaletteSpec, PalettizedTensor

    layer = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
    spec = PaletteSpec(bits, 1, (out_features, in_features))
    layer.weight = torch.nn.Parameter(PalettizedTensor.build(codes.view(1, -1), lut.view(1, -1, 1), spec, mask=mask),
                                      requires_grad=False)
    return layer


def palettized(layer: torch.nn.Module):
    """What holds a palettized layer's packed codes and mask (.codes, .mask, .bits, .num_codes)."""
    return layer if hasattr(layer, "codes") else layer.weight


def stored_layout(path: str) -> str:
    """The codes layout save_palettized chose for the one palettized weight of the file at `path`."""
    metadata = read_safetensors(path)[1]
    key = "idkm_plugin.weights" if "idkm_plugin.weights" in metadata else "idkm_plugin.layers"  # format /3, /2
    (entry,) = json.loads(metadata[key]).values()
    return entry.get("layout", "packed")


def big_layer(out_features: int, in_features: int, bits: int, sparsity: float) -> torch.nn.Module:
    """A Linear [out, in] whose codes are Gaussian weights rounded to 2**bits evenly spaced centroids."""
    torch.manual_seed(0)
    weight = torch.randn(out_features * in_features)
    lut = torch.linspace(-3, 3, 1 << bits)
    codes = torch.bucketize(weight, (lut[1:] + lut[:-1]) / 2)
    mask = weight.abs() > weight.abs().kthvalue(int(sparsity * weight.numel())).values if sparsity else None
    layer = palettized_linear(in_features, out_features, codes, lut, bits, mask)
    return layer


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def kmeans_gaussian_codes(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    """Codes int64 [n] of n Gaussian weights at their nearest of 2**bits 1-D k-means centroids (Lloyd's
    iterations on a 1M sample, from evenly spaced ones): a clustered layer's code histogram."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(n, generator=generator)
    sample = weights[:1_000_000].double()
    centroids = torch.linspace(-2.5, 2.5, 1 << bits, dtype=torch.float64)
    for _ in range(50):
        assign = torch.bucketize(sample, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=1 << bits).double()
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
    return torch.bucketize(weights, ((centroids[1:] + centroids[:-1]) / 2).float())


def _torch_path():
    """Run huffman as if the native ops were not built."""
    return mock.patch.object(native, "has_op", lambda name: False)


def speed_rows(n: int, repeats: int) -> list[str]:
    rows = [f"Speed: {n:,} codes (k-means of Gaussian weights), M codes/s on one thread; native op / PyTorch path.",
            "", "| bits | bits per code (Huffman) | encode native | encode torch | decode native | decode torch "
            "| decode_packed native | decode x torch | encode x torch |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bits in (2, 3, 4, 8):
        codes = kmeans_gaussian_codes(n, bits)
        t_enc, blob = median_time(lambda: huffman.encode(codes, 1 << bits), repeats)
        t_dec, (decoded, _) = median_time(lambda: huffman.decode(blob), repeats)
        t_pack, _ = median_time(lambda: huffman.decode_packed(blob, bits), repeats)
        assert torch.equal(decoded, codes)
        with _torch_path():
            t_enc_torch, blob_torch = median_time(lambda: huffman.encode(codes, 1 << bits), 1)
            t_dec_torch, (decoded, _) = median_time(lambda: huffman.decode(blob), 1)
        assert torch.equal(blob_torch, blob) and torch.equal(decoded, codes)
        del decoded
        m = n / 1e6
        rows.append(f"| {bits} | {8 * blob.numel() / n:.3f} | {m / t_enc:.1f} | {m / t_enc_torch:.1f} | "
                    f"{m / t_dec:.1f} | {m / t_dec_torch:.1f} | {m / t_pack:.1f} | {t_dec_torch / t_dec:.0f} | "
                    f"{t_enc_torch / t_enc:.0f} |")
        print(rows[-1], flush=True)
    return rows


def load_rows(n: int, repeats: int, folder: str) -> list[str]:
    in_features = 8192
    out_features = n // in_features
    codes = kmeans_gaussian_codes(out_features * in_features, 4)
    lut = torch.linspace(-2, 2, 16)
    model = torch.nn.Sequential(palettized_linear(in_features, out_features, codes, lut, 4))
    del codes
    raw_path, path = os.path.join(folder, "big_raw.safetensors"), os.path.join(folder, "big_huffman.safetensors")
    raw = save_palettized(model, raw_path)
    t_save, coded = median_time(lambda: save_palettized(model, path, codec="huffman"), 1)

    def skeleton():
        return torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, device="meta"))

    t_raw, _ = median_time(lambda: load_palettized(raw_path, skeleton()), repeats)
    t_load, loaded = median_time(lambda: load_palettized(path, skeleton()), repeats)
    assert torch.equal(palettized(loaded[0]).codes, palettized(model[0]).codes)
    del loaded
    with _torch_path():
        t_torch, loaded = median_time(lambda: load_palettized(path, skeleton()), 1)
    assert torch.equal(palettized(loaded[0]).codes, palettized(model[0]).codes)
    layout = stored_layout(path)
    return [f"Load: a Linear {out_features}x{in_features} (4 bit, k-means of Gaussian weights), "
            f"{out_features * in_features:,} codes, one thread.", "",
            "| file | layout | bytes | save (s) | load_palettized native (s) | load_palettized torch path (s) |",
            "|---|---|---:|---:|---:|---:|",
            f"| raw | packed | {raw:,} | | {t_raw:.2f} | |",
            f"| huffman | {layout} | {coded:,} | {t_save:.1f} | {t_load:.2f} | {t_torch:.1f} |"]


def layer_rows(repeats: int, folder: str) -> list[str]:
    rows = ["| layer | codes | layout | raw file (B) | huffman file (B) | saving | encode (s) | decode (s) "
            "| save huffman (s) | load huffman (s) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for sparsity in (0.0, 0.5):
        layer = big_layer(4000, 2500, 4, sparsity)
        model = torch.nn.Sequential(layer)
        codes, _ = layer_codes(palettized(layer))
        t_enc, blob = median_time(lambda: huffman.encode(codes, 16), repeats)
        t_dec, (decoded, _) = median_time(lambda: huffman.decode(blob, 0, codes.numel(), 16), repeats)
        assert torch.equal(decoded, codes)
        raw = save_palettized(model, os.path.join(folder, "raw.safetensors"))
        path = os.path.join(folder, "huffman.safetensors")
        t_save, coded = median_time(lambda: save_palettized(model, path, codec="huffman"), repeats)
        t_load, loaded = median_time(
            lambda: load_palettized(path, torch.nn.Sequential(torch.nn.Linear(2500, 4000, bias=False))), repeats)
        mine, theirs = palettized(layer), palettized(loaded[0])
        assert torch.equal(theirs.codes, mine.codes)
        assert (mine.mask is None and theirs.mask is None) or torch.equal(theirs.mask, mine.mask)
        layout = stored_layout(path)
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
    parser.add_argument("--codes", type=int, default=20_000_000, help="codes per speed measurement")
    parser.add_argument("--big-codes", type=int, default=134_217_728, help="codes of the load test (0: skip it)")
    parser.add_argument("--demo", help="a model.safetensors written by examples/mnist_qat.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not native.has_op("huffman_decode"):
        raise SystemExit("the native Huffman ops are not built (make venv, or pip install --no-build-isolation -e .)")
    with tempfile.TemporaryDirectory() as folder:
        lines = [f"One thread, median of {args.repeats} runs (the PyTorch path: one run). Command: "
                 f"`python benchmarks/entropy_coding.py{' '.join([''] + sys.argv[1:])}`", ""]
        lines += speed_rows(args.codes, args.repeats) + [""]
        if args.big_codes:
            lines += load_rows(args.big_codes, args.repeats, folder) + [""]
        lines += ["Files:", ""] + layer_rows(args.repeats, folder)
        if args.demo:
            lines += [""] + demo_rows(args.demo, folder)
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(os.path.join(RESULTS, "entropy_coding.md"), text)


if __name__ == "__main__":
    sys.exit(main())
