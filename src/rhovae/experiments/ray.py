"""Grids of runs on a Ray cluster: what ``rhovae compare --ray ADDRESS`` does with an experiment's runs.

Each run is one Ray task declaring its resources (``cpus_per_run``, ``gpus_per_run``) and calling the
function it is given (``compare`` gives :func:`rhovae.experiments.run.run_one`, exactly as ``--jobs``
does): finished runs are skipped and interrupted ones resumed from their ``last.pt``, and a task that
Ray retries after its node died resumes the same way. Every task writes into the experiment's output
folder, which must therefore be one folder for all machines (a shared file system mounted at the same
path); relative paths in the experiment (a ``data_dir``) are taken from the driver's working directory,
which each task enters when it exists there. Ray is optional: ``pip install 'rhovae[ray]'``.

This module imports nothing of :mod:`rhovae.experiments` (the function to run is an argument), so the
package has no import cycle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from rhovae.errors import RhovaeError

log = logging.getLogger(__name__)

__all__ = ["INSTALL_HINT", "import_ray", "run_tasks"]

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'rhovae[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a RhovaeError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RhovaeError(INSTALL_HINT) from None
    return ray


def _run_in_worker(cwd: str, run: Callable[..., str], *task: Any) -> str:
    """One grid cell inside a Ray worker: ``run(*task)`` from the driver's folder."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return run(*task)


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e  # a RayTaskError carries the task's own exception
    lines = str(cause).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(cause, RhovaeError) else f"{type(cause).__name__}: {text}"


def run_tasks(
    run: Callable[..., str],
    tasks: list[tuple],
    address: str,
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
) -> dict[str, str]:
    """Run ``run(*task)`` for each task (its run id first; ``run`` a module-level function, such as
    :func:`rhovae.experiments.run.run_one`, which Ray's workers import by name) as a Ray task on the
    cluster at ``address`` (``local``: start a Ray instance on this machine with all its
    CPUs; ``auto``: the cluster this machine belongs to; else ``HOST:PORT`` or ``ray://HOST:PORT``).
    Returns what each run did. Failed runs do not stop the others; once all have ended, one
    RhovaeError names them (the same command resumes them)."""
    if not cpus_per_run > 0 or not gpus_per_run >= 0:
        raise RhovaeError(
            f"--ray-cpus-per-run must be > 0 and --ray-gpus-per-run >= 0, got {cpus_per_run} and "
            f"{gpus_per_run}"
        )
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False)
            else:
                ray.init(address=address, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RhovaeError(f"cannot reach a Ray cluster at {address!r}: {first}") from None
    try:
        remote = ray.remote(_run_in_worker).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        cwd = os.getcwd()
        pending = {remote.remote(cwd, run, *task): task[0] for task in tasks}
        outcomes: dict[str, str] = {}
        failures: dict[str, str] = {}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            run_id = pending.pop(ready)
            try:
                outcomes[run_id] = ray.get(ready)
            except ray.exceptions.RayError as e:
                failures[run_id] = _first_line(e)
                outcomes[run_id] = "failed"
            done = len(outcomes)
            log.info("[%d/%d] %s: %s", done, len(tasks), run_id, failures.get(run_id, outcomes[run_id]))
    finally:
        if started:
            ray.shutdown()
    if failures:
        first = next(iter(failures))
        raise RhovaeError(
            f"{len(failures)} of {len(tasks)} runs failed (first: {first}: {failures[first]}); the others "
            "are kept, and the same command resumes the failed ones"
        )
    return outcomes
