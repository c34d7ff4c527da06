"""What the benchmark scripts share: the machine's name for their headers, Fashion-MNIST (or random
pixels where it is not installed), and the best of several timed training epochs."""

from __future__ import annotations

import os
import platform

import torch

from rhovae.data import Data, load_data
from rhovae.errors import RhovaeError
from rhovae.train import Run, train_epoch


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and logical CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def fashion_or_random(
    n: int, device: torch.device, pixels: str = "continuous", size: tuple[int, int] | None = None
) -> tuple[Data, str]:
    """``n`` Fashion-MNIST training images (5,000 held out) on ``device``, or ``n`` random images of the
    same shape where the dataset is not installed; with the name of what it is, for the header."""
    try:
        data = load_data("fashion-mnist", val_size=5000, device=device, limit=n, pixels=pixels, size=size)
        return data, "Fashion-MNIST"
    except RhovaeError:
        shape = (1, *(size or (28, 28)))
        x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        return Data(x, x[:10], x[:10], pixels, "random", "synthetic"), "random pixels"


def best_epoch_seconds(run: Run, repeats: int) -> float:
    """The fastest of ``repeats`` epochs of ``run`` over its data, after a short warm-up epoch (three
    batches: kernels chosen, allocator warm) that is not timed."""
    data = run.data
    run.data = Data(
        data.train[: 3 * run.cfg.batch_size], data.val, data.test, data.pixels, data.source, data.name
    )
    try:
        train_epoch(run, 1)
    finally:
        run.data = data
    return min(train_epoch(run, 1)["epoch_seconds"] for _ in range(repeats))
