"""Running a grid: each run trained (or resumed) and evaluated in this process, a pool of local
processes (``--jobs``) or Ray tasks (``--ray``, :mod:`rhovae.experiments.ray`), then the report."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rhovae.config import from_dict
from rhovae.errors import RhovaeError
from rhovae.experiments.grid import Experiment
from rhovae.experiments.ray import import_ray, run_tasks
from rhovae.experiments.records import _finished
from rhovae.experiments.report import write_report
from rhovae.files import strict_json
from rhovae.runs import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["IN_USE", "compare", "die_with_parent", "run_one"]

IN_USE = "in use by another process; skipped"


def run_one(
    run_id: str, cfg_dict: dict, run_dir: str, iwae_k: int, iwae_limit: int, threads: int = 0,
    tracking: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """Train (or resume) and evaluate one run, holding its folder's lock throughout; a no-op for a
    finished one. A folder that another live process holds is skipped (:data:`IN_USE`), so two
    ``compare`` commands on one output folder share the work instead of training every run twice.
    ``tracking``: ``tensorboard`` (bool), ``mlflow`` (a tracking URI) and ``experiment`` (the MLflow
    experiment's name), as :func:`rhovae.train.train` takes them. Returns what it did."""
    import torch

    from rhovae.evaluate import evaluate_run, write_evaluation
    from rhovae.runs import RunInUse, RunLock, pick_device, prepare_data
    from rhovae.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    path = Path(run_dir)
    if _finished(path, cfg, iwae_k, iwae_limit):
        return "done before"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RhovaeError(f"cannot create run folder {path}: {e.strerror}") from None
    try:
        with RunLock(path):
            if _finished(path, cfg, iwae_k, iwae_limit):  # finished by the process that held it
                return "done before"
            resume = (path / "last.pt").exists()
            data = prepare_data(cfg, pick_device(cfg.device))  # loaded once for training and evaluation
            tracking = tracking or {}
            mlflow, experiment = tracking.get("mlflow"), tracking.get("experiment", "rhovae")
            train(
                cfg, path, resume=resume, progress=False, data=data,
                tensorboard=bool(tracking.get("tensorboard")), mlflow=mlflow, mlflow_experiment=experiment,
            )  # fmt: skip
            record = evaluate_run(path, iwae_k=iwae_k, limit=iwae_limit, device=cfg.device, data=data)
            write_evaluation(path, {**record, "iwae_limit": iwae_limit})
            if mlflow:
                from rhovae.trackers import MLflowTracker

                MLflowTracker(mlflow, path, cfg.to_dict(), experiment).evaluation(path, record)
    except RunInUse as e:
        log.warning("%s: %s", run_id, e)
        return IN_USE
    return "resumed" if resume else "trained"


def die_with_parent(parent: int) -> None:
    """Make this worker process end when ``parent`` does, however it ends (SIGKILL included): Linux
    sends it SIGKILL then (``PR_SET_PDEATHSIG``). A worker that outlived ``compare`` would hold its
    runs' locks and memory for ever. Elsewhere, and should the parent be gone already, it exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def compare(
    exp: Experiment,
    out_dir: str | Path,
    jobs: int = 1,
    overrides: dict[str, Any] | None = None,
    ray: str | None = None,
    ray_cpus_per_run: float = 1.0,
    ray_gpus_per_run: float = 0.0,
    tensorboard: bool = False,
    mlflow: str | None = None,
) -> Path:
    """Run every point of ``exp`` into ``out_dir/runs`` (skipping finished ones) and write the report.

    ``jobs`` runs train at once in local processes; with ``ray`` (an address, or ``local``) every run
    is a Ray task with those resources instead (:func:`rhovae.experiments.ray.run_tasks`).
    ``tensorboard`` and ``mlflow`` (a tracking URI, :func:`rhovae.trackers.mlflow_uri`) track every run
    (:mod:`rhovae.trackers`); in MLflow the grid is one experiment, named after it, and its report
    is logged as a run of its own."""
    out = Path(out_dir)
    if overrides:
        exp = dataclasses.replace(exp, run={**exp.run, **overrides})
    if ray:
        import_ray()  # before anything is written: without Ray, say how to install it
        if jobs > 1:
            raise RhovaeError("--jobs and --ray exclude each other: Ray places the runs by their resources")
    runs = exp.configs()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.json", strict_json(dataclasses.asdict(exp), indent=2) + "\n")
    start = time.perf_counter()
    tracking = {"tensorboard": tensorboard, "mlflow": mlflow, "experiment": exp.name}
    jobs = max(1, min(jobs, len(runs)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    if ray:
        # absolute folders: a Ray worker starts elsewhere; as many threads as the CPUs it holds
        threads = max(1, int(ray_cpus_per_run))
        tasks = [
            (
                rid,
                cfg.to_dict(),
                str((out / "runs" / rid).resolve()),
                exp.iwae_k,
                exp.iwae_limit,
                threads,
                tracking,
            )  # fmt: skip
            for rid, cfg in runs
        ]
        run_tasks(run_one, tasks, ray, ray_cpus_per_run, ray_gpus_per_run)
        return _report(exp, out, time.perf_counter() - start, mlflow)
    tasks = [
        (rid, cfg.to_dict(), str(out / "runs" / rid), exp.iwae_k, exp.iwae_limit, threads, tracking)
        for rid, cfg in runs
    ]
    if jobs == 1:
        for i, task in enumerate(tasks, 1):
            log.info("[%d/%d] %s: %s", i, len(tasks), task[0], run_one(*task))
    else:
        import multiprocessing

        with ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:  # fmt: skip
            futures = {pool.submit(run_one, *t): t[0] for t in tasks}
            for i, (future, rid) in enumerate(futures.items(), 1):
                log.info("[%d/%d] %s: %s", i, len(tasks), rid, future.result())
    return _report(exp, out, time.perf_counter() - start, mlflow)


def _report(exp: Experiment, out: Path, wall: float, mlflow: str | None) -> Path:
    report = write_report(exp, out, wall_seconds=wall)
    if mlflow:
        from rhovae.trackers import log_report

        log_report(mlflow, exp.name, out)
    return report
