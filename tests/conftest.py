import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest

from rhovae.data import write_idx


def make_images(n: int, size: int, seed: int) -> np.ndarray:
    """Structured uint8 images: a bright rectangle at a random place on a dark background."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        h, w = rng.integers(2, size // 2 + 1, size=2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        images[i, top : top + h, left : left + w] = rng.integers(150, 256)
    return images


def write_idx_dataset(directory, n_train=400, n_test=100, size=12, gz=False):
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", make_images(n_train, size, 0))
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train, dtype=np.uint8) % 10)
    write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", make_images(n_test, size, 1))
    write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test, dtype=np.uint8) % 10)
    return directory


@pytest.fixture
def idx_dir(tmp_path):
    """A small MNIST-like IDX dataset (400 train / 100 test images of 12x12)."""
    return write_idx_dataset(tmp_path / "idx")


def overfit(model, x, steps: int, lr: float):
    """Full-batch Adam on ``x``: the mean loss before and after ``steps`` updates."""
    import torch

    from rhovae.objectives import batch_loss

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        start = float(batch_loss(model, x))
    for _ in range(steps):
        loss = batch_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(batch_loss(model, x))
    return start, end


def train_argv(run_dir, *flags: str, data: tuple[str, ...] = ()) -> list[str]:
    """``rhovae train`` arguments for a quiet, quick CPU run into ``run_dir``; ``flags`` may be given as
    whole strings ("--latent-dim 3 --epochs 1"), ``data`` names the dataset flags."""
    words = [w for f in flags for w in f.split()]
    return ["-q", "train", *data, "--device", "cpu", "--run-dir", str(run_dir), "--no-progress", *words]


def toy_experiment(idx_dir, seeds=(0,), **run):
    """A two-run grid (mlp, diagonal vs ar1) on the small IDX files, for compare tests."""
    from rhovae.experiments import Experiment

    return Experiment(
        name="toy",
        grid={"model": ["mlp"], "dataset": ["mnist"], "posterior": ["diagonal", "ar1"], "seed": list(seeds)},
        run={
            "data_dir": str(idx_dir),
            "val_size": 100,
            "latent_dim": 3,
            "hidden": 16,
            "epochs": 1,
            "batch_size": 100,
            "device": "cpu",
            "pictures": True,
            **run,
        },
        iwae_k=5,
    )
