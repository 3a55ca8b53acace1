"""Deployment benchmark: converted-forward speed (float vs palettized, weight cache on / off), cold
dequantization time, and the sizes of the deployable files of the demo CNN.

One intra-op thread (torch.set_num_threads(1)); every time is the median of --repeats runs after
warm-up. Speed does not depend on the code values, so the Linear layers use random codes and LUTs;
the CNN is ccexam's pretrained MNISTNet palettized with the demo's mixed-precision YAML
(nearest-centroid codes after k-means++ init, no fine-tuning: sizes and speed do not depend on it).

Writes benchmarks/results/deploy.md and deploy.json.

    python benchmarks/deploy.py            # about a minute
    python benchmarks/deploy.py --quick    # fewer repeats, no file exports
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from idkm_plugin.clusterer import WeightClusterer  # noqa: E402
from idkm_plugin.export import save_palettized, size_report  # noqa: E402
from idkm_plugin.atomic import atomic_write_text  # noqa: E402
from idkm_plugin.layers import palettize_module  # noqa: E402
from idkm_plugin.nn import PalettizedLinear, PalettizedModule  # noqa: E402

RESULTS = os.path.join(HERE, "results")
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
    for module in model.modules():
        if isinstance(module, PalettizedModule):
            module.cache_weight = on
            module.clear_weight_cache()


@torch.no_grad()
def forward_times(float_model: nn.Module, palettized: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    set_cache(palettized, True)
    on = median_ms(lambda: palettized(x), repeats)
    set_cache(palettized, False)
    off = median_ms(lambda: palettized(x), repeats)
    set_cache(palettized, True)
    return {"float_ms": median_ms(lambda: float_model(x), repeats), "cache_on_ms": on, "cache_off_ms": off}


def random_linear(n: int, bits: int, dim: int, seed: int = 0) -> PalettizedLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (1, n * n // dim), generator=gen)
    return PalettizedLinear(n, n, codes, torch.randn(1, 1 << bits, dim, generator=gen), bits, torch.zeros(n))


def linear_rows(n: int, batch: int, repeats: int) -> list[dict]:
    x = torch.randn(batch, n)
    dense = nn.Linear(n, n)
    rows = []
    for bits, dim in LINEAR_CASES:
        layer = random_linear(n, bits, dim)
        row = {"model": f"Linear {n}x{n}", "bits": bits, "dim": dim, **forward_times(dense, layer, x, repeats),
               "cold_dequantize_ms": median_ms(layer.dequantize_weight, repeats)}
        rows.append(row)
        print(f"  {bits}/{dim}: {row}", flush=True)
    return rows


def demo_cnn() -> tuple[nn.Module, nn.Module]:
    """(float MNISTNet, its palettization with the demo's YAML config)."""
    from mnist_common import load_pretrained_cnn
    from mnist_qat import DEFAULT_CONFIG, load_model_config

    float_model = load_pretrained_cnn()
    palettized = load_pretrained_cnn()
    config = load_model_config(DEFAULT_CONFIG)
    for name, module in list(palettized.named_modules()):
        cfg = config.resolve(name, module) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
        if cfg is None:
            continue
        clusterer = WeightClusterer(cfg, name).eval()
        clusterer.initialize(module.weight)
        parent, _, attr = name.rpartition(".")
        setattr(palettized.get_submodule(parent), attr, palettize_module(module, clusterer))
    return float_model, palettized.eval()


def disk_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


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
        except ImportError as err:
            print(f"  skipped ExecuTorch: {err}")
        try:
            import coremltools as ct

            from idkm_plugin.export import to_coreml
            for label, precision in (("float32", ct.precision.FLOAT32), ("float16", ct.precision.FLOAT16)):
                path = os.path.join(tmp, f"m_{label}.mlpackage")
                to_coreml(palettized, (x[:1],), path, compute_precision=precision)
                rows.append({"form": f"model.mlpackage (to_coreml, compute_precision={label})",
                             "bytes": disk_bytes(path)})
        except ImportError as err:
            print(f"  skipped Core ML: {err}")
    return rows


def markdown(linear: list[dict], cnn: dict, sizes: list[dict], args) -> str:
    lines = [f"One thread, median of {args.repeats} runs; Linear input [{args.batch}, {args.n}], "
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
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 10
    torch.set_num_threads(1)
    torch.manual_seed(0)

    print("Linear layers:")
    linear = linear_rows(args.n, args.batch, args.repeats)
    print("Demo CNN:")
    float_model, palettized = demo_cnn()
    x = torch.randn(args.cnn_batch, 1, 28, 28)
    cold = sum(median_ms(m.dequantize_weight, args.repeats) for m in palettized.modules()
               if isinstance(m, PalettizedModule))
    cnn = {"model": "MNISTNet (demo YAML)", "bits": "mixed", "dim": "mixed",
           **forward_times(float_model, palettized, x, args.repeats), "cold_dequantize_ms": cold}
    print(f"  {cnn}")
    sizes = [] if args.quick else file_sizes(float_model, palettized, x, args.repeats)
    table = markdown(linear, cnn, sizes, args)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "deploy.md"), table)
    atomic_write_text(os.path.join(args.out, "deploy.json"), json.dumps(
        {"threads": torch.get_num_threads(), "args": vars(args), "linear": linear, "cnn": cnn, "sizes": sizes},
        indent=2))


if __name__ == "__main__":
    main()
