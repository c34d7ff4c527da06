"""Seconds per training epoch of latent hierarchies and learned priors relative to the flat model.

The trainer's own loop (rhovae.train.train_epoch) on the MLP backbone, latent 10, batch 128, dynamically
binarised Fashion-MNIST (random pixels when it is not installed), the first ``--images`` training
images per epoch; each cell is the best of ``--repeats`` epochs after a three-batch warm-up.

    python benchmarks/bench_hierarchy.py [--images 20000] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from common import best_epoch_seconds, fashion_or_random, machine_name

from rhovae.config import RunConfig
from rhovae.train import make_run

SETUPS = [
    ("flat, N(0, I)", {}),
    ("flat, MADE prior", {"prior": "made"}),
    ("2 groups", {"latent_groups": 2}),
    ("4 groups", {"latent_groups": 4}),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data, source = fashion_or_random(args.images, device, pixels="dynamic")
    name = machine_name(device)
    print(
        f"# MLP VAE, latent 10, {len(data.train)} {source} images per epoch, batch 128, {device.type} "
        f"({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| setup | posterior | parameters | epoch (s) | vs flat diagonal |")
    print("|---|---|---:|---:|---:|")
    base = None
    for label, settings in SETUPS:
        for posterior in ("diagonal", "ar1"):
            cfg = RunConfig(posterior=posterior, pixels="dynamic", **settings).validate()
            torch.manual_seed(0)
            run = make_run(cfg, data)
            seconds = best_epoch_seconds(run, args.repeats)
            base = base or seconds
            params = sum(p.numel() for p in run.model.parameters())
            print(
                f"| {label} | {posterior} | {params:,} | {seconds:.2f} | {seconds / base:.2f}× |", flush=True
            )


if __name__ == "__main__":
    main()
