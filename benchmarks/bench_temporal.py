"""Latent trajectories: the training epoch of the frames model with the ar1 and banded posteriors against
the diagonal one, at T = 10 and T = 50 frames, and the cost of GP-VAE's GP prior.

Each cell is the best of ``--repeats`` training epochs (after an untimed warm-up of three batches) of
``--model frames`` (per-frame MLP, hidden 256, 10 latent channels) over ``--sequences`` sequences of
28x28 frames with 60 % of the values missing (NaN), batch 128. The frames are uniform noise: an epoch's
cost does not depend on the pixel values, and noise needs no dataset. Rows: each posterior with the
N(0, I) prior, then the diagonal and banded posteriors with the GP prior (dense T x T, its Cholesky
factor and the KL's trace and Mahalanobis terms each step).

    python benchmarks/bench_temporal.py [--device cpu] [--sequences 1000] [--repeats 2] [--frames 10 50]
"""

from __future__ import annotations

import argparse

import torch
from common import best_epoch_seconds, machine_name

from rhovae.config import RunConfig
from rhovae.data import Data, Preprocessing
from rhovae.train import make_run

CELLS = (
    ("diagonal", "standard"),
    ("ar1", "standard"),
    ("banded", "standard"),
    ("diagonal", "gp"),
    ("banded", "gp"),
)


def noise_frames(n: int, frames: int, device: torch.device) -> Data:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, frames, 1, 28, 28), generator=g)
    x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.6, float("nan")).to(device)
    shape = tuple(x.shape[1:])
    return Data(
        x, x[:128], x[:128], "continuous", "noise", "noise-frames", shape,
        meta={"frames": frames}, preprocessing=Preprocessing(shape, images=False), device=device,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequences", type=int, default=1000, help="training sequences per timed epoch")
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per cell (best shown)")
    parser.add_argument("--frames", type=int, nargs="+", default=[10, 50], help="sequence lengths T")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"# frames model epoch, {args.sequences} sequences of T frames (28x28, 60% missing), batch 128, "
        f"{device.type} ({machine_name(device)}), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, best of {args.repeats} epochs"
    )
    print("| T | posterior | prior | epoch (s) | vs diagonal, N(0, I) |")
    print("|---:|---|---|---:|---:|")
    for frames in args.frames:
        data = noise_frames(args.sequences, frames, device)
        base = None
        for posterior, prior in CELLS:
            cfg = RunConfig(
                model="frames", dataset="rotating:mnist-5k", posterior=posterior, prior=prior,
                frames=frames, device=args.device,
            ).validate()  # fmt: skip
            torch.manual_seed(0)
            seconds = best_epoch_seconds(make_run(cfg, data), args.repeats)
            base = base or seconds
            print(f"| {frames} | {posterior} | {prior} | {seconds:.2f} | {seconds / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
