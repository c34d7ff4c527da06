"""Epoch time of the MLP VAE (diagonal vs AR(1) posterior) against the FLOP floor and a DataLoader pipeline.

On Fashion-MNIST-shaped data (random pixels, 60,000 images of 1x28x28 by default), batch 128, Adam:
- rhovae's epoch: the trainer's own inner loop (rhovae.train.train_epoch: data as one device tensor,
  batches sliced from a permutation, a NaN check per step);
- the reference pipeline of the original repository: the same model fed by torch.utils.data.DataLoader
  over a per-image Dataset, loss.item() per step;
- the FLOP floor: the model's training FLOPs per epoch (torch.utils.flop_counter) divided by the float32
  matmul rate measured here at the model's own GEMM shapes (and, for reference, at 1024^3).

    python benchmarks/bench_train.py [--images 60000] [--device cpu] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine_name
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from rhovae.config import RunConfig
from rhovae.data import Data
from rhovae.objectives import batch_loss
from rhovae.train import make_run, train_epoch

SHAPE = (1, 28, 28)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops(model, x) -> int:
    """FLOPs of one forward+backward pass on batch ``x`` (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        batch_loss(model, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rate(shapes, device, seconds=1.0) -> float:
    """FLOP/s of float32 matmuls of the given (m, k, n) shapes, run back to back."""
    mats = [(torch.randn(m, k, device=device), torch.randn(k, n, device=device)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in mats:
        a @ b
    sync(device)
    n_iter, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a, b in mats:
            a @ b
        n_iter += 1
    sync(device)
    return flops * n_iter / (time.perf_counter() - start)


def model_gemm_shapes(model, batch):
    """The GEMMs of one training step of an MLP: forward, input-gradient and weight-gradient."""
    shapes = []
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        k, n = layer.in_features, layer.out_features
        shapes.append((batch, k, n))  # forward
        shapes.append((k, batch, n))  # weight gradient
        if i != 0:  # no gradient for the input images
            shapes.append((batch, n, k))
    return shapes


class PerImage(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def dataloader_epoch(model, optimizer, x, batch_size, seed):
    loader = DataLoader(
        PerImage(x), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model.train()
    total = 0.0
    start = time.perf_counter()
    for xb in loader:
        loss = batch_loss(model, xb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60000, help="training images per epoch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per cell (the minimum is shown)")
    parser.add_argument("--latent", type=int, nargs="+", default=[10, 64])
    args = parser.parse_args()
    device = torch.device(args.device)
    name = machine_name(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((args.images, *SHAPE), generator=g).to(device)
    data = Data(x, x[:1000], x[:1000], "continuous", "random pixels", "synthetic")
    print(
        f"# MLP VAE epoch on {args.images} Fashion-MNIST-shaped images, batch 128, {device.type} ({name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    peak = matmul_rate([(1024, 1024, 1024)], device)
    print(f"float32 matmul rate: {peak / 1e9:.1f} GFLOP/s at 1024^3")
    print(
        "| z | posterior | epoch (s) | samples/s | GFLOP/epoch | floor (s) | epoch / floor | vs diagonal | "
        "DataLoader epoch (s) | DataLoader / rhovae |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for z in args.latent:
        times = {}
        for posterior in ("diagonal", "ar1"):
            cfg = RunConfig(posterior=posterior, latent_dim=z, batch_size=128, epochs=1)
            torch.manual_seed(0)
            run = make_run(cfg.validate(), data)
            model, optimizer = run.model, run.optimizer
            flops_step = training_flops(model, x[:128])
            steps = -(-args.images // 128)
            rate = matmul_rate(model_gemm_shapes(model, 128), device)
            floor = flops_step * steps / rate
            best = min(train_epoch(run, 1)["epoch_seconds"] for _ in range(args.repeats))
            times[posterior] = best
            loader = "– | –"
            if posterior == "ar1":  # the same model and optimizer, fed the original repository's way
                ref = min(dataloader_epoch(model, optimizer, x, 128, r) for r in range(args.repeats))
                loader = f"{ref:.2f} | {ref / best:.2f}×"
            ratio = f"{best / times['diagonal']:.2f}×"
            print(
                f"| {z} | {posterior} | {best:.2f} | {args.images / best:,.0f} | "
                f"{flops_step * steps / 1e9:.1f} | {floor:.2f} | {best / floor:.2f}× | {ratio} | {loader} |",
                flush=True,
            )
            print(f"  (matmul rate at this model's GEMM shapes: {rate / 1e9:.1f} GFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
