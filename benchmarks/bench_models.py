"""Seconds per Fashion-MNIST training epoch of every model with the diagonal and the AR(1) posterior.

Each cell runs the trainer's own inner loop (rhovae.train.train_epoch, with the model's objective) on
the first --images training images, after one warm-up pass over 3 batches, and scales the time to a full
epoch of 55,000 images (the training split). Real Fashion-MNIST when installed, else random pixels of the
same shape (said in the header).

    python benchmarks/bench_models.py [--images 2560] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform

import torch

from rhovae.config import RunConfig
from rhovae.data import Data, load_data
from rhovae.errors import RhovaeError
from rhovae.model import MODELS
from rhovae.train import make_run, train_epoch

EPOCH_IMAGES = 55000


def data_for(model: str, n: int, device) -> tuple[Data, str]:
    size = MODELS[model].input_size
    try:
        data = load_data("fashion-mnist", val_size=5000, device=device, limit=n, size=size)
        return data, "Fashion-MNIST"
    except RhovaeError:
        shape = (1, *(size or (28, 28)))
        x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        return Data(x, x[:10], x[:10], "continuous", "random", "synthetic"), "random pixels"


def time_epoch(cfg: RunConfig, data: Data, device) -> float:
    torch.manual_seed(0)
    run = make_run(cfg, data)
    run.data = Data(
        data.train[: 3 * cfg.batch_size], data.val, data.test, data.pixels, data.source, data.name
    )
    train_epoch(run, 1)  # warm-up
    run.data = data
    return train_epoch(run, 1)["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2560, help="training images timed per cell")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    rows = []
    source = ""
    for model in args.models:
        data, source = data_for(model, args.images, device)
        times = {}
        for posterior in ("diagonal", "ar1"):
            cfg = RunConfig(model=model, posterior=posterior, latent_dim=10, batch_size=128).validate()
            times[posterior] = time_epoch(cfg, data, device) * EPOCH_IMAGES / len(data.train)
        rows.append((model, data.data_shape, cfg.objective, times))
    print(
        f"# seconds per epoch of {EPOCH_IMAGES} images ({source}), "
        f"scaled from {args.images} timed images, "
        f"batch 128, z = 10, {device.type} ({name}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| model | input | objective | diagonal (s/epoch) | AR(1) (s/epoch) | AR(1) / diagonal |")
    print("|---|---|---|---:|---:|---:|")
    for model, shape, objective, t in rows:
        print(
            f"| {model} | {'×'.join(map(str, shape))} | {objective} | {t['diagonal']:.1f} | {t['ar1']:.1f} | "
            f"{t['ar1'] / t['diagonal']:.2f}× |"
        )


if __name__ == "__main__":
    main()
