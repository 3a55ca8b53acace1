"""Memory held for backward and forward+backward time of dkm / idkm / idkm_jfb.

Memory is measured exactly with saved_tensors_hooks (bytes of the unique storages autograd keeps,
see idkm_plugin.profiling). Where a configuration would hold more than --measure-limit bytes it is
not run: held bytes are affine in m (the number of vectors) and in t (for dkm), which the script
checks on the sizes it measures, so those cells are extrapolated from two measured sizes and
marked with "*".

Writes benchmarks/results/memory.md and memory.png.

    python benchmarks/memory.py            # full tables (about 15 minutes on 2 CPU cores)
    python benchmarks/memory.py --quick    # small sizes, for a smoke test
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import init_centroids
from idkm_plugin.profiling import SavedTensorBytes

RESULTS = os.path.join(os.path.dirname(__file__), "results")
GIB = 1 << 30


@dataclass
class Run:
    method: str
    m: int
    bits: int
    d: int
    t: int
    chunk_size: int | None = None  # None: memory-bounded (auto chunks); 0: attention kept
    dtype: torch.dtype = torch.float32
    uniquify: str = "off"

    @property
    def mode(self) -> str:
        if self.method == "dkm":
            return "unrolled"
        return "attention kept" if self.chunk_size == 0 else "memory-bounded"


def make_problem(run: Run, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, run.m, run.d, generator=gen) * 0.02).to(run.dtype).to(device)
    c0 = init_centroids(x.float(), 1 << run.bits, "kmeans++", seed)
    return x, c0


def measure(run: Run, device: str, timed: bool = True) -> tuple[int, float]:
    """(bytes held for backward, seconds of forward + backward; forward only when not timed)."""
    x, c0 = make_problem(run, device)
    x.requires_grad_()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with SavedTensorBytes() as saved:
        out, _ = soft_kmeans(x, c0, method=run.method, max_iter=run.t, tol=0, chunk_size=run.chunk_size,
                             uniquify=run.uniquify, adjoint_max_iter=30)
    if timed:
        out.backward(torch.ones_like(out))
    sync()
    return saved.bytes, time.perf_counter() - start


def held_bytes(run: Run, device: str, limit: int) -> tuple[int, bool]:
    """Held bytes, measured, or extrapolated (affine in m) from two small sizes when over the limit.

    idkm / idkm_jfb hold the same bytes at any t (tests/core/test_memory.py), so they run t = 3.
    """
    if run.method != "dkm":
        run = Run(**{**run.__dict__, "t": 3})
    small = [Run(**{**run.__dict__, "m": m}) for m in (4096, 8192)]
    b1, b2 = (measure(r, device, timed=False)[0] for r in small)
    per_row = (b2 - b1) / 4096
    predicted = int(round(b1 + per_row * (run.m - 4096)))
    if predicted > limit:
        return predicted, True
    measured = measure(run, device, timed=False)[0]
    assert measured == predicted, f"held bytes not affine in m for {run}: {measured} vs {predicted}"
    return measured, False


def fmt_bytes(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"]:
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def iterations_table(device: str, m: int, ts: list[int]) -> tuple[str, dict]:
    """Held bytes and time vs the number of iterations t (4 bits, d = 1)."""
    rows, series = [], {}
    for method in ["dkm", "idkm", "idkm_jfb"]:
        for t in ts:
            held, seconds = measure(Run(method, m, 4, 1, t), device)
            series.setdefault(method, []).append((t, held))
            rows.append([method, str(t), fmt_bytes(held), f"{held / (4 * m):.2f}", f"{seconds * 1e3:.0f}"])
            print(f"  {method:9s} t={t:<4d} held {fmt_bytes(held):>10s}  {seconds * 1e3:8.0f} ms", flush=True)
    header = ["method", "t", "held for backward", "x weight bytes", "fwd+bwd (ms)"]
    return table(header, rows), series


def scale_table(device: str, ms: list[int], bits_list: list[int], dims: list[int], limit: int) -> tuple[str, dict]:
    """Held bytes vs layer size at t = 30 for every method and mode."""
    rows, series = [], {}
    variants = [("dkm", None), ("idkm", 0), ("idkm", None), ("idkm_jfb", None)]
    for d in dims:
        for bits in bits_list:
            for m in ms:
                cells = [f"{m:,}", str(bits), str(d)]
                for method, chunk in variants:
                    run = Run(method, m, bits, d, 30, chunk)
                    held, extrapolated = held_bytes(run, device, limit)
                    cells.append(fmt_bytes(held) + (" *" if extrapolated else ""))
                    if bits == 8 and d == 1:
                        series.setdefault(f"{method} ({run.mode})", []).append((m, held))
                rows.append(cells)
                print("  " + " | ".join(cells), flush=True)
    header = ["m (vectors)", "bits", "d", "dkm", "idkm, attention kept", "idkm, memory-bounded", "idkm_jfb, memory-bounded"]
    return table(header, rows), series


def budget_table(device: str, budget: int) -> str:
    """Largest m each method can cluster at 8 bits, d = 1, t = 30 with `budget` bytes held."""
    rows = []
    for method, chunk in [("dkm", None), ("idkm", 0), ("idkm", None), ("idkm_jfb", None)]:
        runs = [Run(method, m, 8, 1, 30 if method == "dkm" else 3, chunk) for m in (4096, 8192)]
        b1, b2 = (measure(r, device, timed=False)[0] for r in runs)
        per_row = (b2 - b1) / 4096
        largest = int((budget - (b1 - per_row * 4096)) // per_row)
        rows.append([method, runs[0].mode, f"{per_row:,.0f}", f"{largest:,}", f"{largest / 1e6:,.1f} M"])
    header = ["method", "mode", "bytes held per weight", f"largest m in {fmt_bytes(budget)}", "weights"]
    return table(header, rows)


def uniquify_table(device: str, side: int, t: int) -> str:
    """bf16 side x side weight at 4 bits: plain vs uniquified, same centroids, time per fwd+bwd."""
    results = {}
    for uniquify in ["off", "on"]:
        run = Run("idkm", side * side, 4, 1, t, None, torch.bfloat16, uniquify)
        x, c0 = make_problem(run, device)
        x.requires_grad_()
        start = time.perf_counter()
        out, c = soft_kmeans(x, c0, method="idkm", max_iter=t, tol=0, uniquify=uniquify, adjoint_max_iter=30)
        out.backward(torch.ones_like(out))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        results[uniquify] = (time.perf_counter() - start, c, x.grad)
        print(f"  uniquify={uniquify}: {results[uniquify][0]:.2f} s", flush=True)
    (t_plain, c_plain, g_plain), (t_uniq, c_uniq, g_uniq) = results["off"], results["on"]
    rel_c = float(torch.linalg.norm(c_uniq - c_plain) / torch.linalg.norm(c_plain))
    rel_g = float(torch.linalg.norm((g_uniq - g_plain).float()) / torch.linalg.norm(g_plain.float()))
    header = ["weight", "plain fwd+bwd (s)", "uniquified fwd+bwd (s)", "speed-up", "centroid rel. diff",
              "grad rel. diff (bf16 grads)"]
    row = [f"bf16 {side}x{side}, 4 bits, t={t}", f"{t_plain:.2f}", f"{t_uniq:.3f}", f"{t_plain / t_uniq:.0f}x",
           f"{rel_c:.1e}", f"{rel_g:.1e}"]
    return table(header, [row])


def plot(iter_series: dict, scale_series: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in iter_series.items():
        axes[0].plot(*zip(*pts), marker="o", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="iterations t", ylabel="bytes held for backward",
                title="m = 65,536 weights, 4 bits, d = 1")
    for name, pts in scale_series.items():
        axes[1].plot(*zip(*pts), marker="o", label=name)
    axes[1].axhline(4 * GIB, color="grey", ls="--", lw=1, label="4 GiB")
    axes[1].set(xscale="log", yscale="log", xlabel="m (weights)", ylabel="bytes held for backward",
                title="8 bits, d = 1, t = 30")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="memory budget of the headline table")
    parser.add_argument("--measure-limit-gib", type=float, default=2.0,
                        help="extrapolate (affine in m) instead of running configurations holding more than this")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    quick = args.quick
    limit = int(args.measure_limit_gib * GIB)
    where = f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
                                f" ({torch.get_num_threads()} threads)")

    print("held bytes and time vs iterations t")
    iter_md, iter_series = iterations_table(args.device, 4096 if quick else 65536, [1, 3, 10] if quick else
                                            [1, 3, 10, 30, 100])
    print("held bytes vs layer size")
    scale_md, scale_series = scale_table(args.device, [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000],
                                         [1, 8] if quick else [1, 2, 4, 8], [1] if quick else [1, 4], limit)
    print("memory budget headline")
    budget_md = budget_table(args.device, int(args.budget_gib * GIB))
    print("uniquification")
    uniq_md = uniquify_table(args.device, 512 if quick else 4096, 10 if quick else 30)

    report = "\n\n".join([
        f"Measured on {where} by `python benchmarks/memory.py{' --quick' if quick else ''}`.",
        "### Held for backward vs iterations (m = {:,}, 4 bits, d = 1)\n\n".format(4096 if quick else 65536) + iter_md,
        "### Held for backward vs layer size (t = 30)\n\n" + scale_md +
        "\n\n\\* extrapolated: held bytes are affine in m (checked on every measured size), "
        "from exact measurements at m = 4,096 and 8,192. idkm / idkm_jfb hold the same bytes at any t "
        "(asserted in tests/core/test_memory.py) and are measured at t = 3.",
        f"### Largest layer under a {args.budget_gib:g} GiB budget held for backward (8 bits, d = 1, t = 30)\n\n" +
        budget_md,
        "### eDKM uniquification (idkm, memory-bounded)\n\n" + uniq_md,
    ])
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(report + "\n")
    plot(iter_series, scale_series, os.path.join(args.out, "memory.png"))
    print(report)


if __name__ == "__main__":
    main()
