"""One epoch of batch gathering: an in-memory device tensor vs a memory-mapped ``.npy`` file.

60,000 × 784 uint8 images (Fashion-MNIST's size) are written to a temporary folder as ``.npy`` and
loaded twice with ``load_data("npz:...")``: once held in memory (one float tensor on the device) and once
gathered from the memory map batch by batch (``in_memory_limit_mb=0``). Each epoch is
``Data.train_batches`` at batch 128 in a random order, batches consumed (summed) so nothing is lazy; the
median of ``--repeats`` epochs is reported. The map is read once first, so both run from the page cache:
this measures the gather path, not the disk.

    python benchmarks/bench_data.py [--images 60000] [--batch-size 128] [--repeats 9] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rhovae.data import load_data


def epoch_seconds(data, batch_size: int, seed: int, device: torch.device) -> float:
    shuffle = torch.Generator().manual_seed(seed)
    pixels = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for x in data.train_batches(batch_size, shuffle, pixels):
        total += x[:, 0, 0, 0].sum()
    float(total)  # waits for the device
    return time.perf_counter() - start


def interleaved_medians(datasets, batch_size: int, repeats: int, device: torch.device) -> list[float]:
    """Median epoch time of each dataset, epochs alternating between them so drift hits both alike."""
    times: list[list[float]] = [[] for _ in datasets]
    for r in range(repeats + 1):  # the first round warms caches and is dropped
        for d, t in zip(datasets, times, strict=True):
            seconds = epoch_seconds(d, batch_size, r, device)
            if r:
                t.append(seconds)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8))
        name = f"npz:{path}"
        held = load_data(name, device=device, val_size=1)
        mapped = load_data(name, device=device, val_size=1, in_memory_limit_mb=0)
        assert isinstance(held.train, torch.Tensor) and not isinstance(mapped.train, torch.Tensor)
        n_batches = -(-len(held.train) // args.batch_size)
        t_held, t_mapped = interleaved_medians([held, mapped], args.batch_size, args.repeats, device)
    print(
        f"{len(held.train)} images of 1x28x28 uint8, batch {args.batch_size} ({n_batches} batches), "
        f"random order, median of {args.repeats} epochs"
    )
    print(f"in-memory tensor : {t_held * 1e3:8.1f} ms/epoch  ({t_held / n_batches * 1e6:6.1f} us/batch)")
    print(f"memory-mapped npy: {t_mapped * 1e3:8.1f} ms/epoch  ({t_mapped / n_batches * 1e6:6.1f} us/batch)")
    print(f"ratio memmap / in-memory: {t_mapped / t_held:.2f}x (target: within 1.5x)")


if __name__ == "__main__":
    main()
