"""Epoch cost of the sequence VAE against its language model, and what aggressive training adds.

rhovae's own trainer (``make_run`` + ``train_epoch``) on the ``words`` training split: one epoch of the
language model (``latent_dim = 0``: the decoder alone, one LSTM pass), of the VAE with the diagonal and
the AR(1) posterior (the encoder's two directions and the teacher-forced decoder: three LSTM passes),
taking turns for ``--repeats`` rounds after a warm-up epoch each (best epoch, and the median ratio
within a round); the target is VAE ≤ 2.5× LM at the same width.
Aggressive training (He et al. 2019) is timed on its first ``--aggressive-steps`` ordinary steps (each
preceded by its encoder-only inner loop) and reported per ordinary step and as encoder steps per
ordinary step, against the plain VAE's step.

    python benchmarks/bench_collapse.py [--hidden 128] [--latent-dim 16] [--limit 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
from common import machine_name

from rhovae.config import RunConfig
from rhovae.data import load_data
from rhovae.train import make_run, train_epoch


def epoch_seconds(cfgs: dict[str, RunConfig], data, repeats: int) -> dict[str, list[float]]:
    """Seconds per training epoch of each config, after a warm-up epoch each. The runs take turns, one
    epoch each per round, so that a drift in the machine's speed (seen here at up to 35% over minutes)
    reaches every run alike and the ratios within a round stay comparable."""
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(cfg.seed)
        runs[name] = make_run(cfg, data)
        train_epoch(runs[name], 1)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in cfgs}
    for epoch in range(2, 2 + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            train_epoch(run, epoch)
            seconds[name].append(time.perf_counter() - start)
    return seconds


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
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=0, help="first N sequences per split (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--aggressive-steps", type=int, default=10)
    args = parser.parse_args()
    if args.repeats < 1 or args.aggressive_steps < 1:
        parser.error("--repeats and --aggressive-steps must be at least 1")
    base = dict(model="lstm", dataset="words", hidden=args.hidden, batch_size=args.batch_size, device="cpu",
                limit=args.limit, pictures=False)  # fmt: skip
    data = load_data("words", limit=args.limit or None)
    machine = machine_name(torch.device("cpu"))
    print(
        f"# {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}; words: {len(data.train):,} training sequences, hidden {args.hidden}, "
        f"latent {args.latent_dim}, batch {args.batch_size}"
    )
    cfgs = {"lm": RunConfig(**base, latent_dim=0).validate()}
    for posterior in ("diagonal", "ar1"):
        cfgs[posterior] = RunConfig(**base, latent_dim=args.latent_dim, posterior=posterior).validate()
    seconds = epoch_seconds(cfgs, data, args.repeats)
    lm = min(seconds["lm"])
    print(f"language model (latent 0)   {lm:8.2f} s/epoch (best of {args.repeats})")
    plain = {}
    for posterior in ("diagonal", "ar1"):
        plain[posterior] = min(seconds[posterior])
        ratios = [v / m for v, m in zip(seconds[posterior], seconds["lm"], strict=True)]
        print(
            f"VAE, {posterior:<9}             {plain[posterior]:8.2f} s/epoch   "
            f"{plain[posterior] / lm:.2f}× the LM (best against best); within a round "
            f"{statistics.median(ratios):.2f}× (median; range {min(ratios):.2f}-{max(ratios):.2f})"
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
