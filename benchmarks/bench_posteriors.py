"""Time rsample + KL + backward per posterior family, batch 128, at several latent sizes.

Prints a Markdown table. Families: the diagonal Gaussian, AR1Normal (shared scale, the paper's), and
the reference method of the original repository: a Python loop over d that concatenates one column at
a time (here with the exact sqrt(1-rho^2) innovation scale, so all three compute correct samples).

    python benchmarks/bench_posteriors.py [--device cpu] [--batch 128] [--dims 10 64 256]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.distributions import Independent, Normal, kl_divergence

from rhovae.distributions import AR1Normal, StandardNormal, kl_ar1_standard_normal


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


def make_steps(batch, d, device):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(batch, d, generator=g).to(device).requires_grad_()
    log_var = torch.randn(batch, d, generator=g).mul(0.1).to(device).requires_grad_()
    rho_pre = torch.randn(batch, 1, generator=g).to(device).requires_grad_()
    log_s = torch.randn(batch, 1, generator=g).mul(0.1).to(device).requires_grad_()
    prior = StandardNormal(d, device=device)  # both families get their closed-form KL

    def diagonal():
        q = Independent(Normal(loc, torch.exp(0.5 * log_var), validate_args=False), 1, validate_args=False)
        z = q.rsample()
        (z.pow(2).sum() + kl_divergence(q, prior).sum()).backward()

    def ar1():
        q = AR1Normal(loc, torch.tanh(rho_pre), torch.exp(0.5 * log_s), validate_args=False)
        z = q.rsample()
        (z.pow(2).sum() + kl_divergence(q, prior).sum()).backward()

    def loop():
        rho = torch.tanh(rho_pre)
        z = loop_reference_rsample(loc, rho, log_s)
        q = AR1Normal(loc, rho, torch.exp(0.5 * log_s), validate_args=False)
        (z.pow(2).sum() + kl_ar1_standard_normal(q).sum()).backward()

    return {"diagonal": diagonal, "ar1": ar1, "loop": loop}


def time_it(fn, device, min_time=0.5, repeats=7):
    """Median over `repeats` of the mean time per call, each measured over >= min_time/repeats seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        fn()
    sync()
    n, elapsed = 1, 0.0
    while elapsed < min_time / repeats:
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        elapsed = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="torch device to time on (default: cpu)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 64, 256], help="latent sizes")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per cell")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# rsample + KL + backward, batch {args.batch}, float32, {device.type} ({name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| d | diagonal (µs) | AR1Normal (µs) | loop reference (µs) | AR1 / diagonal | loop / AR1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for d in args.dims:
        steps = make_steps(args.batch, d, device)
        t = {k: time_it(fn, device, args.min_time) for k, fn in steps.items()}
        print(
            f"| {d} | {t['diagonal'] * 1e6:.0f} | {t['ar1'] * 1e6:.0f} | {t['loop'] * 1e6:.0f} | "
            f"{t['ar1'] / t['diagonal']:.2f}× | {t['loop'] / t['ar1']:.1f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
