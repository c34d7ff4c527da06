"""Time rsample + KL + backward per posterior family, batch 128, at several latent sizes, on two paths.

Prints a Markdown table. Families: the diagonal Gaussian, AR1Normal (shared scale, the paper's), and
the reference method of the original repository: a Python loop over d that concatenates one column at
a time (here with the exact sqrt(1-rho^2) innovation scale, so all three compute correct samples).

Paths:
- default: what a user gets without asking. Argument validation on (torch's default, set explicitly
  here because ``python -O`` turns it off), every distribution built with its defaults, and the prior
  written ``Independent(Normal(torch.zeros(d), torch.ones(d)), 1)``.
- fast: the project's own choice. ``validate_args=False`` everywhere and the prior ``StandardNormal(d)``.
Both paths get the closed-form KL for every family; the loop reference differs from AR1Normal only
in its sampler. Each time is the median over repeats, the families timed in turn within each repeat.

    python benchmarks/bench_posteriors.py [--device cpu] [--batch 128] [--dims 10 64 256]
        [--clock wall|thread] [--threads N]

On a CPU shared with other work, prefer --clock thread (or at least --threads 1): with several torch
threads a busy core stalls the others at every parallel op, and wall times become meaningless.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import machine_name
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from rhovae.distributions import AR1Normal, StandardNormal

PATHS = ("default", "fast")


def loop_reference_rsample(loc, rho, log_s):
    """The reference repository's sampler, op for op: per column it recomputes sqrt(exp(log s)),
    draws a (B, 1) noise column and concatenates; here with the exact recurrence (the rho factor and
    the sqrt(1 - rho^2) innovation scale) so that its samples are the same distribution."""
    z = torch.randn_like(rho) * torch.sqrt(log_s.exp())
    for _ in range(1, loc.shape[-1]):
        innovation = torch.randn_like(rho) * torch.sqrt(log_s.exp() * (1 - rho**2))
        column = rho * z[:, -1].view(-1, 1) + innovation
        z = torch.cat((z, column), 1)
    return loc + z


def make_steps(batch, d, device, path):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(batch, d, generator=g).to(device).requires_grad_()
    log_var = torch.randn(batch, d, generator=g).mul(0.1).to(device).requires_grad_()
    rho_pre = torch.randn(batch, 1, generator=g).to(device).requires_grad_()
    log_s = torch.randn(batch, 1, generator=g).mul(0.1).to(device).requires_grad_()
    if path == "default":
        options = {}
        prior = Independent(Normal(torch.zeros(d, device=device), torch.ones(d, device=device)), 1)
    else:
        options = {"validate_args": False}
        prior = StandardNormal(d, device=device)

    def diagonal():
        q = Independent(Normal(loc, torch.exp(0.5 * log_var), **options), 1, **options)
        z = q.rsample()
        (z.pow(2).sum() + kl_divergence(q, prior).sum()).backward()

    def ar1():
        q = AR1Normal(loc, torch.tanh(rho_pre), torch.exp(0.5 * log_s), **options)
        z = q.rsample()
        (z.pow(2).sum() + kl_divergence(q, prior).sum()).backward()

    def loop():
        rho = torch.tanh(rho_pre)
        z = loop_reference_rsample(loc, rho, log_s)
        q = AR1Normal(loc, rho, torch.exp(0.5 * log_s), **options)
        (z.pow(2).sum() + kl_divergence(q, prior).sum()).backward()

    return {"diagonal": diagonal, "ar1": ar1, "loop": loop}


def time_steps(steps, device, min_time=1.0, repeats=7, clock=time.perf_counter):
    """Median over `repeats` of the mean time per call of each step; within a repeat the steps take
    turns, so a slow spell of a shared machine falls on all of them. Each step runs >= min_time/repeats
    seconds per repeat."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls = {}
    for name, fn in steps.items():
        for _ in range(5):
            fn()
        sync()
        n, elapsed = 1, 0.0
        while elapsed < min_time / repeats:
            n *= 2
            start = clock()
            for _ in range(n):
                fn()
            sync()
            elapsed = clock() - start
        calls[name] = n
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = clock()
            for _ in range(calls[name]):
                fn()
            sync()
            samples[name].append((clock() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="torch device to time on (default: cpu)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 64, 256], help="latent sizes")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per cell")
    parser.add_argument("--repeats", type=int, default=7, help="repeats per cell; the median is shown")
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: elapsed time (default). thread: CPU time of this thread only, with torch on one "
        "thread, for a CPU shared with other work (time spent waiting for a core is not counted)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    clock = time.perf_counter
    if args.clock == "thread":
        if device.type != "cpu" or args.threads not in (None, 1):
            parser.error("--clock thread measures the CPU work of one thread: use it with --device cpu")
        args.threads = 1
        clock = time.thread_time
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    Distribution.set_default_validate_args(True)  # torch's default, unless python -O
    print(
        f"# rsample + KL + backward, batch {args.batch}, float32, {device.type} ({machine_name(device)}), "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} torch threads; {args.clock} clock, median of {args.repeats} repeats"
    )
    print("| d | path | diagonal (µs) | AR1Normal (µs) | loop reference (µs) | AR1 / diagonal | loop / AR1 |")
    print("|---:|:---|---:|---:|---:|---:|---:|")
    for d in args.dims:
        for path in PATHS:
            steps = make_steps(args.batch, d, device, path)
            t = time_steps(steps, device, args.min_time, args.repeats, clock)
            us = {name: f"{seconds * 1e6:.0f}" for name, seconds in t.items()}
            print(
                f"| {d} | {path} | {us['diagonal']} | {us['ar1']} | {us['loop']} | "
                f"{t['ar1'] / t['diagonal']:.2f}× | {t['loop'] / t['ar1']:.1f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
