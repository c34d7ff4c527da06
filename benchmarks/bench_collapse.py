"""Epoch cost of the sequence VAE against its language model, and what aggressive training adds.

rhovae's own trainer (``make_run`` + ``train_epoch``) on the ``words`` training split: one epoch of the
language model (``latent_dim = 0``: the decoder alone, one LSTM pass), of the VAE with the diagonal and
the AR(1) posterior (encoder, decoder, and the teacher-forced decoder pass: three LSTM passes), each the
best of ``--repeats`` epochs after a warm-up epoch; the target is VAE ≤ 2.5× LM at the same width.
Aggressive training (He et al. 2019) is timed on its first ``--aggressive-steps`` ordinary steps (each
preceded by its encoder-only inner loop) and reported per ordinary step and as encoder steps per
ordinary step, against the plain VAE's step.

    python benchmarks/bench_collapse.py [--hidden 256] [--latent-dim 16] [--limit 0] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch
from common import machine_name

from rhovae.config import RunConfig
from rhovae.data import load_data
from rhovae.train import make_run, train_epoch


def epoch_seconds(cfg: RunConfig, data, repeats: int) -> float:
    torch.manual_seed(cfg.seed)
    run = make_run(cfg, data)
    train_epoch(run, 1)  # warm-up
    best = float("inf")
    for epoch in range(2, 2 + repeats):
        start = time.perf_counter()
        train_epoch(run, epoch)
        best = min(best, time.perf_counter() - start)
    return best


def aggressive_step_seconds(cfg: RunConfig, data, steps: int) -> tuple[float, float]:
    """Seconds per ordinary step with its inner loop, and encoder steps per ordinary step."""
    torch.manual_seed(cfg.seed)
    run = make_run(cfg, data)
    n = min(len(data.train), steps * cfg.batch_size)
    run.data = dataclasses.replace(data, train=data.train[:n])
    start = time.perf_counter()
    train_epoch(run, 1)
    seconds = time.perf_counter() - start
    ordinary = -(-n // cfg.batch_size)
    return seconds / ordinary, run.aggressive.inner_steps / ordinary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=0, help="first N sequences per split (0: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--aggressive-steps", type=int, default=10)
    args = parser.parse_args()
    base = dict(model="lstm", dataset="words", hidden=args.hidden, batch_size=args.batch_size, device="cpu",
                limit=args.limit, pictures=False)  # fmt: skip
    data = load_data("words", limit=args.limit or None)
    machine = machine_name(torch.device("cpu"))
    print(
        f"# {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}; words: {len(data.train):,} training sequences, hidden {args.hidden}, "
        f"latent {args.latent_dim}, batch {args.batch_size}"
    )
    lm = epoch_seconds(RunConfig(**base, latent_dim=0).validate(), data, args.repeats)
    print(f"language model (latent 0)   {lm:8.2f} s/epoch")
    plain = {}
    for posterior in ("diagonal", "ar1"):
        cfg = RunConfig(**base, latent_dim=args.latent_dim, posterior=posterior).validate()
        plain[posterior] = epoch_seconds(cfg, data, args.repeats)
        print(
            f"VAE, {posterior:<9}             {plain[posterior]:8.2f} s/epoch   "
            f"{plain[posterior] / lm:.2f}× the LM"
        )
    steps_per_epoch = -(-len(data.train) // args.batch_size)
    cfg = RunConfig(**base, latent_dim=args.latent_dim, posterior="diagonal", aggressive=True).validate()
    per_step, inner = aggressive_step_seconds(cfg, data, args.aggressive_steps)
    vae_step = plain["diagonal"] / steps_per_epoch
    print(
        f"aggressive (diagonal), first {args.aggressive_steps} steps: {per_step:.3f} s per ordinary step "
        f"({inner:.1f} encoder steps each) vs {vae_step:.3f} s for the plain VAE: {per_step / vae_step:.1f}× "
        f"while the aggressive phase lasts (an epoch ≈ {per_step * steps_per_epoch:.0f} s)"
    )


if __name__ == "__main__":
    main()
