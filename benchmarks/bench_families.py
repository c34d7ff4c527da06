"""Seconds per training epoch of the MLP VAE with every posterior family, relative to the diagonal one.

The trainer's own inner loop (rhovae.train.train_epoch) over --images Fashion-MNIST training images
(random pixels of the same shape when the dataset is not installed), batch 128, z = 10, after a
3-batch warm-up; the minimum of --repeats epochs.

    python benchmarks/bench_families.py [--images 55000] [--repeats 2] [--flow-steps 4]
"""

from __future__ import annotations

import argparse

import torch
from common import best_epoch_seconds, fashion_or_random, machine_name

from rhovae.config import RunConfig
from rhovae.train import make_run

FAMILIES = ["diagonal", "ar1", "ar1-diag", "full", "planar", "iaf", "ar1+planar", "ar1+iaf"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=55000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flow-steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data, source = fashion_or_random(args.images, device)
    name = machine_name(device)
    print(
        f"# MLP VAE, {len(data.train)} {source} images per epoch, batch 128, z = 10, {args.flow_steps} flow "
        f"steps, {device.type} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| posterior | epoch (s) | vs diagonal |")
    print("|---|---:|---:|")
    base = None
    for family in FAMILIES:
        cfg = RunConfig(posterior=family, latent_dim=10, flow_steps=args.flow_steps).validate()
        torch.manual_seed(0)
        seconds = best_epoch_seconds(make_run(cfg, data), args.repeats)
        base = base or seconds
        print(f"| {family} | {seconds:.2f} | {seconds / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
