"""Pictures: image grids (PNG, no torchvision needed) and loss curves (matplotlib)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["image_grid", "is_image_shape", "save_image_grid", "save_loss_curves", "save_pictures"]

#: the most images one grid holds; a larger request is refused rather than writing a giant PNG
MAX_GRID_IMAGES = 4096


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """True for ``(C, H, W)`` with 1 or 3 channels: data that pictures can show."""
    return len(shape) == 3 and shape[0] in (1, 3)


def is_frame_shape(shape: tuple[int, ...]) -> bool:
    """True for sequences of pictures ``(T, C, H, W)``."""
    return len(shape) == 4 and is_image_shape(shape[1:])


def save_pictures(model, data, run_dir: Path, seed: int = 0) -> list[Path]:
    """``samples.png`` (64 prior samples) and ``reconstructions.png`` (32 test examples beside their
    reconstructions) for image data, written in eval mode; the frames model's pictures
    (:func:`save_frame_pictures`) for frame sequences; nothing for other data."""
    import torch

    if "vocab" in data.meta:
        return save_sequence_text(model, data, run_dir, seed)
    if is_frame_shape(tuple(data.data_shape)):
        return save_frame_pictures(model, data, run_dir, seed)
    if not is_image_shape(tuple(data.data_shape)):
        return []
    was_training = model.training
    model.eval()
    try:
        samples = save_image_grid(model.sample(64, seed=seed), Path(run_dir) / "samples.png", nrow=8)
        x = data.test[: min(32, len(data.test))]
        pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
        recons = save_image_grid(pairs, Path(run_dir) / "reconstructions.png", nrow=16)
    finally:
        model.train(was_training)
    return [samples, recons]


#: the colour missing values are drawn in (RGB)
MISSING_COLOUR = (0.85, 0.1, 0.1)


def save_frame_pictures(model, data, run_dir: Path, seed: int = 0, n: int = 4) -> list[Path]:
    """The frames model's pictures, in eval mode, for ``n`` test sequences (one frame per column):

    - ``imputation.png``: per sequence three rows: the complete frames (where known, else the observed
      values), the observed values with missing ones in red, and the imputation (the mean of p(x|z) at
      the posterior mean, every value);
    - ``trajectories.png``: the posterior trajectories of the first sequence, mean ± 2 standard
      deviations over time for up to 6 channels;
    - ``samples.png``: 8 sequences decoded from prior draws (rows).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    run_dir = Path(run_dir)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = data.test[: min(n, len(data.test))]
            truth = data.truth.get("test")
            full = truth[: len(x)] if truth is not None else x.nan_to_num(0.0)
            q = model.posterior(x)
            imputed = model.decode(q.mean).mean
            frames = x.shape[1]
            missing = x.isnan()
            rgb = lambda v: v.expand(*v.shape[:2], 3, *v.shape[-2:])  # noqa: E731 - grey or RGB frames
            shown = rgb(x.nan_to_num(0.0)).clone()
            red = torch.tensor(MISSING_COLOUR, device=x.device).view(3, 1, 1).expand_as(shown)
            shown = torch.where(rgb(missing.to(x.dtype)) > 0, red, shown)
            rows = torch.stack([rgb(full), shown, rgb(imputed)], dim=1)  # (n, 3, T, 3, H, W)
            written = [save_image_grid(rows.flatten(0, 2), run_dir / "imputation.png", nrow=frames)]
            loc, sd = q.mean[0].cpu(), q.variance[0].sqrt().cpu()  # (C, T)
            samples = model.sample(8, seed=seed)
        written.append(save_image_grid(rgb(samples).flatten(0, 1), run_dir / "samples.png", nrow=frames))
    finally:
        model.train(was_training)
    fig, ax = plt.subplots(figsize=(7, 4))
    t = np.arange(loc.shape[1])
    for c in range(min(6, loc.shape[0])):
        (line,) = ax.plot(t, loc[c].numpy(), marker="o", ms=3, label=f"channel {c}")
        ax.fill_between(t, (loc[c] - 2 * sd[c]).numpy(), (loc[c] + 2 * sd[c]).numpy(), alpha=0.2,
                        color=line.get_color())  # fmt: skip
    ax.set_xlabel("frame t")
    ax.set_ylabel("z (posterior mean ± 2 sd)")
    ax.set_title("posterior trajectories of test sequence 0")
    ax.legend(fontsize=7, ncol=3)
    written.append(save_figure(fig, run_dir / "trajectories.png"))
    return written


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


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure laid out, written atomically as a PNG (:func:`_atomic_png`, 100 dpi) and
    closed; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        _atomic_png(path, lambda p: fig.savefig(p, dpi=100))
    finally:
        plt.close(fig)
    return path


