"""Latent maps: the posterior step and the training epoch of the separable 2-D AR(1) posterior against
the diagonal map posterior.

Part 1, rsample + KL to N(0, I) + backward, batch 128, at latent maps 8x7x7 and 16x14x14, on two paths:
- default: what a user gets without asking: argument validation on (torch's default, set explicitly
  because ``python -O`` turns it off), every distribution built with its defaults, the prior written
  ``Independent(Normal(torch.zeros(C, H, W), torch.ones(C, H, W)), 3)`` (for the diagonal map) and
  ``StandardNormal((C, H, W))`` for the families whose KL is registered against it;
- fast: ``validate_args=False`` everywhere, the prior ``StandardNormal((C, H, W))``.
The families: diagonal (``Independent(Normal, 3)``), ar1-2d (``SeparableAR1Normal``, one scale a
channel) and ar1-2d-diag (a scale a position). Times are medians over repeats, the families timed in
turn within each repeat (benchmarks/bench_posteriors.py's timer).

Part 2, a training epoch of the cnn with an 8x7x7 map on Fashion-MNIST (random pixels where it is not
installed), batch 128, best of ``--repeats`` epochs: diagonal, ar1-2d, ar1-2d-diag, ar1 (raster order).

    python benchmarks/bench_spatial.py [--device cpu] [--images 10000] [--epoch-repeats 2] [--skip-epochs]
        [--clock wall|thread]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from bench_posteriors import time_steps
from common import best_epoch_seconds, fashion_or_random, machine_name
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from rhovae.config import RunConfig
from rhovae.distributions import SeparableAR1Normal, StandardNormal
from rhovae.train import make_run

SHAPES = ((8, 7, 7), (16, 14, 14))


def make_steps(batch: int, shape: tuple[int, int, int], device: torch.device, path: str) -> dict:
    g = torch.Generator().manual_seed(0)
    c = shape[0]
    loc = torch.randn(batch, *shape, generator=g).to(device).requires_grad_()
    log_var = torch.randn(batch, *shape, generator=g).mul(0.1).to(device).requires_grad_()
    scalars = torch.randn(batch, 3, c, generator=g).mul(0.3).to(device).requires_grad_()
    standard = StandardNormal(shape, device=device)
    if path == "default":
        options: dict = {}
        zeros = torch.zeros(shape, device=device)
        diagonal_prior = Independent(Normal(zeros, torch.ones_like(zeros)), 3)
    else:
        options = {"validate_args": False}
        diagonal_prior = standard

    def diagonal():
        q = Independent(Normal(loc, torch.exp(0.5 * log_var), **options), 3, **options)
        (q.rsample().pow(2).sum() + kl_divergence(q, diagonal_prior).sum()).backward()

    def ar1_2d():
        rho = torch.tanh(scalars[:, :2])
        q = SeparableAR1Normal(loc, rho[:, 0], rho[:, 1], torch.exp(0.5 * scalars[:, 2]), **options)
        (q.rsample().pow(2).sum() + kl_divergence(q, standard).sum()).backward()

    def ar1_2d_diag():
        rho = torch.tanh(scalars[:, :2])
        q = SeparableAR1Normal(loc, rho[:, 0], rho[:, 1], torch.exp(0.5 * log_var), **options)
        (q.rsample().pow(2).sum() + kl_divergence(q, standard).sum()).backward()

    return {"diagonal": diagonal, "ar1-2d": ar1_2d, "ar1-2d-diag": ar1_2d_diag}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per cell")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per posterior cell (median shown)")
    parser.add_argument("--images", type=int, default=10000, help="training images per timed epoch")
    parser.add_argument("--epoch-repeats", type=int, default=2, help="timed epochs per family (best shown)")
    parser.add_argument("--skip-epochs", action="store_true", help="part 1 only")
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="part 1's clock: wall (default), or thread: the CPU time of this thread with torch on one "
        "thread, for a CPU shared with other work",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    clock = time.perf_counter
    if args.clock == "thread":
        if device.type != "cpu":
            parser.error("--clock thread measures the CPU work of one thread: use it with --device cpu")
        torch.set_num_threads(1)
        clock = time.thread_time
    Distribution.set_default_validate_args(True)  # torch's default, unless python -O
    print(
        f"# rsample + KL + backward, batch {args.batch}, float32, {device.type} ({machine_name(device)}), "
        f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} torch "
        f"threads; {args.clock} clock, median of {args.repeats} repeats"
    )
    print(
        "| map | path | diagonal (µs) | ar1-2d (µs) | ar1-2d-diag (µs) | ar1-2d / diagonal "
        "| ar1-2d-diag / diagonal |"
    )
    print("|---|:---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        for path in ("default", "fast"):
            steps = make_steps(args.batch, shape, device, path)
            t = time_steps(steps, device, args.min_time, args.repeats, clock)
            us = {k: f"{v * 1e6:.0f}" for k, v in t.items()}
            print(
                f"| {'x'.join(map(str, shape))} | {path} | {us['diagonal']} | {us['ar1-2d']} | "
                f"{us['ar1-2d-diag']} | {t['ar1-2d'] / t['diagonal']:.2f}× | "
                f"{t['ar1-2d-diag'] / t['diagonal']:.2f}× |",
                flush=True,
            )
    if args.skip_epochs:
        return
    data, source = fashion_or_random(args.images, device)
    print(
        f"\n# cnn with an 8x7x7 latent map, {len(data.train)} {source} images per epoch, batch 128, "
        f"{device.type} ({machine_name(device)}), best of {args.epoch_repeats} epochs"
    )
    print("| posterior | epoch (s) | vs diagonal |")
    print("|---|---:|---:|")
    base = None
    for family in ("diagonal", "ar1-2d", "ar1-2d-diag", "ar1"):
        cfg = RunConfig(model="cnn", latent_shape="8,7,7", posterior=family, device=args.device).validate()
        torch.manual_seed(0)
        seconds = best_epoch_seconds(make_run(cfg, data), args.epoch_repeats)
        base = base or seconds
        print(f"| {family} | {seconds:.2f} | {seconds / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
