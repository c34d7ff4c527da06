"""Training: the loop, read top to bottom. Run-folder I/O lives in :mod:`rhovae.runs`.

``train(cfg, run_dir)`` writes ``config.toml``, then per epoch ``metrics.csv``, ``last.pt``, ``best.pt``
(on validation improvement) and pictures. ``resume=True`` continues from ``last.pt`` and gives the
numbers an uninterrupted run would. A non-finite loss stops training with the last good checkpoint
kept. One process, one device.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rhovae.config import RunConfig, to_toml
from rhovae.data import Data
from rhovae.errors import RhovaeError
from rhovae.evaluate import elbo_terms
from rhovae.model import VAE, VAEOutput, build_model, check_networks
from rhovae.objectives import Objective, objective_from_config
from rhovae.posteriors import posterior_statistics
from rhovae.runs import (
    CHECKPOINT_FORMAT,
    RunLock,
    check_run_dir,
    pick_device,
    prepare_data,
    save_atomic,
    versions,
    write_text_atomic,
)

log = logging.getLogger(__name__)

__all__ = [
    "METRIC_FIELDS",
    "Run",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "make_optimizer",
    "make_run",
    "train",
    "train_epoch",
]

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_recon",
    "train_kl",
    "val_loss",
    "val_recon",
    "val_kl",
    "test_loss",
    "test_recon",
    "test_kl",
    "train_mmd",
    "val_mmd",
    "test_mmd",
    "mean_abs_rho",
    "beta",
    "lr",
    "epoch_seconds",
    "samples_per_second",
]


class TrainingDiverged(RhovaeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where training stands after ``epoch`` finished epochs: what resume restores besides weights."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = 0
    stale: int = 0  # epochs since the validation loss last improved

    def record(self, row: dict[str, float]) -> bool:
        """Add a finished epoch's metrics; True when its validation loss is the best so far."""
        self.epoch = int(row["epoch"])
        self.history.append(row)
        improved = row["val_loss"] < self.best_val
        if improved:
            self.best_val, self.best_epoch, self.stale = row["val_loss"], self.epoch, 0
        else:
            self.stale += 1
        return improved


@dataclass
class Run:
    """Everything one training run holds while it trains."""

    cfg: RunConfig
    run_dir: Path
    model: VAE
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Objective
    data: Data
    shuffle: torch.Generator  # the order of examples (CPU)
    pixels: torch.Generator  # dynamic binarisation (on the data's device)
    state: TrainState = field(default_factory=TrainState)
    progress: bool = False

    def rng_state(self) -> dict[str, Tensor]:
        state = {
            "torch": torch.get_rng_state(),
            "shuffle": self.shuffle.get_state(),
            "pixels": self.pixels.get_state(),
        }
        if self.data.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.data.device)
        return state

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        self.shuffle.set_state(state["shuffle"])
        self.pixels.set_state(state["pixels"])
        if self.data.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.data.device)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused kernel where this torch and device have it (25% off a CPU epoch of the MLP)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data: Data | None = None,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume``, continue from ``last.pt`` exactly.

    ``data`` replaces the dataset the config names (already on its device); ``encoder``/``decoder``
    replace the backbone's networks (``cfg.model == "custom"``).
    """
    cfg.validate(custom_networks=encoder is not None, python_data=data is not None)
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RhovaeError(f"{run_dir}: is a file; choose a folder for --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RhovaeError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    with RunLock(run_dir):
        ckpt = check_run_dir(run_dir, cfg, resume)
        if ckpt is not None and cfg.epochs < ckpt["epoch"]:
            raise RhovaeError(
                f"{run_dir} has already trained {ckpt['epoch']} epochs; --epochs must be at least that"
            )
        device = pick_device(cfg.device)
        if data is None:
            data = prepare_data(cfg, device)
        log.info(
            "data: %s (%s), train %d / val %d / test %d, shape %s, pixels %s",
            data.name, data.source, len(data.train), len(data.val), len(data.test),
            data.data_shape, data.pixels,
        )  # fmt: skip
        write_text_atomic(run_dir / "config.toml", to_toml(cfg))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            run = make_run(cfg, data, run_dir, encoder, decoder, progress)
            if ckpt is not None:
                _restore(run, ckpt)
            return _loop(run)


def make_run(
    cfg: RunConfig,
    data: Data,
    run_dir: str | Path = ".",
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    progress: bool = False,
) -> Run:
    """A fresh run of ``cfg`` on ``data`` (model, optimiser, schedule, objective, generators) on the
    data's device, seeded by the caller; what :func:`train` steps through, and what benchmarks time."""
    device = data.device
    model = build_model(cfg, data.data_shape, encoder=encoder, decoder=decoder, meta=data.meta).to(device)
    model.preprocessing = data.preprocessing
    if encoder is not None:
        check_networks(model, data.train[: min(2, len(data.train))])
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    return Run(
        cfg,
        Path(run_dir),
        model,
        optimizer,
        scheduler,
        objective_from_config(cfg),
        data,
        shuffle=torch.Generator().manual_seed(cfg.seed),
        pixels=torch.Generator(device=device).manual_seed(cfg.seed + 1),
        progress=progress,
    )


def _restore(run: Run, ckpt: dict[str, Any]) -> None:
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RhovaeError(
            f"{run.run_dir / 'last.pt'} does not fit this run: {first}; start a new --run-dir"
        ) from None
    run.state = TrainState(
        int(ckpt["epoch"]), list(ckpt["history"]), ckpt["best_val"], ckpt["best_epoch"], ckpt["stale"]
    )
    log.info("resuming %s from epoch %d", run.run_dir, run.state.epoch)


