"""Post-training palettization of the pretrained MNIST CNN: k-means, and sensitivity-weighted k-means.

    python examples/ptq.py --bits 2
    python examples/ptq.py --bits-config examples/mnist_mixed_1bit.yaml --calib-batches 8

No fine-tuning: `idkm_plugin.ptq.palettize` clusters every layer the ModelConfig selects with hard k-means
(Deep Compression) and converts it; with calibration batches the k-means is weighted by the diagonal Fisher
information of the loss (`ptq.fisher_information`, as SqueezeLLM and coremltools' SKMPalettizer).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from idkm_plugin import ClusterConfig, ModelConfig, ptq
from idkm_plugin.export import size_report
from idkm_plugin.workloads.mnist import evaluate, load_mnist, load_pretrained_cnn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=2, help="bits per code of every layer (without --bits-config)")
    p.add_argument("--bits-config", default=None, help="a YAML ModelConfig")
    p.add_argument("--calib-batches", type=int, default=8, help="batches of the Fisher information")
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--test-subset", type=int, default=10_000)
    p.add_argument("--iters", type=int, default=50, help="Lloyd iterations")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = load_pretrained_cnn()
    mc = ModelConfig.from_yaml(args.bits_config) if args.bits_config else ModelConfig(default=ClusterConfig(bits=args.bits))
    x_test, y_test = load_mnist("test", args.test_subset)
    x_cal, y_cal = load_mnist("train", args.calib_batches * args.calib_batch_size)
    calib = list(zip(x_cal.split(args.calib_batch_size), y_cal.split(args.calib_batch_size)))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    result = {"float": evaluate(model, x_test, y_test)}
    kmeans = ptq.palettize(model, mc, iters=args.iters)
    result["kmeans"] = evaluate(kmeans, x_test, y_test)
    fisher = ptq.fisher_information(model, calib, loss_fn)
    result["sensitivity"] = evaluate(ptq.palettize(model, mc, fisher=fisher, iters=args.iters), x_test, y_test)
    result["bits_per_weight"] = size_report(kmeans).bits_per_weight
    print(f"top-1 on {len(y_test)} test images: float {result['float']:.2f}%, k-means {result['kmeans']:.2f}%, "
          f"sensitivity-weighted k-means ({args.calib_batches} x {args.calib_batch_size} calibration images) "
          f"{result['sensitivity']:.2f}%; {result['bits_per_weight']:.3f} bits per weight")
    return result


if __name__ == "__main__":
    main()
