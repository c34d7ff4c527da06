"""Training: the loop, atomic checkpoints, metrics, pictures, resume.

A run folder holds ``config.toml`` (resolved), ``metrics.csv``, ``last.pt`` (every epoch), ``best.pt``
(on validation improvement), ``samples.png``, ``reconstructions.png`` and ``loss_curves.png``.
Only rank 0 writes (``torch.distributed`` aware); no global state is left changed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import rhovae
from rhovae.config import RESUMABLE_FIELDS, RunConfig, from_dict, to_toml
from rhovae.data import Data, batches, load_data
from rhovae.errors import RhovaeError
from rhovae.evaluate import elbo_terms
from rhovae.model import MODELS, VAE, build_model
from rhovae.objectives import Objective, objective_from_config

log = logging.getLogger(__name__)

__all__ = ["TrainingDiverged", "TrainResult", "load_run", "pick_device", "save_atomic", "train"]

CHECKPOINT_FORMAT = 1
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


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be a device torch can use."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RhovaeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RhovaeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def versions() -> dict[str, str]:
    return {
        "rhovae": rhovae.__version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RhovaeError(f"{path}: no checkpoint here; train first (rhovae train --run-dir ...)") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise RhovaeError(f"{path}: unreadable checkpoint ({type(e).__name__}); it may be corrupt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RhovaeError(f"{path}: not a rhovae checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> tuple[VAE, RunConfig, dict]:
    """Rebuild the model of a run folder from ``best.pt`` (or ``last.pt``), in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RhovaeError(f"{run_dir}: no such run folder")
    ckpt = load_checkpoint(run_dir / f"{which}.pt")
    cfg = from_dict(ckpt["config"], where=f"{run_dir / which}.pt")
    model = build_model(cfg, tuple(ckpt["image_shape"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise RhovaeError(f"{run_dir / which}.pt does not fit its config: {first}") from None
    model.to(pick_device(device)).eval()
    return model, cfg, ckpt


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused kernel where this torch and device have it (25% off a CPU epoch of the MLP)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def prepare_data(cfg: RunConfig, device: torch.device) -> Data:
    """The run's data on ``device``, resized to what its model takes."""
    size = MODELS[cfg.model].input_size
    return load_data(
        cfg.dataset, cfg.data_dir or None, cfg.pixels, cfg.val_size, device, cfg.limit or None, size
    )


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


def _check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> dict[str, Any] | None:
    """Refuse to mix runs; return the checkpoint to resume from, if any."""
    config_file = run_dir / "config.toml"
    if not config_file.exists():
        if resume:
            raise RhovaeError(
                f"{run_dir}: nothing to resume (no config.toml); drop --resume to start a new run"
            )
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RhovaeError(
                f"{run_dir}: folder is not empty and holds no rhovae run; choose another --run-dir"
            )
        return None
    from rhovae.config import load_config

    saved = load_config(config_file)
    differ = [
        k for k, v in cfg.to_dict().items() if k not in RESUMABLE_FIELDS and saved.to_dict().get(k) != v
    ]
    if differ:
        details = ", ".join(f"{k}: {saved.to_dict()[k]!r} -> {cfg.to_dict()[k]!r}" for k in differ)
        raise RhovaeError(f"{run_dir} holds a different run ({details}); choose another --run-dir")
    if not resume:
        raise RhovaeError(
            f"{run_dir} already holds this run; pass --resume to continue it, or another --run-dir"
        )
    if not (run_dir / "last.pt").exists():
        return None
    return load_checkpoint(run_dir / "last.pt")


def _rng_state(shuffle: torch.Generator, pixels: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(), "pixels": pixels.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(
    state: dict, shuffle: torch.Generator, pixels: torch.Generator, device: torch.device
) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    pixels.set_state(state["pixels"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _diverged(epoch: int, step: int, out, extras: dict, run_dir: Path, last_epoch: int) -> TrainingDiverged:
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
    kept = (
        f"last good checkpoint {run_dir / 'last.pt'} (epoch {last_epoch})"
        if last_epoch
        else "no epoch finished"
    )
    return TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}: {term}; {kept}; try a lower --lr"
    )


def train(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True, data: Data | None = None
) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume``, continue from ``last.pt`` exactly."""
    cfg.validate()
    run_dir = Path(run_dir)
    ckpt = _check_run_dir(run_dir, cfg, resume)
    device = pick_device(cfg.device)
    main = is_main_process()
    if data is None:
        data = prepare_data(cfg, device)
    log.info(
        "data: %s (%s), train %d / val %d / test %d, pixels %s",
        data.name,
        data.source,
        len(data.train),
        len(data.val),
        len(data.test),
        data.pixels,
    )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(run_dir / "config.toml", to_toml(cfg))

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data.image_shape).to(device)
        optimizer = make_optimizer(model, cfg.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
        )
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        pixel_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        history: list[dict[str, float]] = []
        best_val, best_epoch, start_epoch, stale = math.inf, 0, 1, 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"], shuffle_gen, pixel_gen, device)
            history = list(ckpt["history"])
            best_val, best_epoch, stale = ckpt["best_val"], ckpt["best_epoch"], ckpt["stale"]
            start_epoch = ckpt["epoch"] + 1
            log.info("resuming %s from epoch %d", run_dir, ckpt["epoch"])
        writer = _tensorboard(run_dir) if main else None
        objective = objective_from_config(cfg)
        stopped_early = False
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.early_stopping and stale >= cfg.early_stopping:
                stopped_early = True
                break
            row = _train_epoch(
                model,
                optimizer,
                objective,
                data,
                cfg,
                epoch,
                shuffle_gen,
                pixel_gen,
                progress,
                run_dir,
                history[-1]["epoch"] if history else 0,
            )
            for split in ("val", "test"):
                terms = elbo_terms(model, getattr(data, split), objective=objective)
                row.update(
                    {f"{split}_{k}": v for k, v in terms.items() if k in ("loss", "recon", "kl", "mmd")}
                )
            row["lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step(row["val_loss"])
            improved = row["val_loss"] < best_val
            if improved:
                best_val, best_epoch, stale = row["val_loss"], epoch, 0
            else:
                stale += 1
            history.append(row)
            if main:
                _save_epoch(
                    run_dir,
                    model,
                    optimizer,
                    scheduler,
                    cfg,
                    data,
                    epoch,
                    history,
                    best_val,
                    best_epoch,
                    stale,
                    improved,
                    _rng_state(shuffle_gen, pixel_gen, device),
                )
                if writer is not None:
                    for key, value in row.items():
                        if key != "epoch":
                            writer.add_scalar(key, value, epoch)
            log.info(
                "epoch %d: train %.3f val %.3f test %.3f (%.1fs)",
                epoch,
                row["train_loss"],
                row["val_loss"],
                row["test_loss"],
                row["epoch_seconds"],
            )
        if writer is not None:
            writer.close()
    return TrainResult(run_dir, history, best_epoch, best_val, stopped_early)


def _train_epoch(
    model: VAE,
    optimizer,
    objective: Objective,
    data: Data,
    cfg: RunConfig,
    epoch: int,
    shuffle_gen,
    pixel_gen,
    progress: bool,
    run_dir: Path,
    last_epoch: int,
) -> dict[str, float]:
    model.train()
    x_train = data.train_epoch(pixel_gen)
    n_batches = math.ceil(len(x_train) / cfg.batch_size)
    sums = torch.zeros(5, dtype=torch.float64, device=x_train.device)  # loss, recon, kl, |rho|, mmd
    has_rho = False
    bar = _progress(n_batches, f"epoch {epoch}/{cfg.epochs}", progress)
    start = time.perf_counter()
    for step, xb in enumerate(batches(x_train, cfg.batch_size, shuffle_gen), start=1):
        # training progress for the KL warm-up, in the unit the config counts
        done = (epoch - 1) * n_batches + step - 1
        objective.progress = done if cfg.kl_warmup_unit == "steps" else done / n_batches
        out = model(xb)
        loss, extras = objective(out, model)
        loss_value = float(loss.detach())  # one sync per step: also the NaN check
        if not math.isfinite(loss_value):
            if bar is not None:
                bar.close()
            raise _diverged(epoch, step, out, extras, run_dir, last_epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            rho = getattr(out.q, "rho", None)  # AR(1) posteriors report their correlation
            has_rho = rho is not None
            sums += torch.stack(
                [
                    loss.detach() * len(xb),
                    out.recon.sum(),
                    out.kl.sum(),
                    rho.abs().sum() if rho is not None else out.loss.new_zeros(()),
                    extras["mmd"].detach() * len(xb) if "mmd" in extras else out.loss.new_zeros(()),
                ]
            ).double()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == n_batches:
                bar.set_postfix(loss=f"{loss_value:.2f}")
    if x_train.device.type == "cuda":
        torch.cuda.synchronize(x_train.device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    n = len(x_train)
    s = (sums / n).tolist()
    row = {
        "epoch": epoch,
        "train_loss": s[0],
        "train_recon": s[1],
        "train_kl": s[2],
        "epoch_seconds": seconds,
        "samples_per_second": n / seconds,
    }
    row["mean_abs_rho"] = s[3] if has_rho else float("nan")
    if objective.kind == "infovae":
        row["train_mmd"] = s[4]
    row["beta"] = objective.kl_weight()
    return row


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        log.debug("tensorboard not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _save_epoch(
    run_dir: Path,
    model: VAE,
    optimizer,
    scheduler,
    cfg: RunConfig,
    data: Data,
    epoch: int,
    history: list[dict],
    best_val: float,
    best_epoch: int,
    stale: int,
    improved: bool,
    rng: dict,
) -> None:
    common = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "versions": versions(),
        "image_shape": list(data.image_shape),
        "epoch": epoch,
    }
    model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if improved:
        save_atomic({**common, "model": model_state, "val_loss": best_val}, run_dir / "best.pt")
    save_atomic(
        {
            **common,
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "history": history,
            "best_val": best_val,
            "best_epoch": best_epoch,
            "stale": stale,
        },
        run_dir / "last.pt",
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    _write_text_atomic(run_dir / "metrics.csv", buf.getvalue())
    if cfg.pictures:
        from rhovae.plots import save_image_grid, save_loss_curves

        model.eval()  # no batch statistics in pictures; the next epoch switches back
        save_image_grid(model.sample_images(64, seed=cfg.seed), run_dir / "samples.png", nrow=8)
        x = data.test[:32]
        pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
        save_image_grid(pairs, run_dir / "reconstructions.png", nrow=16)
        save_loss_curves(
            history,
            run_dir / "loss_curves.png",
            title=f"{cfg.model} / {cfg.posterior} on {cfg.dataset}, d={cfg.latent_dim}",
        )