def _atomic_png(path: Path, writer) -> None:
    """``writer(tmp_path)`` into a unique temporary file beside ``path``, then rename: a picture is
    whole or absent; on any failure the temporary file is removed and the error is one line."""
    from rhovae.runs import _file_mode, _write_failed, temporary_beside

    path = Path(path)
    try:
        fd, tmp = temporary_beside(path, suffix=path.suffix or ".tmp")
        os.close(fd)
    except OSError as e:
        raise _write_failed(path, e) from None
    try:
        writer(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_failed(path, e) from None
        raise


def save_sequence_text(model, data, run_dir: Path, seed: int = 0) -> list[Path]:
    """``samples.txt`` (32 greedy decodes of z ~ p(z)) and ``reconstructions.txt`` (16 test sequences,
    each beside the greedy decode at its posterior mean), one per line, in the set's own notation."""
    from rhovae.data.sequences import SequenceVocab, to_text

    vocab = SequenceVocab.from_dict(data.meta["vocab"])
    was_training = model.training
    model.eval()
    try:
        samples = model.sample(32, seed=seed)
        x = data.test[: min(16, len(data.test))]
        recon = model.reconstruct(x)
    finally:
        model.train(was_training)
    out = []
    for name, lines in (
        ("samples.txt", [to_text(s, vocab) for s in samples]),
        (
            "reconstructions.txt",
            [f"{to_text(a, vocab)}  ->  {to_text(b, vocab)}" for a, b in zip(x, recon, strict=True)],
        ),
    ):
        path = Path(run_dir) / name
        _atomic_text(path, "\n".join(lines) + "\n")
        out.append(path)
    return out


def _atomic_text(path: Path, text: str) -> None:
    _atomic_png(path, lambda p: Path(p).write_text(text))


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``images (N, C, H, W)`` as a PNG grid; grey-scale when C = 1."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if len(images) > MAX_GRID_IMAGES:
        from rhovae.errors import RhovaeError

        raise RhovaeError(f"{path}: at most {MAX_GRID_IMAGES} images fit one grid, got {len(images)}")
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
    return save_figure(fig, path)


def explore(model, data, out_dir: str | Path, seed: int = 0, n_steps: int = 9) -> list[Path]:
    """The pictures people expect from a trained VAE, written into ``out_dir``:

    - ``traversals.png``: rows are latent dimensions; each sweeps its coordinate over ``±3`` standard
      deviations of the test split's posterior means around one test example's posterior mean (other
      coordinates fixed), ``n_steps`` columns;
    - ``interpolations.png``: 8 pairs of test examples, linear paths between their posterior means;
    - ``latent_pca.png``: the test split's posterior means on their two principal axes, coloured by
      label when the data has labels;
    - for frame sequences: the frames model's pictures (:func:`save_frame_pictures`);
    - for a latent map ``(C, H, W)``: ``channel_means.png``, the posterior mean map of every channel
      (columns) for 8 test examples (rows), each map scaled to its own range; the traversals then
      sweep the centre position of each channel (rows are channels).

    Traversals and interpolations need image data; the PCA is drawn for any data.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    from rhovae.data import batches

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from rhovae.errors import RhovaeError

        raise RhovaeError(f"cannot create {out}: {e.strerror}") from None
    model.eval()
    test = data.test
    with torch.no_grad():
        means = torch.cat([model.posterior(xb).mean for xb in batches(test, 1000)])
    g = torch.Generator().manual_seed(seed)
    written = []
    shape = tuple(means.shape[1:])  # (d,), or (C, H, W) for a latent map
    means = means.flatten(1)
    d = means.shape[1]
    if len(shape) == 3:  # a latent map: each channel's mean map, traversals of the centre position
        written.append(_channel_means(means.view(-1, *shape), out / "channel_means.png", g))
        c, h, w = shape
        traversed = [k * h * w + (h // 2) * w + w // 2 for k in range(c)]
    else:
        traversed = list(range(d))
    if is_frame_shape(tuple(data.data_shape)):
        written.extend(save_frame_pictures(model, data, out, seed))
    if is_image_shape(tuple(data.data_shape)):
        sd = means.std(0) if len(means) > 1 else torch.ones(d, device=means.device)
        anchor = means[int(torch.randint(len(means), (1,), generator=g))]
        steps = torch.linspace(-3, 3, n_steps, device=means.device)
        z = anchor.repeat(len(traversed), n_steps, 1)  # (rows, steps, d)
        for row, j in enumerate(traversed):
            z[row, :, j] = anchor[j] + steps * sd[j]
        with torch.no_grad():
            images = model.decode(z.reshape(len(traversed) * n_steps, *shape)).mean
        written.append(save_image_grid(images, out / "traversals.png", nrow=n_steps))
        pairs = torch.randint(len(means), (8, 2), generator=g)
        t = torch.linspace(0, 1, n_steps, device=means.device)[None, :, None]
        a, b = means[pairs[:, 0]][:, None], means[pairs[:, 1]][:, None]
        with torch.no_grad():
            images = model.decode(((1 - t) * a + t * b).reshape(-1, *shape)).mean
        written.append(save_image_grid(images, out / "interpolations.png", nrow=n_steps))
    m = means.double().cpu()
    m = m - m.mean(0)
    if m.shape[1] >= 2 and len(m) >= 2:
        _, _, v = torch.linalg.svd(m, full_matrices=False)
        xy = (m @ v[:2].T).numpy()
    else:
        xy = np.stack([m[:, 0].numpy(), np.zeros(len(m))], axis=1)
    fig, ax = plt.subplots(figsize=(6, 5))
    labels = getattr(data, "test_labels", None)
    if labels is not None and len(labels) == len(xy):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(labels.cpu()), cmap="tab10", s=4)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=4)
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.set_title(f"posterior means of {len(xy)} test examples")
    written.append(save_figure(fig, out / "latent_pca.png"))
    return written


def _channel_means(maps, path: Path, generator) -> Path:
    """8 test examples' posterior mean maps ``(C, H, W)``, one column per channel, each scaled to [0, 1]."""
    import torch

    picks = torch.randint(len(maps), (min(8, len(maps)),), generator=generator)
    chosen = maps[picks.to(maps.device)].detach().float().cpu()  # (8, C, H, W)
    low = chosen.amin((-2, -1), keepdim=True)
    span = (chosen.amax((-2, -1), keepdim=True) - low).clamp_min(1e-12)
    tiles = ((chosen - low) / span).reshape(-1, 1, *chosen.shape[-2:])
    return save_image_grid(tiles, path, nrow=chosen.shape[1])
