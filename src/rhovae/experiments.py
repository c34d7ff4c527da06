"""Grids of runs and their report: what `rhovae compare` does.

An experiment (a TOML file, or a preset shipped in ``rhovae/presets``) names a grid of run settings and
the fixed settings every run shares::

    name = "quick"
    [grid]                      # every combination is one run; any RunConfig field may vary
    model = ["mlp"]
    dataset = ["auto"]          # auto: fashion-mnist when installed, else mnist-5k (said in the report)
    posterior = ["diagonal", "ar1"]
    seed = [0, 1, 2]
    [run]                       # fixed settings of every run
    epochs = 5
    [evaluate]
    iwae_k = 100
    iwae_limit = 0              # test examples for the IWAE bound (0: all)
    baseline = "diagonal"       # paired differences are posterior minus this, seed by seed

Each run has its own folder under ``OUT/runs``; a run whose ``evaluation.json`` exists for the same
config is not redone, a run with a ``last.pt`` resumes, so an interrupted grid continues where it
stopped. The report (``report.md``, ``report.json``, ``runs.csv`` and pictures) is written from the run
folders, so it can be rebuilt at any time.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rhovae.config import RunConfig, from_dict, tomllib
from rhovae.errors import RhovaeError
from rhovae.files import require_regular_file, strict_json
from rhovae.runs import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "Experiment", "compare", "load_experiment", "paired_difference", "write_report"]

# every TOML file shipped in rhovae/presets is a preset: adding one is adding a file
PRESETS = tuple(
    sorted(
        f.name[: -len(".toml")]
        for f in resources.files("rhovae.presets").iterdir()
        if f.name.endswith(".toml")
    )
)
METRICS = ["test_neg_elbo", "iwae_nll", "test_recon", "test_kl", "active_units", "epoch_seconds"]
# reported when every run of a grid has them (sequence runs)
OPTIONAL_METRICS = ["recon_seq_acc", "recon_token_acc", "validity", "uniqueness", "novelty"]
METRIC_NAMES = {
    "recon_seq_acc": "recon. sequences",
    "recon_token_acc": "recon. tokens",
    "validity": "validity",
    "uniqueness": "uniqueness",
    "novelty": "novelty",
    "test_neg_elbo": "test −ELBO",
    "iwae_nll": "IWAE NLL",
    "test_recon": "reconstruction",
    "test_kl": "KL",
    "active_units": "active units",
    "epoch_seconds": "s/epoch",
}


@dataclass
class Experiment:
    name: str
    grid: dict[str, list[Any]]
    run: dict[str, Any] = field(default_factory=dict)
    iwae_k: int = 1000
    iwae_limit: int = 0
    baseline: str = "diagonal"
    description: str = ""
    # named bundles of settings a grid key may range over, e.g. {"aid": {"none": {}, "warm-up":
    # {"kl_warmup": 5}}} with grid aid = ["none", "warm-up"] (a TOML table [options.aid])
    options: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def points(self) -> list[tuple[str, RunConfig, dict[str, Any]]]:
        """Every run of the grid as ``(run_id, resolved config, the grid values that made it)``, in a
        stable order."""
        keys = list(self.grid)
        runs = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            settings = dict(self.run)
            for k, v in zip(keys, values, strict=True):
                if k in self.options:
                    if v not in self.options[k]:
                        raise RhovaeError(
                            f"experiment {self.name!r}: {k} = {v!r} is not one of [options.{k}]: "
                            f"{', '.join(self.options[k])}"
                        )
                    settings.update(self.options[k][v])
                else:
                    settings[k] = v
            if settings.get("dataset") == "auto":
                settings.update(_auto_dataset(settings))
            cfg = from_dict(settings, where=f"experiment {self.name!r}").validate()
            choices = {
                k: (v if k in self.options else getattr(cfg, k)) for k, v in zip(keys, values, strict=True)
            }
            runs.append((_run_id(keys, values, cfg), cfg, choices))
        ids = [r for r, _, _ in runs]
        if len(set(ids)) != len(ids):
            raise RhovaeError(
                f"experiment {self.name!r}: two grid points give the same run (duplicate values?)"
            )
        return runs

    def configs(self) -> list[tuple[str, RunConfig]]:
        """Every run of the grid as ``(run_id, resolved config)``, in a stable order."""
        return [(rid, cfg) for rid, cfg, _ in self.points()]


def _run_id(keys: list[str], values: tuple, cfg: RunConfig) -> str:
    parts = []
    for k, v in zip(keys, values, strict=True):
        v = getattr(cfg, k) if k == "dataset" else v
        parts.append(
            f"s{v}" if k == "seed" else (str(v) if k in ("model", "dataset", "posterior") else f"{k}{v}")
        )
    return file_label("-".join(parts))


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,-]")


def file_label(text: str, most: int = 120) -> str:
    """``text`` as a safe part of a file name: every character but letters, digits and ``._=,-`` becomes
    ``_`` (a grid value may be a path, hold slashes or spaces), never ``.`` or ``..`` alone, and a long
    one is cut and given a short hash of the whole, so two values never share a name."""
    safe = _UNSAFE.sub("_", text).lstrip(".") or "_"
    if len(safe) > most:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[: most - 11]}-{digest}"
    return safe


@functools.lru_cache(maxsize=4)
def _fashion_mnist_available(data_dir: str) -> bool:
    from rhovae.data import DATASETS

    try:
        DATASETS["fashion-mnist"](Path(data_dir) if data_dir else None)
        return True
    except RhovaeError:
        log.warning("Fashion-MNIST is not installed: using the mnist-5k subset (4,000 train / 1,000 test)")
        return False


def _auto_dataset(settings: dict[str, Any]) -> dict[str, Any]:
    """fashion-mnist where a source has it, else the mnist-5k subset (with a smaller validation split)."""
    if _fashion_mnist_available(str(settings.get("data_dir", ""))):
        return {"dataset": "fashion-mnist"}
    return {"dataset": "mnist-5k", "val_size": min(int(settings.get("val_size", 500)), 500)}


#: the most runs one experiment's grid may span (a grid is expanded, validated and listed in memory
#: before its first run starts; 10,000 runs are weeks of a GPU's time)
MAX_GRID_POINTS = 10_000

_SECTIONS = {"name", "description", "grid", "run", "evaluate", "options"}
_SCALAR_TYPES = (str, int, float, bool)


def load_experiment(source: str | Path) -> Experiment:
    """An experiment from a TOML file, or the preset of that name (``quick``, ``paper``, ``families``).

    Every key and type is checked here, so a mistake fails in one line before any run starts."""
    if str(source) in PRESETS:
        text = resources.files("rhovae.presets").joinpath(f"{source}.toml").read_text()
        where = f"preset {source}"
    else:
        path = Path(source)
        try:
            require_regular_file(path, "an experiment TOML file")
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise RhovaeError(f"{path}: no such experiment file (presets: {', '.join(PRESETS)})") from None
        except IsADirectoryError:
            raise RhovaeError(f"{path}: is a folder; give an experiment TOML file") from None
        except UnicodeDecodeError:
            raise RhovaeError(f"{path}: not UTF-8 text; an experiment is a TOML file") from None
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise RhovaeError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        where = str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RhovaeError(f"{where}: not valid TOML ({e})") from None
    except RecursionError:
        raise RhovaeError(f"{where}: nested too deeply to be an experiment") from None
    unknown = set(raw) - _SECTIONS
    if unknown:
        raise RhovaeError(f"{where}: unknown section or key {sorted(unknown)[0]!r}")
    name = raw.get("name", Path(str(source)).stem)
    if not isinstance(name, str) or not name or not all(c.isprintable() and c not in "/\\" for c in name):
        raise RhovaeError(f"{where}: name must be a non-empty string without slashes, got {name!r:.60}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RhovaeError(f"{where}: description must be a string")
    run = _table(raw, "run", where)
    from_dict(run, where=f"{where} [run]")  # unknown keys and wrong types fail now, not in a run
    options: dict[str, dict[str, dict[str, Any]]] = {}
    for key, bundles in _table(raw, "options", where).items():
        if (
            not isinstance(bundles, dict)
            or not bundles
            or not all(isinstance(b, dict) for b in bundles.values())
        ):
            raise RhovaeError(
                f"{where}: [options.{key}] must name tables of run settings, e.g. [options.{key}.a]"
            )
        for label, settings in bundles.items():
            from_dict(settings, where=f"{where} [options.{key}.{label}]")
        options[key] = bundles
    grid = _table(raw, "grid", where)
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise RhovaeError(f"{where}: [grid] must map run settings to non-empty lists")
    points = math.prod(len(v) for v in grid.values())  # counted before anything is expanded
    if points > MAX_GRID_POINTS:
        raise RhovaeError(
            f"{where}: [grid] spans {points:,} runs, more than the {MAX_GRID_POINTS:,} one experiment may "
            "hold; split it into several experiments"
        )
    for key, values in grid.items():
        for value in values:
            if not isinstance(value, _SCALAR_TYPES) or (isinstance(value, str) and not value.isprintable()):
                raise RhovaeError(
                    f"{where}: [grid] {key} holds {value!r:.60}; grid values are single settings"
                )
            if key in options:
                if value not in options[key]:
                    known = ", ".join(options[key])
                    raise RhovaeError(
                        f"{where}: [grid] {key} = {value!r} is not one of [options.{key}]: {known}"
                    )
            else:
                from_dict({key: value}, where=f"{where} [grid]")
    evaluate = _table(raw, "evaluate", where)
    extra = set(evaluate) - {"iwae_k", "iwae_limit", "baseline"}
    if extra:
        raise RhovaeError(f"{where}: unknown key {sorted(extra)[0]!r} in [evaluate]")
    iwae_k, iwae_limit = evaluate.get("iwae_k", 1000), evaluate.get("iwae_limit", 0)
    baseline = evaluate.get("baseline", "diagonal")
    for label, value, low in (("iwae_k", iwae_k, 1), ("iwae_limit", iwae_limit, 0)):
        if type(value) is not int or not low <= value < 2**63:
            raise RhovaeError(
                f"{where}: [evaluate] {label} must be a whole number >= {low}, got {value!r:.40}"
            )
    if not isinstance(baseline, str):
        raise RhovaeError(f"{where}: [evaluate] baseline must be a posterior's name, got {baseline!r:.40}")
    return Experiment(
        name=name,
        description=description,
        grid=grid,
        run=run,
        iwae_k=iwae_k,
        iwae_limit=iwae_limit,
        baseline=baseline,
        options=options,
    )


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise RhovaeError(f"{where}: {key} must be a table ([{key}]), got {value!r:.40}")
    return value


# --- running ----------------------------------------------------------------------------------------


def _evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``evaluation.json``; None when there is none. A damaged one is a RhovaeError."""
    path = run_dir / "evaluation.json"
    try:
        require_regular_file(path, "an evaluation record")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise RhovaeError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise RhovaeError(
            f"{path}: not complete JSON (truncated?); the run will be evaluated again"
        ) from None
    if not isinstance(record, dict):
        raise RhovaeError(f"{path}: not an evaluation record; the run will be evaluated again")
    return record