def _loop(run: Run) -> TrainResult:
    cfg, state = run.cfg, run.state
    stopped_early = False
    writer = _tensorboard(run.run_dir)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if cfg.early_stopping and state.stale >= cfg.early_stopping:
            stopped_early = True
            break
        row = train_epoch(run, epoch)
        for split in ("val", "test"):
            terms = elbo_terms(run.model, getattr(run.data, split), objective=run.objective)
            row.update({f"{split}_{k}": v for k, v in terms.items() if k in ("loss", "recon", "kl", "mmd")})
        row["lr"] = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step(row["val_loss"])
        improved = state.record(row)
        _save_epoch(run, improved)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
        log.info(
            "epoch %d: train %.3f val %.3f test %.3f (%.1fs)",
            epoch, row["train_loss"], row["val_loss"], row["test_loss"], row["epoch_seconds"],
        )  # fmt: skip
    if writer is not None:
        writer.close()
    return TrainResult(run.run_dir, state.history, state.best_epoch, state.best_val, stopped_early)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        log.debug("tensorboard not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _Totals:
    """Running sums of per-epoch figures, kept on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def means(self, n: int) -> dict[str, float]:
        if not self.sums:
            return {}
        names = list(self.sums)
        values = (torch.stack([self.sums[k] for k in names]) / n).tolist()  # one sync
        return dict(zip(names, values, strict=True))


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training split; returns the epoch's metrics row (per-sample means)."""
    cfg, model, objective, data = run.cfg, run.model, run.objective, run.data
    model.train()
    n = len(data.train)
    n_batches = math.ceil(n / cfg.batch_size)
    totals = _Totals()
    bar = _progress(n_batches, f"epoch {epoch}/{cfg.epochs}", run.progress)
    start = time.perf_counter()
    for step, xb in enumerate(data.train_batches(cfg.batch_size, run.shuffle, run.pixels), start=1):
        # training progress for the KL warm-up, in the unit the config counts
        done = (epoch - 1) * n_batches + step - 1
        objective.progress = done if cfg.kl_warmup_unit == "steps" else done / n_batches
        out = model(xb)
        loss, extras = objective(out, model)
        loss_value = float(loss.detach())  # one sync per step: also the NaN check
        if not math.isfinite(loss_value):
            if bar is not None:
                bar.close()
            raise _diverged(epoch, step, out, extras, run)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        b = len(xb)
        totals.add("train_loss", loss * b)
        totals.add("train_recon", out.recon.sum())
        totals.add("train_kl", out.kl.sum())
        for name, value in extras.items():
            totals.add(f"train_{name}", value * b)
        for name, value in posterior_statistics(out.q).items():
            if name == "rho":  # AR(1) posteriors
                totals.add("mean_abs_rho", value.abs().sum())
            elif name.startswith("kl_group_"):  # latent hierarchies: the KL of each group
                totals.add(f"train_{name}", value.detach().sum())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == n_batches:
                bar.set_postfix(loss=f"{loss_value:.2f}")
    if data.device.type == "cuda":
        torch.cuda.synchronize(data.device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    row: dict[str, float] = {"epoch": epoch, "mean_abs_rho": float("nan"), **totals.means(n)}
    row.update(epoch_seconds=seconds, samples_per_second=n / seconds, beta=objective.kl_weight())
    return row


def _diverged(epoch: int, step: int, out: VAEOutput, extras: dict, run: Run) -> TrainingDiverged:
    recon, kl = out.recon.detach(), out.kl.detach()
    if not torch.isfinite(recon).all():
        term = f"the reconstruction term is {float(recon[~torch.isfinite(recon)][0])}"
    elif not torch.isfinite(kl).all():
        term = f"the KL term is {float(kl[~torch.isfinite(kl)][0])}"
    elif any(not torch.isfinite(v).all() for v in extras.values()):
        name = next(k for k, v in extras.items() if not torch.isfinite(v).all())
        term = f"the {name} term is not finite"
    else:
        term = "the loss is not finite"
    last = run.state.epoch
    kept = f"last good checkpoint {run.run_dir / 'last.pt'} (epoch {last})" if last else "no epoch finished"
    return TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {term}; {kept}; try a lower --lr"
    )


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _save_epoch(run: Run, improved: bool) -> None:
    cfg, state, data = run.cfg, run.state, run.data
    common = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "versions": versions(),
        "data_shape": list(data.data_shape),
        "preprocessing": data.preprocessing.to_dict(),
        "data_meta": data.meta,
        "epoch": state.epoch,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
    }
    if improved:
        save_atomic({**common, "val_loss": state.best_val}, run.run_dir / "best.pt")
    save_atomic(
        {
            **common,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": run.rng_state(),
            "history": state.history,
            "best_val": state.best_val,
            "best_epoch": state.best_epoch,
            "stale": state.stale,
        },
        run.run_dir / "last.pt",
    )
    buf = io.StringIO()
    extra = sorted({k for row in state.history for k in row} - set(METRIC_FIELDS))  # e.g. per-group KLs
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra, extrasaction="ignore")
    w.writeheader()
    for row in state.history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(run.run_dir / "metrics.csv", buf.getvalue())
    if cfg.pictures:
        from rhovae.plots import save_loss_curves, save_pictures

        save_pictures(run.model, data, run.run_dir, seed=cfg.seed)
        title = f"{cfg.model} / {cfg.posterior} on {data.name}, d={cfg.latent_dim}"
        save_loss_curves(state.history, run.run_dir / "loss_curves.png", title=title)
