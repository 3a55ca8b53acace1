"""Training speed of dkm / idkm / idkm_jfb: one QAT step (forward + backward) of one weight, one thread.

For a 1024x1024 weight at 2/1, 4/1, 8/1 and 4/4 (bits / cluster dim) it measures, in one run:
the step time and the bytes autograd holds for backward (SavedTensorBytes) of (8/1 on a smaller
weight where dkm t = 3, the reference, would hold more than --measure-limit-gib)
    dkm t = 3 and t = 30 (unrolled; skipped where the held bytes would pass --measure-limit-gib),
    idkm and idkm_jfb with each solver, with the library defaults (uniquify="auto") and exact float32
    (uniquify="off"), from a cold start (k-means++ centroids: the first step) and a warm start (the
    previous step's centroids after an optimizer-sized change of the weight: every later step),
    coremltools' DKMPalettizer (t = 3, its default) when coremltools is installed;
the map evaluations Anderson and plain iteration need to converge from cold and warm starts; and
one idkm step of a 30522x384 word embedding (the all-MiniLM-L6-v2 shape) at 4 bits.
Times are the best of --repeats; ratios are against our dkm t = 3 in the same run.

Writes benchmarks/results/speed.md and speed.json.

    python benchmarks/speed.py            # the README table (~10 minutes on one CPU thread)
    python benchmarks/speed.py --quick    # a 256x256 weight, for a smoke test (writes nothing)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from idkm_plugin import soft_kmeans
from idkm_plugin.core import SolveStats, init_centroids
from idkm_plugin.profiling import SavedTensorBytes
from memory import fmt_bytes, table

RESULTS = os.path.join(os.path.dirname(__file__), "results")
WARM_STEP = 1e-3  # relative weight change between two steps (an Adam step of lr 1e-3 on weights ~1)


@dataclass(frozen=True)
class Case:
    method: str
    max_iter: int = 30
    solver: str = "anderson"
    uniquify: str = "auto"

    @property
    def label(self) -> str:
        if self.method == "dkm":
            return f"dkm, t = {self.max_iter}"
        return f"{self.method}, {self.solver}" + ("" if self.uniquify == "auto" else ", exact float32")


CASES = [Case("dkm", 3), Case("dkm", 30)] + [Case(m, 30, s, u) for m in ("idkm", "idkm_jfb")
                                              for u in ("auto", "off") for s in ("anderson", "picard")]


def weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def step(case: Case, x: torch.Tensor, c0: torch.Tensor, grad: torch.Tensor) -> dict:
    """One forward + backward of x [1, m, d] from centroids c0: seconds, held bytes, stats, C*."""
    xg = x.clone().requires_grad_()
    stats = SolveStats()
    start = time.perf_counter()
    with SavedTensorBytes() as saved:
        out, c = soft_kmeans(xg, c0, method=case.method, max_iter=case.max_iter, tol=1e-5 if case.method != "dkm"
                             else 0.0, solver=case.solver, uniquify=case.uniquify, stats=stats)
    out.backward(grad)
    return {"seconds": time.perf_counter() - start, "held": saved.bytes, "stats": stats, "c": c}


def best_of(repeats: int, fn) -> dict:
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r["seconds"])


def dkm_bytes(m: int, k: int, t: int) -> int:
    """Held bytes of unrolled dkm, ~3 [m, k] float32 tensors per iteration (measured: 129x the weight at t = 3)."""
    return 3 * 4 * m * k * (t + 1)


def side_for(side: int, bits: int, d: int, limit: int) -> int:
    """The largest side <= side (halving) at which dkm t = 3, the reference, fits the measure limit."""
    while side > 64 and dkm_bytes(side * side // d, 1 << bits, 3) > limit:
        side //= 2
    return side


def layer_rows(side: int, bits: int, d: int, repeats: int, limit: int, coreml: bool) -> list[dict]:
    w = weight((side, side))
    x = w.reshape(1, -1, d)
    k = 1 << bits
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    c_cold = init_centroids(x, k, "kmeans++", 0)
    x_next = x + WARM_STEP * x.abs().mean() * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    rows = []
    for case in CASES:
        if case.method != "dkm" and case.uniquify == "auto" and d > 1:
            continue  # auto is exact for d > 1: the same as the exact float32 rows
        if case.method == "dkm" and dkm_bytes(x.shape[1], k, case.max_iter) > limit:
            rows.append({"case": case.label, "skipped": f"needs ~{fmt_bytes(dkm_bytes(x.shape[1], k, case.max_iter))}"})
            continue
        cold = best_of(repeats, lambda: step(case, x, c_cold, grad))
        row = {"case": case.label, "held": cold["held"], "cold": cold["seconds"],
               "cold_evals": cold["stats"].forward_evals, "cold_residual": cold["stats"].forward_residual}
        if case.method != "dkm":
            warm = best_of(repeats, lambda: step(case, x_next, cold["c"], grad))
            row.update(warm=warm["seconds"], warm_evals=warm["stats"].forward_evals,
                       warm_residual=warm["stats"].forward_residual)
        rows.append(row)
        print(f"  {bits}/{d} {case.label}: {row}", flush=True)
    if coreml:
        rows.append(coreml_row(w, bits, d, repeats))
    return rows


def coreml_row(w: torch.Tensor, bits: int, d: int, repeats: int) -> dict:
    """coremltools 9.0 DKMPalettizer (its default t = 3) on a Linear holding w: one training forward + backward."""
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    config = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": bits, "cluster_dim": d}})
    palettizer = DKMPalettizer(model, config)
    prepared = palettizer.prepare()
    prepared.train()
    inp = torch.randn(8, w.shape[1], generator=torch.Generator().manual_seed(3))

    def run() -> dict:
        start = time.perf_counter()
        with SavedTensorBytes() as saved:
            out = prepared(inp)
        out.square().sum().backward()
        palettizer.step()
        return {"seconds": time.perf_counter() - start, "held": saved.bytes}

    run()  # its first forward initialises the centroids (k-means) and is not a training step
    got = best_of(repeats, run)
    return {"case": "coremltools DKMPalettizer, t = 3", "held": got["held"], "cold": got["seconds"],
            "note": "includes the Linear's own matmul on an 8-row batch"}


def convergence_rows(m: int, bits: int) -> list[list[str]]:
    """Map evaluations to a relative residual of 1e-5, cold (k-means++) and warm, for two weight laws."""
    rows = []
    for law in ("normal", "laplace"):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(1, m, 1, generator=gen) if law == "normal"
             else torch.distributions.Laplace(0.0, 1.0).sample((1, m, 1))) * 0.02
        c_cold = init_centroids(x, 1 << bits, "kmeans++", 0)
        x_next = x + WARM_STEP * x.abs().mean() * torch.randn(x.shape, generator=gen)
        for solver in ("anderson", "picard"):
            cold, warm = SolveStats(), SolveStats()
            kw = dict(method="idkm_jfb", max_iter=1000, tol=1e-5, solver=solver, uniquify="off")
            _, c_star = soft_kmeans(x, c_cold, stats=cold, **kw)
            soft_kmeans(x_next, c_star, stats=warm, **kw)
            evals = [f"{s.forward_evals} ({s.forward_residual:.1e})" for s in (cold, warm)]
            rows.append([law, solver, *evals])
    return rows


def embedding_row(repeats: int) -> list[list[str]]:
    w = torch.randn(30522, 384, generator=torch.Generator().manual_seed(0)) * 0.05
    x = w.reshape(1, -1, 1)
    c0 = init_centroids(x, 16, "kmeans++", 0)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    rows = []
    for case in (Case("idkm"), Case("idkm_jfb")):
        got = best_of(repeats, lambda: step(case, x, c0, grad))
        rows.append([case.label, f"{got['seconds']:.2f}", str(got["stats"].forward_evals)])
    return rows


def ratio(seconds: float, base: float) -> str:
    return f"{seconds / base:.2f}x" if base and not math.isnan(seconds) else "-"


def layer_table(rows: list[dict], weight_bytes: int) -> str:
    base = next(r["cold"] for r in rows if r["case"] == "dkm, t = 3" and "cold" in r)
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["case"], "-", "-", "-", "-", "-", f"not run ({r['skipped']} held)"])
            continue
        warm = r.get("warm", math.nan)
        evals = str(r.get("cold_evals", "-")) + (f" / {r['warm_evals']}" if "warm_evals" in r else "")
        out.append([r["case"], f"{r['held'] / weight_bytes:.1f}x", f"{r['cold']:.3f}", ratio(r["cold"], base),
                    "-" if math.isnan(warm) else f"{warm:.3f}", ratio(warm, base), evals + (
                        f"; {r['note']}" if "note" in r else "")])
    return table(["method", "held / weight", "cold step (s)", "vs dkm t=3", "warm step (s)", "vs dkm t=3",
                  "map evals cold / warm"], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 256x256 weight, no embedding (smoke test)")
    parser.add_argument("--configs", default="2/1,4/1,8/1,4/4", help="bits/dim list")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed steps")
    parser.add_argument("--measure-limit-gib", type=float, default=6.0, help="skip dkm cases holding more")
    parser.add_argument("--coreml-configs", default="2/1,4/1,4/4",
                        help="configs with a coremltools row (its 8-bit k-means init alone takes minutes)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    side = 256 if args.quick else 1024
    try:
        import coremltools  # noqa: F401
        coreml = True
    except ImportError:
        coreml = False
    limit = int(args.measure_limit_gib * (1 << 30))
    sections, data = [], {"side": side, "threads": 1, "coremltools": coreml, "layers": {}}
    sections.append(f"Measured on CPU, one thread (torch.set_num_threads(1)), by `python benchmarks/speed.py`; "
                    f"{side}x{side} float32 weight (N(0, 0.02^2)), tol 1e-5, max_iter 30; best of {args.repeats}. "
                    "Cold: from k-means++ centroids (the first step); warm: from the previous step's centroids "
                    f"after a {WARM_STEP:g} relative change of the weight (every later step). coremltools: "
                    + (f"9.0, rows at {args.coreml_configs}." if coreml else "not installed, its row is omitted."))
    for config in args.configs.split(","):
        bits, d = (int(v) for v in config.split("/"))
        n = side_for(side, bits, d, limit)
        print(f"{config} ({n}x{n}):", flush=True)
        with_coreml = coreml and not args.quick and config in args.coreml_configs.split(",")
        rows = layer_rows(n, bits, d, args.repeats, limit, with_coreml)
        data["layers"][config] = {"side": n, "rows": rows}
        note = "" if n == side else f" (dkm t = 3 needs ~{fmt_bytes(dkm_bytes(side * side // d, 1 << bits, 3))} at {side}x{side})"
        sections.append(f"### {n}x{n}, {bits} bits, d = {d}{note}\n\n" + layer_table(rows, n * n * 4))
    conv = convergence_rows(side * side, 4)
    data["convergence"] = conv
    sections.append(f"### Map evaluations to a relative residual of 1e-5 ({side * side:,} weights, 16 clusters)\n\n"
                    + table(["weights", "solver", "cold start (k-means++)", "warm start (next step)"], conv))
    if not args.quick:
        emb = embedding_row(args.repeats)
        data["embedding"] = emb
        sections.append("### 30522x384 word embedding, 4 bits, d = 1 (uniquify auto: the 16-bit grid), cold\n\n"
                        + table(["method", "fwd+bwd (s)", "map evals"], emb))
    print("\n\n".join(sections))
    if args.quick:
        return  # a smoke test writes no results
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")
    with open(os.path.join(args.out, "speed.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)


if __name__ == "__main__":
    main()