# settings that change where a run computes or what it draws, not its numbers
_PLACEMENT = ("device", "pictures")


def _matches(record: dict[str, Any], cfg: RunConfig, iwae_k: int, iwae_limit: int) -> bool:
    """Whether an evaluation record is of these settings: the run's config (but where it ran), k, and the
    requested number of test images (recorded by :func:`run_one`; older records only have the number
    evaluated)."""
    limit_ok = (
        record.get("iwae_limit") == iwae_limit
        if "iwae_limit" in record
        else iwae_limit == 0 or record.get("test_images") == iwae_limit
    )
    config = record.get("config")
    if not isinstance(config, dict):
        return False
    try:  # settings added since the record was written take their defaults
        config = from_dict(config).to_dict()
    except RhovaeError:
        return False
    same = {k: v for k, v in config.items() if k not in _PLACEMENT} == {
        k: v for k, v in cfg.to_dict().items() if k not in _PLACEMENT
    }
    return same and record.get("iwae_k") == iwae_k and limit_ok


def _finished(run_dir: Path, cfg: RunConfig, iwae_k: int, iwae_limit: int) -> bool:
    try:
        record = _evaluation(run_dir)
    except RhovaeError as e:
        log.warning("%s", e)
        return False
    return record is not None and _matches(record, cfg, iwae_k, iwae_limit)


