"""Pictures: image grids (PNG, no torchvision needed) and loss curves (matplotlib)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["image_grid", "save_image_grid", "save_loss_curves"]


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> one ``(rows*(H+pad)+pad, cols*(W+pad)+pad, C)`` float array."""
    x = images.detach().float().clamp(0, 1).cpu().numpy()
    n, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    return grid


def _atomic_png(path: Path, writer) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    writer(tmp)
    os.replace(tmp, path)


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``images (N, C, H, W)`` as a PNG grid; grey-scale when C = 1."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow)
    path = Path(path)
    if grid.shape[-1] == 1:
        _atomic_png(path, lambda p: plt.imsave(p, grid[..., 0], cmap="gray", vmin=0, vmax=1))
    else:
        _atomic_png(path, lambda p: plt.imsave(p, grid))
    return path


def save_loss_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Train/validation/test loss per epoch (nats per sample) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss = −log p(x|z) + β·KL  (nats per sample)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    _atomic_png(path, lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)
    return path
