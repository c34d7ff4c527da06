"""Seconds per Fashion-MNIST training epoch of every model, against its FLOP floor, and the cost of the
IWAE evaluation, with the convolutional backbones in channels-last layout (rhovae's) and in plain NCHW.

Each cell runs the trainer's own inner loop (rhovae.train.train_epoch, with the model's objective) on
the first --images training images, after one warm-up pass over 3 batches, and scales the time to a full
epoch of 55,000 images (the training split). The FLOP floor is the model's training FLOPs per epoch
(torch.utils.flop_counter: convolutions and matmuls) divided by the float32 matmul rate measured here at
1024^3: what the epoch would take if every FLOP ran at the machine's best GEMM speed. The IWAE column
is the measured time of a k = 1000 importance-weighted bound on one image, scaled to 250 images (the
``paper-cpu`` preset's evaluation). Real Fashion-MNIST when installed, else random pixels of the same
shape (said in the header).

    python benchmarks/bench_models.py [--images 2560] [--device cpu] [--models cnn ...] [--layouts both]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from bench_train import matmul_rate, sync, training_flops
from common import best_epoch_seconds, fashion_or_random, machine_name

import rhovae.nets.burgess
import rhovae.nets.conv
import rhovae.nets.dcgan
from rhovae.config import RunConfig
from rhovae.data import Data
from rhovae.model import MODELS
from rhovae.runs import eval_mode
from rhovae.train import make_run

EPOCH_IMAGES = 55000
IWAE_IMAGES = 250
CONV_MODULES = (rhovae.nets.conv, rhovae.nets.dcgan, rhovae.nets.burgess)


@contextlib.contextmanager
def layout(name: str):
    """Run the convolutional backbones in ``channels_last`` (rhovae's layout) or plain ``nchw``."""
    saved = [m.channels_last for m in CONV_MODULES]
    if name == "nchw":
        for m in CONV_MODULES:
            m.channels_last = lambda x: x
    try:
        yield
    finally:
        for m, f in zip(CONV_MODULES, saved, strict=True):
            m.channels_last = f


def data_for(model: str, n: int, device) -> tuple[Data, str]:
    return fashion_or_random(n, device, size=MODELS[model].input_size)


def time_cell(cfg: RunConfig, data: Data, device) -> tuple[float, float, float]:
    """(epoch seconds, training GFLOP per epoch, IWAE seconds for IWAE_IMAGES images)."""
    torch.manual_seed(0)
    run = make_run(cfg, data)
    flops = training_flops(run.model, data.train[: cfg.batch_size]) * -(-EPOCH_IMAGES // cfg.batch_size)
    epoch = best_epoch_seconds(run, 1) * EPOCH_IMAGES / len(data.train)
    x = data.test[:1]
    with torch.no_grad(), eval_mode(run.model):
        run.model.iwae_bound(x, 100)  # warm-up
        sync(device)
        start = time.perf_counter()
        run.model.iwae_bound(x, 1000)
        sync(device)
        iwae = (time.perf_counter() - start) * IWAE_IMAGES
    return epoch, flops / 1e9, iwae


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2560, help="training images timed per cell")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS.keys() - {"lstm"}))
    parser.add_argument(
        "--layouts", choices=["both", "channels_last"], default="both", help="also time plain NCHW convs"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = machine_name(device)
    peak = matmul_rate([(1024, 1024, 1024)], device)
    source = ""
    rows = []
    for model in args.models:
        data, source = data_for(model, args.images, device)
        conv = model != "mlp"
        for lay in ("channels_last", "nchw") if conv and args.layouts == "both" else ("channels_last",):
            for posterior in ("diagonal", "ar1"):
                cfg = RunConfig(model=model, posterior=posterior, latent_dim=10, batch_size=128).validate()
                with layout(lay):
                    epoch, gflop, iwae = time_cell(cfg, data, device)
                rows.append((model, data.data_shape, lay if conv else "–", posterior, epoch, gflop, iwae))
                print(f"  {model} {lay} {posterior}: {epoch:.1f} s/epoch", flush=True)
    print(
        f"# seconds per epoch of {EPOCH_IMAGES} images ({source}), scaled from {args.images} timed images; "
        f"batch 128, z = 10, {device.type} ({name}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; float32 matmul rate {peak / 1e9:.1f} GFLOP/s at 1024^3"
    )
    print(
        "| model | input | conv layout | posterior | epoch (s) | GFLOP/epoch | floor (s) | epoch / floor | "
        f"IWAE k=1000, {IWAE_IMAGES} images (s) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for model, shape, lay, posterior, epoch, gflop, iwae in rows:
        floor = gflop * 1e9 / peak
        print(
            f"| {model} | {'×'.join(map(str, shape))} | {lay} | {posterior} | {epoch:.1f} | {gflop:,.0f} | "
            f"{floor:.1f} | {epoch / floor:.2f}× | {iwae:.0f} |"
        )


if __name__ == "__main__":
    main()