IN_USE = "in use by another process; skipped"


def run_one(run_id: str, cfg_dict: dict, run_dir: str, iwae_k: int, iwae_limit: int, threads: int = 0) -> str:
    """Train (or resume) and evaluate one run, holding its folder's lock throughout; a no-op for a
    finished one. A folder that another live process holds is skipped (:data:`IN_USE`), so two
    ``compare`` commands on one output folder share the work instead of training every run twice.
    Returns what it did."""
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
            train(cfg, path, resume=resume, progress=False, data=data)
            record = evaluate_run(path, iwae_k=iwae_k, limit=iwae_limit, device=cfg.device, data=data)
            write_evaluation(path, {**record, "iwae_limit": iwae_limit})
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
) -> Path:
    """Run every point of ``exp`` into ``out_dir/runs`` (skipping finished ones) and write the report.

    ``jobs`` runs train at once in local processes; with ``ray`` (an address, or ``local``) every run
    is a Ray task with those resources instead (:func:`rhovae.ray_backend.run_tasks`)."""
    out = Path(out_dir)
    if overrides:
        exp = dataclasses.replace(exp, run={**exp.run, **overrides})
    if ray:
        from rhovae.ray_backend import import_ray

        import_ray()  # before anything is written: without Ray, say how to install it
        if jobs > 1:
            raise RhovaeError("--jobs and --ray exclude each other: Ray places the runs by their resources")
    runs = exp.configs()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.json", strict_json(dataclasses.asdict(exp), indent=2) + "\n")
    start = time.perf_counter()
    jobs = max(1, min(jobs, len(runs)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    if ray:
        from rhovae.ray_backend import run_tasks

        # absolute folders: a Ray worker starts elsewhere; as many threads as the CPUs it holds
        threads = max(1, int(ray_cpus_per_run))
        tasks = [
            (rid, cfg.to_dict(), str((out / "runs" / rid).resolve()), exp.iwae_k, exp.iwae_limit, threads)
            for rid, cfg in runs
        ]
        run_tasks(tasks, ray, ray_cpus_per_run, ray_gpus_per_run)
        return write_report(exp, out, wall_seconds=time.perf_counter() - start)
    tasks = [
        (rid, cfg.to_dict(), str(out / "runs" / rid), exp.iwae_k, exp.iwae_limit, threads)
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
    wall = time.perf_counter() - start
    return write_report(exp, out, wall_seconds=wall)


# --- statistics -------------------------------------------------------------------------------------


def _t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(values: list[float], baseline: list[float]) -> dict[str, float]:
    """Mean of ``values[i] - baseline[i]`` with a 95% Student-t interval (needs >= 2 pairs for one)."""
    if len(values) != len(baseline) or not values:
        raise RhovaeError("paired difference needs equally many (and at least one) paired values")
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "sd": math.nan, "n": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = _t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


# --- report -----------------------------------------------------------------------------------------


def _collect(exp: Experiment, out: Path) -> list[dict[str, Any]]:
    """One row per finished run (its evaluation matches the grid point's settings); a run whose files
    are damaged or belong to other settings is left out with a warning, never an error."""
    rows = []
    for rid, cfg, choices in exp.points():
        run_dir = out / "runs" / rid
        try:
            record = _evaluation(run_dir)
            if record is None:
                continue
            if not _matches(record, cfg, exp.iwae_k, exp.iwae_limit):
                raise RhovaeError(
                    f"{run_dir / 'evaluation.json'} was made with other settings; run compare to redo it"
                )
            with open(run_dir / "metrics.csv", encoding="utf-8", newline="") as f:
                history = list(csv.DictReader(f))
            row = {"run": rid, **choices, "kl_estimator": cfg.kl_estimator}
            row.update({k: record[k] for k in METRICS + OPTIONAL_METRICS if k in record})
            row["epoch_seconds"] = sum(float(h["epoch_seconds"]) for h in history) / len(history)
            row["_train_seconds"] = sum(float(h["epoch_seconds"]) for h in history)
            evaluation_seconds = record.get("evaluation_seconds")  # absent in older records
            row["_evaluation_seconds"] = None if evaluation_seconds is None else float(evaluation_seconds)
            row["parameters"] = record.get("parameters")
            row["iwae_k"] = record["iwae_k"]
            row["test_images"] = record["test_images"]
            row["_history"] = [(int(h["epoch"]), float(h["test_loss"])) for h in history]
            for m in METRICS:
                float(row[m])  # every figure the report averages is there and a number
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, csv.Error) as e:
            text = getattr(e, "strerror", None) or str(e) or type(e).__name__
            log.warning("%s: left out of the report: %s", run_dir, text.splitlines()[0])
            continue
        row["_dir"] = str(run_dir)
        rows.append(row)
    return rows


def _setup_keys(exp: Experiment) -> list[str]:
    return [k for k in exp.grid if k not in ("seed", "posterior")]


def write_report(exp: Experiment, out: str | Path, wall_seconds: float | None = None) -> Path:
    """Write report.md, report.json, runs.csv and the pictures from the run folders under ``out``."""
    out = Path(out)
    rows = _collect(exp, out)
    if not rows:
        raise RhovaeError(f"{out}: no finished runs to report")
    if wall_seconds is None:  # --report-only keeps the wall time of the compare that trained the runs
        try:
            require_regular_file(out / "report.json", "a report")
            wall_seconds = json.loads((out / "report.json").read_text()).get("wall_seconds")
        except (OSError, ValueError, AttributeError):
            wall_seconds = None
    setup_keys = _setup_keys(exp)
    metrics = METRICS + [m for m in OPTIONAL_METRICS if all(m in r for r in rows)]
    posteriors = list(dict.fromkeys(r["posterior"] for r in rows)) if "posterior" in exp.grid else []

    def setup_of(r):
        return tuple(r[k] for k in setup_keys)

    setups = list(dict.fromkeys(setup_of(r) for r in rows))
    summary, paired = [], []
    for setup in setups:
        in_setup = [r for r in rows if setup_of(r) == setup]
        for post in posteriors or [None]:
            group = [r for r in in_setup if post is None or r["posterior"] == post]
            if not group:
                continue
            entry = {
                **dict(zip(setup_keys, setup, strict=True)),
                "posterior": post,
                "seeds": len(group),
                "parameters": group[0]["parameters"],
            }
            for m in metrics:
                entry[m] = _mean_sd([float(r[m]) for r in group])
            summary.append(entry)
        base = {r.get("seed"): r for r in in_setup if r.get("posterior") == exp.baseline}
        for post in posteriors:
            if post == exp.baseline:
                continue
            pairs = [
                (r, base[r.get("seed")]) for r in in_setup if r["posterior"] == post and r.get("seed") in base
            ]
            if not pairs:
                continue
            entry = {**dict(zip(setup_keys, setup, strict=True)), "posterior": post, "baseline": exp.baseline}
            for m in ("test_neg_elbo", "iwae_nll"):
                entry[m] = paired_difference([float(a[m]) for a, _ in pairs], [float(b[m]) for _, b in pairs])
            paired.append(entry)

    pictures = _pictures(exp, out, rows, setup_keys, setups, posteriors)
    legacy = any(r["kl_estimator"] != "exact" for r in rows)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        machine["torch"] = str(torch.__version__)
        machine["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        pass
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    report = {
        "experiment": dataclasses.asdict(exp),
        "machine": machine,
        "wall_seconds": wall_seconds,
        "compute_seconds": _compute_seconds(rows),
        "runs": clean,
        "summary": summary,
        "paired": paired,
        "pictures": pictures,
        "metrics": metrics,
        "note": "paper-legacy runs optimised the reference code's objective, which is NOT an ELBO"
        if legacy
        else "",
    }
    write_text_atomic(out / "report.json", strict_json(report, indent=2, default=float) + "\n")
    buf = io.StringIO()
    fields = list(clean[0])
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(clean)
    write_text_atomic(out / "runs.csv", buf.getvalue())
    write_text_atomic(out / "report.md", _markdown(exp, report, setup_keys, legacy))
    return out / "report.md"


def _compute_seconds(rows: list[dict[str, Any]]) -> dict[str, float | int]:
    """Time summed over the reported runs, however many ``compare`` commands (or machines) produced
    them: ``training``, the training passes of every epoch (metrics.csv's epoch_seconds; the per-epoch
    validation and test passes are not in it); ``evaluation``, the final evaluation of the
    ``evaluated`` runs whose record times it (records written before it was timed do not)."""
    timed = [r["_evaluation_seconds"] for r in rows if r["_evaluation_seconds"] is not None]
    return {
        "training": sum(r["_train_seconds"] for r in rows),
        "evaluation": sum(timed),
        "evaluated": len(timed),
    }


def _fmt(ms: tuple[float, float], digits: int = 2) -> str:
    mean, sd = ms
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _markdown(exp: Experiment, report: dict, setup_keys: list[str], legacy: bool) -> str:
    lines = [f"# rhovae compare: {exp.name}", ""]
    if exp.description:
        lines += [exp.description, ""]
    if legacy:
        lines += [
            "**Warning: runs marked paper-legacy were trained with the reference code's random-walk sampler "
            "and batch-mixed KL; their training loss is NOT an ELBO. Their test −ELBO and IWAE NLL below "
            "are computed exactly.**",
            "",
        ]
    m = report["machine"]
    wall, compute, n = report["wall_seconds"], report["compute_seconds"], len(report["runs"])
    evaluated = compute["evaluated"]
    spent = f"training passes {compute['training'] / 60:.1f} min (per-epoch validation and test not counted)"
    if evaluated:
        spent += f", final evaluation {compute['evaluation'] / 60:.1f} min"
        spent += "" if evaluated == n else f" (timed for {evaluated} of the {n} runs)"
    lines += [
        f"Report written on: {m.get('device', '?')}, {m['cpus']} CPUs, torch {m.get('torch', '?')}, "
        f"Python {m['python']}. Time summed over the {n} runs: {spent}"
        + (
            f"; the last `compare` command that trained or evaluated runs took {wall / 60:.1f} min"
            if wall
            else ""
        )
        + ".",
        f"IWAE with k = {exp.iwae_k}"
        + (f" on the first {exp.iwae_limit} test examples" if exp.iwae_limit else " on every test example")
        + ". All losses in nats per example (image or sequence).",
        "",
    ]
    fixed = ", ".join(f"{k} = {v}" for k, v in exp.run.items())
    grid = "; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in exp.grid.items())
    lines += [f"Grid: {grid}.", f"Fixed settings: {fixed or 'the defaults'}.", ""]
    lines += ["## Per setup: mean ± sd over seeds", ""]
    metrics = report.get("metrics", METRICS)
    head = [*setup_keys, "posterior", "seeds", *[METRIC_NAMES[k] for k in metrics], "parameters"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["summary"]:
        cells = [str(s[k]) for k in setup_keys] + [str(s["posterior"]), str(s["seeds"])]
        cells += [
            _fmt(s[k], 1 if k == "active_units" else 3 if k in OPTIONAL_METRICS else 2) for k in metrics
        ]
        cells += [f"{s['parameters']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    if report["paired"]:
        lines += [
            "",
            f"## Paired differences, posterior − {exp.baseline}, seed by seed (negative: better than "
            f"{exp.baseline})",
            "",
            "Mean difference with its 95% Student-t interval over seeds.",
            "",
        ]
        head = [*setup_keys, "posterior", "n", "Δ test −ELBO [95% CI]", "Δ IWAE NLL [95% CI]"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in report["paired"]:
            cells = [str(p[k]) for k in setup_keys] + [p["posterior"], str(p["test_neg_elbo"]["n"])]
            for key in ("test_neg_elbo", "iwae_nll"):
                d = p[key]
                ci = "" if math.isnan(d["low"]) else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
                cells.append(f"{d['mean']:+.2f}{ci}")
            lines.append("| " + " | ".join(cells) + " |")
    if report["pictures"]:
        lines += ["", "## Pictures", ""]
        for pic in report["pictures"]:
            lines += [f"### {pic['title']}", "", f"![{pic['title']}]({pic['path']})", ""]
    lines += [
        "",
        "Runs: `runs.csv`; everything above: `report.json`. Regenerate with the same `rhovae compare` "
        "command: finished runs are not redone.",
        "",
    ]
    return "\n".join(lines)


def _pictures(exp, out: Path, rows, setup_keys, setups, posteriors) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from rhovae.plots import _atomic_png

    pictures = []
    for setup in setups:
        label = file_label("-".join(str(v) for v in setup)) if setup else "all"
        title = ", ".join(f"{k} {v}" for k, v in zip(setup_keys, setup, strict=True)) or exp.name
        in_setup = [r for r in rows if tuple(r[k] for k in setup_keys) == setup]
        fig, ax = plt.subplots(figsize=(6, 4))
        for post in posteriors or [None]:
            group = [r for r in in_setup if post is None or r["posterior"] == post]
            if not group:
                continue
            epochs = sorted({e for r in group for e, _ in r["_history"]})
            series = [[dict(r["_history"]).get(e) for r in group] for e in epochs]
            means = [
                sum(v for v in s if v is not None) / len([v for v in s if v is not None]) for s in series
            ]
            sds = [_mean_sd([v for v in s if v is not None])[1] for s in series]
            line = ax.plot(epochs, means, marker="o", label=f"{post or 'runs'} ({len(group)} seeds)")[0]
            if len(group) > 1:
                ax.fill_between(
                    epochs,
                    [m - s for m, s in zip(means, sds, strict=True)],
                    [m + s for m, s in zip(means, sds, strict=True)],
                    color=line.get_color(),
                    alpha=0.2,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("test loss (nats per example)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = f"curves-{label}.png"
        _atomic_png(out / path, lambda p, fig=fig: fig.savefig(p, dpi=100))
        plt.close(fig)
        pictures.append({"title": f"Test loss per epoch (mean ± sd over seeds): {title}", "path": path})
        for kind in ("samples", "reconstructions"):
            first = {}
            for r in sorted(in_setup, key=lambda r: r.get("seed", 0)):
                first.setdefault(r.get("posterior"), r)
            panels = [(p, Path(r["_dir"]) / f"{kind}.png") for p, r in first.items()]
            panels = [(p, f) for p, f in panels if f.exists()]
            if not panels:
                continue
            fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
            for ax, (p, f) in zip(axes[0], panels, strict=True):
                ax.imshow(mpimg.imread(f), cmap="gray")
                ax.set_title(str(p))
                ax.axis("off")
            fig.tight_layout()
            path = f"{kind}-{label}.png"
            _atomic_png(out / path, lambda p, fig=fig: fig.savefig(p, dpi=100))
            plt.close(fig)
            what = (
                "Random samples from the prior"
                if kind == "samples"
                else "Test images (odd) and reconstructions"
            )
            pictures.append({"title": f"{what}, lowest seed: {title}", "path": path})
    return pictures


def _nan_for_null(obj: Any) -> Any:
    """A report read back: the figures strict JSON wrote as null (an sd of one seed) are NaN again."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_for_null(v) for v in obj]
    return obj


def print_summary(report_path: Path, stream=sys.stdout) -> None:
    """A short table for the terminal: each setup's posteriors with test −ELBO and IWAE NLL, and how
    many of the grid's runs the report holds."""
    path = report_path.parent / "report.json"
    try:
        require_regular_file(path, "a report")
        report = _nan_for_null(json.loads(path.read_text(encoding="utf-8")))
        summary, paired = report["summary"], report["paired"]
        runs = len(report["runs"])
        grid = report["experiment"]["grid"]
        total = math.prod(len(v) for v in grid.values())
    except (OSError, ValueError, KeyError, TypeError) as e:
        text = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise RhovaeError(
            f"{path}: unreadable report ({text.splitlines()[0]}); rebuild it with --report-only"
        ) from None
    for s in summary:
        setup = ", ".join(
            f"{v}"
            for k, v in s.items()
            if k not in METRICS + OPTIONAL_METRICS and k not in ("posterior", "seeds", "parameters")
        )
        print(
            f"{setup:<28} {str(s['posterior']):<12} −ELBO {_fmt(s['test_neg_elbo'])}   "
            f"IWAE {_fmt(s['iwae_nll'])}   ({s['seeds']} seeds)",
            file=stream,
        )
    for p in paired:
        d = p["iwae_nll"]
        ci = "" if math.isnan(d["low"]) else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
        print(
            f"Δ IWAE NLL {p['posterior']} − {p['baseline']}: {d['mean']:+.2f}{ci} (95% CI over seeds)",
            file=stream,
        )
    if runs < total:
        print(
            f"the report holds {runs} of the grid's {total} runs; the others are unfinished or in use by "
            "another process (run the same command again to complete it)",
            file=stream,
        )
    print(f"report: {report_path}", file=stream)
