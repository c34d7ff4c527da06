"""Training: the loop, read top to bottom. Run-folder I/O lives in :mod:`rhovae.runs`.

``train(cfg, run_dir)`` writes ``config.toml``, then per epoch ``metrics.csv``, ``last.pt``, ``best.pt``
(on validation improvement) and pictures. ``resume=True`` continues from ``last.pt`` and gives the
numbers an uninterrupted run would. A non-finite loss stops training with the last good checkpoint
kept.

One process trains on one device. Launched by torchrun (``WORLD_SIZE`` > 1), the same loop trains one
run on several processes with DistributedDataParallel (gloo on CPU, NCCL on CUDA, one GPU per
process; :mod:`rhovae.distributed`):

- ``batch_size`` is the global batch: every rank draws the same seeded permutation each epoch and takes
  its contiguous share, ``batch_size / world`` examples (a batch size the world does not divide is
  refused). Each rank weights its mean loss by its share of the global batch, so the gradient DDP
  averages is the one-process gradient of the global batch, last partial batch included (exactly so for
  the ELBO; the InfoVAE MMD, free bits and the paper-legacy KL are computed per rank's share, as
  BatchNorm statistics are on CPU; on CUDA BatchNorm becomes SyncBatchNorm).
- Each rank draws its own sampling noise (rank 0 seeded as one process is, the others from the seed
  and their rank); the shuffling and binarisation generators are the same on every rank. Training
  metrics are summed over ranks; the per-step NaN check is one all-reduce, so all ranks stop together.
- Rank 0 alone holds the run lock, writes config, metrics, checkpoints and pictures, and evaluates the
  validation and test splits (the figures a one-process run would compute, one code path, at the cost
  of the other ranks waiting); it broadcasts the epoch's row so every rank takes the same schedule and
  early-stopping decisions. ``last.pt`` keeps every rank's random state; every rank resumes from it
  (broadcast from rank 0, so only rank 0 needs the run folder), exactly when the number of processes
  is the same. A rank that dies makes torchrun stop the others; ``resume=True`` then continues.

``precision = "bf16"`` runs the encoder and decoder networks under bfloat16 autocast and casts their
outputs to float32, so posterior heads, distributions, KL, log-determinants and the likelihood compute
in float32; ``compile`` compiles those two networks (:meth:`torch.nn.Module.compile`). On CUDA,
``cudnn.benchmark`` is on while training.
"""

from __future__ import annotations

import contextlib
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

from rhovae import distributed
from rhovae.aggressive import AggressiveTraining
from rhovae.config import RunConfig, to_toml
from rhovae.data import Data, batch_bounds
from rhovae.distributed import SINGLE, Cluster
from rhovae.errors import RhovaeError
from rhovae.evaluate import elbo_terms
from rhovae.model import MODELS, VAE, VAEOutput, build_model, check_networks
from rhovae.objectives import Objective, objective_from_config
from rhovae.posteriors import mean_abs_rho, posterior_statistics
from rhovae.runs import (
    CHECKPOINT_FORMAT,
    RunLock,
    check_run_dir,
    data_fingerprint,
    eval_mode,
    is_rhovae_folder,
    load_checkpoint,
    pick_device,
    prepare_data,
    progress_bar,
    remove_run_files,
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

# paper-legacy runs: their losses are the reference code's objective (labelled in the log and metrics.csv)
LEGACY_LABEL = "paper-legacy objective, NOT an ELBO"

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
    cluster: Cluster = SINGLE  # the processes training this run together (DDP under torchrun)
    step_model: nn.Module | None = None  # what a step calls: the DDP wrapper, or None (the model)
    fingerprint: str = ""  # of the training split (runs.data_fingerprint), recorded in checkpoints
    trackers: list = field(default_factory=list)  # rhovae.trackers.Tracker: TensorBoard, MLflow (rank 0)
    aggressive: AggressiveTraining | None = None  # He et al.'s aggressive phase (cfg.aggressive)

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
    rank: int = 0  # this process's rank under torchrun: rank 0 writes the run folder


def make_optimizer(model: nn.Module | list, lr: float) -> torch.optim.Optimizer:
    """Adam over a module's (or a list of) parameters; the fused kernel where this torch and device
    have it (25% off a CPU epoch of the MLP)."""
    parameters = list(model.parameters() if isinstance(model, nn.Module) else model)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(parameters, lr=lr)


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data: Data | None = None,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    overwrite: bool = False,
    tensorboard: bool = False,
    mlflow: str | None = None,
    mlflow_experiment: str = "rhovae",
) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume``, continue from ``last.pt`` exactly; with
    ``overwrite``, replace the run the folder holds (rhovae's files only).

    ``tensorboard`` writes TensorBoard event files to ``RUN/tensorboard``; ``mlflow`` (a tracking URI,
    see :func:`rhovae.trackers.mlflow_uri`) mirrors the run in MLflow experiment ``mlflow_experiment``
    (:mod:`rhovae.trackers`).

    ``data`` replaces the dataset the config names (already on its device); ``encoder``/``decoder``
    replace the backbone's networks (``cfg.model == "custom"``).
    """
    cfg.validate(custom_networks=encoder is not None, python_data=data is not None)
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        cluster, device = distributed.join(pick_device(cfg.device))
        if cfg.batch_size % cluster.world:
            raise RhovaeError(
                f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
                f"{cluster.world} processes; use a multiple of {cluster.world}"
            )
        if cfg.aggressive and cluster.world > 1:
            raise RhovaeError(
                "aggressive training runs in one process; drop --aggressive or launch one process"
            )
        ckpt = cluster.on_main(lambda: _open_run_dir(cfg, run_dir, resume, stack, overwrite))
        trackers: list = []
        if data is None:
            data = prepare_data(cfg, device)
        elif cluster.world > 1 and isinstance(data.train, Tensor) and data.train.device != device:
            raise RhovaeError(
                f"under torchrun this process trains on {device}; its data is on {data.train.device}"
            )
        if len(data.train) < cluster.world:
            raise RhovaeError(
                f"{len(data.train)} training examples cannot be shared by {cluster.world} processes"
            )
        if cluster.main:
            log.info(
                "data: %s (%s), train %d / val %d / test %d, shape %s, pixels %s",
                data.name, data.source, len(data.train), len(data.val), len(data.test),
                data.data_shape, data.pixels,
            )  # fmt: skip
            if cluster.world > 1:
                share = cfg.batch_size // cluster.world
                log.info(
                    "training on %d processes (%s), %d examples each per step", cluster.world, device, share
                )
        if device.type == "cuda":
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        torch.manual_seed(cfg.seed)
        run = make_run(cfg, data, run_dir, encoder, decoder, progress and cluster.main)
        run.cluster = cluster
        if cluster.main:  # the new run is built: only now may it replace the old one (--overwrite)
            if overwrite and ckpt is None:
                remove_run_files(run_dir)
            write_text_atomic(run_dir / "config.toml", to_toml(cfg))
            from rhovae.trackers import open_trackers

            trackers = open_trackers(run_dir, cfg.to_dict(), tensorboard, mlflow, mlflow_experiment)
            for tracker in trackers:
                stack.callback(tracker.close)
        run.trackers = trackers
        if cluster.main and "vocab" in data.meta and cfg.model in MODELS and not MODELS[cfg.model].likelihood:
            log.warning(  # after the model was built: a model that refuses the data says so instead
                "note: %s is sequence data; the %s model reads each padded one-hot sequence as one "
                "flat vector (--model lstm is the sequence VAE)", data.name, cfg.model,
            )  # fmt: skip
        if cluster.rank:
            torch.manual_seed(distributed.rank_seed(cfg.seed, cluster.rank))
        run.fingerprint = data_fingerprint(data.train)
        if ckpt is not None:
            _restore(run, ckpt)
            if cluster.main:
                _complete_epoch_records(run)
        if cluster.world > 1:
            unused = _unused_parameters(run)
            if unused and cluster.main:
                log.info("parameters without a gradient in this objective: %s", ", ".join(unused))
            run.step_model = distributed.wrap(run.model, cluster, device, bool(unused))
        try:
            return _loop(run)
        finally:
            run.step_model = None  # DDP's reducer goes before the process group does (at exit)


def _open_run_dir(
    cfg: RunConfig, run_dir: Path, resume: bool, stack: contextlib.ExitStack, overwrite: bool = False
) -> dict | None:
    """Create and lock the run folder (for as long as ``stack`` lives), refuse to mix runs, and return
    the checkpoint to resume from, if any. A folder that is not rhovae's is refused before anything
    is written in it (not even the lock)."""
    if run_dir.is_file():
        raise RhovaeError(f"{run_dir}: is a file; choose a folder for --run-dir")
    if run_dir.is_dir() and not is_rhovae_folder(run_dir):
        raise RhovaeError(f"{run_dir}: folder is not empty and holds no rhovae run; choose another --run-dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RhovaeError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    stack.enter_context(RunLock(run_dir))
    if created:  # runs while the lock is still held: a run that failed before writing anything leaves nothing
        stack.callback(_remove_if_unused, run_dir)
    ckpt = check_run_dir(run_dir, cfg, resume, overwrite)
    if ckpt is not None and cfg.epochs < ckpt["epoch"]:
        raise RhovaeError(
            f"{run_dir} has already trained {ckpt['epoch']} epochs; --epochs must be at least that"
        )
    return ckpt


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run folder this process created when it holds nothing but its lock file."""
    with contextlib.suppress(OSError):
        if {p.name for p in run_dir.iterdir()} <= {".lock"}:
            (run_dir / ".lock").unlink(missing_ok=True)
            run_dir.rmdir()


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
    if cfg.precision == "bf16":
        _autocast_networks(model, device)
    if cfg.compile:
        for net in (model.encoder, model.decoder):
            net.compile()  # in place: parameter names and checkpoints stay as they are
    run = Run(
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
    if cfg.aggressive:
        run.aggressive = AggressiveTraining(model, make_optimizer, cfg.lr, cfg.seed)
    return run


def _autocast_networks(model: VAE, device: torch.device) -> None:
    """Run ``model``'s encoder and decoder networks under bfloat16 autocast, their outputs cast back to
    float32: the matrix products of the networks are where lower precision pays, while the posterior
    math, the KL, log-determinants and the likelihood stay in float32 (sums of many small terms)."""
    if device.type not in ("cpu", "cuda"):
        raise RhovaeError(f"precision bf16 runs on cpu or cuda, not {device.type}; use --precision fp32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RhovaeError(f"{torch.cuda.get_device_name(device)} has no bfloat16; use --precision fp32")
    for net in (model.encoder, model.decoder):
        # an instance attribute, so parameter names, checkpoints and the class stay untouched
        net.forward = _autocast_forward(net.forward, device.type)


def _autocast_forward(forward, device_type: str):
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return _float32(out)

    return autocast_forward


def _float32(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(o) for o in out)
    return out  # e.g. a Distribution a sequence decoder returns: it computes later, in float32


def _unused_parameters(run: Run) -> list[str]:
    """Parameters a training step never reaches (e.g. a learned prior under the paper-legacy objective,
    which replaces the KL). DistributedDataParallel must be told, or it waits for their gradients: one
    probe forward and backward on two examples, in eval mode and a forked random state, so training
    sees no trace of it."""
    model, x = run.model, run.data.train[: min(2, len(run.data.train))]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    device = run.data.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        loss, _ = run.objective(model(x), model)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [name for (name, _), g in zip(named, grads, strict=True) if g is None]


def _restore(run: Run, ckpt: dict[str, Any]) -> None:
    recorded = ckpt.get("data_fingerprint")  # absent in checkpoints of older versions
    if recorded is not None and run.fingerprint and recorded != run.fingerprint:
        raise RhovaeError(
            f"{run.run_dir / 'last.pt'} was trained on other data than this run is given (the training "
            "split's fingerprint differs); resume with the same data, or start a new --run-dir"
        )
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.set_rng_state(ckpt["rng"])
        _restore_rank_noise(run, ckpt)
        if run.aggressive is not None:
            run.aggressive.load_state_dict(ckpt["aggressive"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RhovaeError(
            f"{run.run_dir / 'last.pt'} does not fit this run: {first}; start a new --run-dir"
        ) from None
    run.state = TrainState(
        int(ckpt["epoch"]), list(ckpt["history"]), ckpt["best_val"], ckpt["best_epoch"], ckpt["stale"]
    )
    if run.cluster.main:
        log.info("resuming %s from epoch %d", run.run_dir, run.state.epoch)


def _restore_rank_noise(run: Run, ckpt: dict[str, Any]) -> None:
    """Each rank's own sampling noise from ``last.pt``; resumed on another number of processes, the ranks
    beyond the first restart theirs from a seed (a valid run, not bit-identical to an uninterrupted one)."""
    cluster, ranks = run.cluster, ckpt["rng"].get("ranks")
    if ranks is not None and len(ranks) == cluster.world:
        own = ranks[cluster.rank]
        torch.set_rng_state(own["torch"])
        if run.data.device.type == "cuda" and "cuda" in own:
            torch.cuda.set_rng_state(own["cuda"], run.data.device)
    elif ranks is not None or cluster.world > 1:
        if cluster.main:
            log.warning(
                "%s was written by %d processes and resumes on %d: the sampling noise of ranks > 0 restarts "
                "from a seed", run.run_dir / "last.pt", len(ranks) if ranks else 1, cluster.world,
            )  # fmt: skip
        if cluster.rank:
            torch.manual_seed(distributed.rank_seed(run.cfg.seed, cluster.rank, int(ckpt["epoch"])))


def _loop(run: Run) -> TrainResult:
    cfg, state, cluster = run.cfg, run.state, run.cluster
    stopped_early = False
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if cfg.early_stopping and state.stale >= cfg.early_stopping:
            stopped_early = True
            break
        row = train_epoch(run, epoch)
        if cluster.main:  # evaluation on rank 0 alone: see the module's docstring
            for split in ("val", "test"):
                terms = elbo_terms(run.model, getattr(run.data, split), objective=run.objective.at_target())
                row.update(
                    {f"{split}_{k}": v for k, v in terms.items() if k in ("loss", "recon", "kl", "mmd")}
                )
        if run.aggressive is not None:
            _end_aggressive_epoch(run, row)
        row = cluster.broadcast(row)
        _check_finite_evaluation(run, epoch, row)
        row["lr"] = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step(row["val_loss"])
        improved = state.record(row)
        _save_epoch(run, improved)
        for tracker in run.trackers:
            tracker.epoch(epoch, row, run.model, run.data, cfg.seed)
        if cluster.main:
            log.info(
                "epoch %d: train %.3f val %.3f test %.3f (%.1fs)%s",
                epoch, row["train_loss"], row["val_loss"], row["test_loss"], row["epoch_seconds"],
                f" [{LEGACY_LABEL}]" if cfg.kl_estimator == "paper-legacy" else "",
            )  # fmt: skip
    for tracker in run.trackers:
        tracker.finish(run.run_dir, cfg.to_dict(), state.history)
    return TrainResult(
        run.run_dir, state.history, state.best_epoch, state.best_val, stopped_early, cluster.rank
    )


def _end_aggressive_epoch(run: Run, row: dict[str, float]) -> None:
    """The aggressive phase's epoch end: the validation MI decides whether it goes on; the row records
    the MI, whether the phase was on and the encoder steps it has taken in all."""
    from rhovae.evaluate import mutual_information

    was_on = run.aggressive.on
    if was_on:
        mi = mutual_information(run.model, run.data.val)
        run.aggressive.end_epoch(mi)
        row["val_mutual_information"] = mi
    row["aggressive"] = float(was_on)
    row["encoder_steps"] = float(run.aggressive.inner_steps)


def _check_finite_evaluation(run: Run, epoch: int, row: dict[str, float]) -> None:
    """A validation or test loss that is not finite is a divergence, named as one: it would never
    improve on the best, so no best.pt would be written and nothing would say why."""
    for split in ("val", "test"):
        value = row.get(f"{split}_loss", 0.0)
        if not math.isfinite(value):
            what = "validation" if split == "val" else "test"
            raise TrainingDiverged(
                f"training diverged at epoch {epoch}: the {what} loss is {value}; {_kept(run)}; "
                "try a lower --lr"
            )


class _Totals:
    """Running sums of per-epoch figures, kept on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().double()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def means(self, n: int, cluster: Cluster = SINGLE) -> dict[str, float]:
        """Each sum over ``n`` examples; the sums of all ranks of ``cluster`` first (one all-reduce)."""
        if not self.sums:
            return {}
        names = sorted(self.sums)  # the same order on every rank
        values = (cluster.sum(torch.stack([self.sums[k] for k in names])) / n).tolist()  # one sync
        return dict(zip(names, values, strict=True))


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training split; returns the epoch's metrics row (per-sample means). Under DDP
    every rank steps through its share of each global batch and the row is the whole epoch's."""
    cfg, model, objective, data, cluster = run.cfg, run.model, run.objective, run.data, run.cluster
    step_model = run.step_model or model
    model.train()
    n = len(data.train)
    bounds = batch_bounds(n, cfg.batch_size)
    n_batches = len(bounds)
    totals = _Totals()
    bar = progress_bar(n_batches, f"epoch {epoch}/{cfg.epochs}", run.progress)
    start = time.perf_counter()
    batches = data.train_batches(cfg.batch_size, run.shuffle, run.pixels, cluster.rank, cluster.world)
    for step, xb in enumerate(batches, start=1):
        # training progress for the KL warm-up, in the unit the config counts
        done = (epoch - 1) * n_batches + step - 1
        objective.progress = done if cfg.kl_warmup_unit == "steps" else done / n_batches
        objective.total = cfg.epochs * (n_batches if cfg.kl_warmup_unit == "steps" else 1)
        b = len(xb)
        if b == 0:  # a last global batch smaller than the world: step on one example, weighted 0
            xb = data.train[:1]
        aggressive = run.aggressive is not None and run.aggressive.on
        if aggressive:  # the encoder catches up first (He et al.); the step below moves the decoder
            run.aggressive.encoder_steps(step_model, model, objective, data, cfg.batch_size)
        out = step_model(xb)
        loss, extras = objective(out, model)
        if cluster.world == 1:
            loss_value = float(loss.detach())  # one sync per step: also the NaN check
            bad_rank, step_loss = (None if math.isfinite(loss_value) else 0), loss
        else:
            global_b = bounds[step - 1][1] - bounds[step - 1][0]
            loss_value, bad_rank = _global_loss(cluster, loss, b, global_b)
            # DDP averages gradients over ranks: weighting each rank's mean by its share of the global
            # batch (times the world) makes that average the gradient of the global batch's mean
            step_loss = loss * (b * cluster.world / global_b)
        if bad_rank is not None:
            if bar is not None:
                bar.close()
            raise _diverged(epoch, step, out, extras, run, bad_rank)
        run.optimizer.zero_grad(set_to_none=True)
        step_loss.backward()
        if aggressive:
            run.aggressive.decoder_only()
        run.optimizer.step()
        if b == 0:
            continue
        totals.add("train_loss", loss * b)
        totals.add("train_recon", out.recon.sum())
        totals.add("train_kl", out.kl.sum())
        for name, value in extras.items():
            totals.add(f"train_{name}", value * b)
        stats = posterior_statistics(out.q)
        rho = mean_abs_rho(stats)  # AR(1) posteriors: per example, over every correlation reported
        if rho is not None:
            totals.add("mean_abs_rho", rho.sum())
        for name, value in stats.items():
            if name.startswith("kl_group_"):  # latent hierarchies: the KL of each group
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
    row: dict[str, float] = {"epoch": epoch, "mean_abs_rho": float("nan"), **totals.means(n, cluster)}
    row.update(epoch_seconds=seconds, samples_per_second=n / seconds, beta=objective.kl_weight())
    return row


def _global_loss(cluster: Cluster, loss: Tensor, b: int, global_b: int) -> tuple[float, int | None]:
    """The global batch's mean loss from every rank's mean over its ``b`` examples, and the first rank
    whose loss is not finite (None: all finite): one all-reduce, so every rank decides alike."""
    per_rank = torch.zeros(cluster.world, dtype=torch.float64, device=loss.device)
    per_rank[cluster.rank] = loss.detach().double() * b  # an empty share's NaN still counts (0 * NaN)
    values = cluster.sum(per_rank).tolist()
    bad = [r for r, v in enumerate(values) if not math.isfinite(v)]
    return sum(values) / global_b, (bad[0] if bad else None)


def _diverged(
    epoch: int, step: int, out: VAEOutput, extras: dict, run: Run, bad_rank: int = 0
) -> TrainingDiverged:
    cluster = run.cluster
    where = f" on rank {bad_rank}" if cluster.world > 1 else ""
    recon, kl = out.recon.detach(), out.kl.detach()
    if bad_rank != cluster.rank:
        term = "its loss is not finite"
    elif not torch.isfinite(recon).all():
        term = f"the reconstruction term is {float(recon[~torch.isfinite(recon)][0])}"
    elif not torch.isfinite(kl).all():
        term = f"the KL term is {float(kl[~torch.isfinite(kl)][0])}"
    elif any(not torch.isfinite(v).all() for v in extras.values()):
        name = next(k for k, v in extras.items() if not torch.isfinite(v).all())
        term = f"the {name} term is not finite"
    else:
        term = "the loss is not finite"
    return TrainingDiverged(
        f"training diverged at epoch {epoch}, step {step}{where}: {term}; {_kept(run)}; try a lower --lr"
    )


def _kept(run: Run) -> str:
    """What a diverged run leaves: its last good checkpoint, or nothing."""
    last = run.state.epoch
    return f"last good checkpoint {run.run_dir / 'last.pt'} (epoch {last})" if last else "no epoch finished"


def _save_epoch(run: Run, improved: bool) -> None:
    """Save the epoch as one unit: ``last.pt`` first (it holds everything the epoch's other records
    are made from), then ``best.pt``, ``metrics.csv`` and the pictures. A process killed between
    them leaves a ``last.pt`` that ``--resume`` completes the rest from (:func:`_complete_epoch_records`)."""
    rng = run.rng_state()
    if run.cluster.world > 1:  # every rank's own sampling noise (the rest of the random state is shared)
        own = {k: v for k, v in rng.items() if k in ("torch", "cuda")}
        rng["ranks"] = run.cluster.gather(own)
    if not run.cluster.main:
        return
    state = run.state
    save_atomic(
        {
            **_checkpoint_common(run),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": rng,
            "history": state.history,
            "best_val": state.best_val,
            "best_epoch": state.best_epoch,
            "stale": state.stale,
            **({"aggressive": run.aggressive.state_dict()} if run.aggressive is not None else {}),
        },
        run.run_dir / "last.pt",
    )
    _write_epoch_records(run, write_best=improved)


def _checkpoint_common(run: Run) -> dict[str, Any]:
    """What ``best.pt`` and ``last.pt`` both hold: enough to rebuild and use the model."""
    cfg, data = run.cfg, run.data
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "versions": versions(),
        "data_shape": list(data.data_shape),
        "preprocessing": data.preprocessing.to_dict(),
        "data_meta": data.meta,
        "data_fingerprint": run.fingerprint,
        "epoch": run.state.epoch,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
    }


def _write_epoch_records(run: Run, write_best: bool) -> None:
    """The epoch's records besides ``last.pt``, each made from the run's state alone: ``best.pt`` (when
    this epoch is the best), ``metrics.csv`` and the pictures."""
    cfg, state, data = run.cfg, run.state, run.data
    if write_best:
        save_atomic({**_checkpoint_common(run), "val_loss": state.best_val}, run.run_dir / "best.pt")
    buf = io.StringIO()
    extra = sorted({k for row in state.history for k in row} - set(METRIC_FIELDS))  # e.g. per-group KLs
    label = {"objective": LEGACY_LABEL} if cfg.kl_estimator == "paper-legacy" else {}
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra + list(label), extrasaction="ignore")
    w.writeheader()
    for row in state.history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} | label)
    write_text_atomic(run.run_dir / "metrics.csv", buf.getvalue())
    if cfg.pictures:
        from rhovae.plots import save_loss_curves, save_pictures

        save_pictures(run.model, data, run.run_dir, seed=cfg.seed)
        title = f"{cfg.model} / {cfg.posterior} on {data.name}, d={cfg.latent_dim}"
        save_loss_curves(state.history, run.run_dir / "loss_curves.png", title=title)


def _complete_epoch_records(run: Run) -> None:
    """On resume, finish the records of the epoch ``last.pt`` holds, in case the process that wrote it
    was killed before the rest: ``best.pt`` when that epoch was the best and ``best.pt`` is not of it,
    ``metrics.csv`` (every epoch exactly once) and the pictures. Idempotent; the random state that
    training continues with is untouched (pictures draw from their own seeded generator)."""
    state, best = run.state, run.run_dir / "best.pt"
    stale_best = False
    if state.best_epoch == state.epoch:
        try:
            stale_best = load_checkpoint(best)["epoch"] != state.epoch
        except RhovaeError:  # missing or damaged: the epoch's best.pt never landed
            stale_best = True
    with torch.random.fork_rng(devices=[run.data.device] if run.data.device.type == "cuda" else []):
        _write_epoch_records(run, write_best=stale_best)
    if stale_best:
        log.info("%s: completed epoch %d's best.pt from last.pt", run.run_dir, state.epoch)
