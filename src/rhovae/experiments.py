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
    iwae_limit = 0              # test images for the IWAE bound (0: all)
    baseline = "diagonal"       # paired differences are posterior minus this, seed by seed

Each run has its own folder under ``OUT/runs``; a run whose ``evaluation.json`` exists for the same
config is not redone, a run with a ``last.pt`` resumes, so an interrupted grid continues where it
stopped. The report (``report.md``, ``report.json``, ``runs.csv`` and pictures) is written from the run
folders, so it can be rebuilt at any time.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rhovae.config import RunConfig, from_dict, tomllib
from rhovae.errors import RhovaeError

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
    return "-".join(parts).replace("+", "_").replace("/", "_").replace(":", "_")


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


def load_experiment(source: str | Path) -> Experiment:
    """An experiment from a TOML file, or the preset of that name (``quick``, ``paper``, ``families``)."""
    if str(source) in PRESETS:
        text = resources.files("rhovae.presets").joinpath(f"{source}.toml").read_text()
        where = f"preset {source}"
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RhovaeError(f"{path}: no such experiment file (presets: {', '.join(PRESETS)})") from None
        except IsADirectoryError:
            raise RhovaeError(f"{path}: is a folder; give an experiment TOML file") from None
        except UnicodeDecodeError:
            raise RhovaeError(f"{path}: not UTF-8 text; an experiment is a TOML file") from None
        where = str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RhovaeError(f"{where}: not valid TOML ({e})") from None
    unknown = set(raw) - {"name", "description", "grid", "run", "evaluate", "options"}
    if unknown:
        raise RhovaeError(f"{where}: unknown section or key {sorted(unknown)[0]!r}")
    grid = raw.get("grid", {})
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise RhovaeError(f"{where}: [grid] must map run settings to non-empty lists")
    evaluate = raw.get("evaluate", {})
    extra = set(evaluate) - {"iwae_k", "iwae_limit", "baseline"}
    if extra:
        raise RhovaeError(f"{where}: unknown key {sorted(extra)[0]!r} in [evaluate]")
    return Experiment(
        name=raw.get("name", Path(str(source)).stem),
        description=raw.get("description", ""),
        grid=grid,
        run=raw.get("run", {}),
        iwae_k=int(evaluate.get("iwae_k", 1000)),
        iwae_limit=int(evaluate.get("iwae_limit", 0)),
        baseline=str(evaluate.get("baseline", "diagonal")),
        options=raw.get("options", {}),
    )


# --- running ----------------------------------------------------------------------------------------


def _finished(run_dir: Path, cfg: RunConfig, iwae_k: int, iwae_limit: int) -> bool:
    path = run_dir / "evaluation.json"
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return (
        record.get("config") == cfg.to_dict()
        and record.get("iwae_k") == iwae_k
        and (iwae_limit == 0 or record.get("test_images") == iwae_limit)
    )


def run_one(run_id: str, cfg_dict: dict, run_dir: str, iwae_k: int, iwae_limit: int, threads: int = 0) -> str:
    """Train (or resume) and evaluate one run; a no-op for a finished one. Returns what it did."""
    import torch

    from rhovae.evaluate import evaluate_run, write_evaluation
    from rhovae.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg = from_dict(cfg_dict)
    path = Path(run_dir)
    if _finished(path, cfg, iwae_k, iwae_limit):
        return "done before"
    resume = (path / "last.pt").exists()
    train(cfg, path, resume=resume, progress=False)
    write_evaluation(path, evaluate_run(path, iwae_k=iwae_k, limit=iwae_limit, device=cfg.device))
    return "resumed" if resume else "trained"


def compare(
    exp: Experiment, out_dir: str | Path, jobs: int = 1, overrides: dict[str, Any] | None = None
) -> Path:
    """Run every point of ``exp`` into ``out_dir/runs`` (skipping finished ones) and write the report."""
    out = Path(out_dir)
    if overrides:
        exp = dataclasses.replace(exp, run={**exp.run, **overrides})
    runs = exp.configs()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(dataclasses.asdict(exp), indent=2) + "\n")
    start = time.perf_counter()
    jobs = max(1, min(jobs, len(runs)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    tasks = [
        (rid, cfg.to_dict(), str(out / "runs" / rid), exp.iwae_k, exp.iwae_limit, threads)
        for rid, cfg in runs
    ]
    if jobs == 1:
        for i, task in enumerate(tasks, 1):
            log.info("[%d/%d] %s: %s", i, len(tasks), task[0], run_one(*task))
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
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
    rows = []
    for rid, cfg, choices in exp.points():
        run_dir = out / "runs" / rid
        path = run_dir / "evaluation.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        with open(run_dir / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        row = {"run": rid, **choices, "kl_estimator": cfg.kl_estimator}
        row.update({k: record[k] for k in METRICS + OPTIONAL_METRICS if k in record})
        row["epoch_seconds"] = sum(float(h["epoch_seconds"]) for h in history) / len(history)
        row["parameters"] = record.get("parameters")
        row["iwae_k"] = record["iwae_k"]
        row["test_images"] = record["test_images"]
        row["_history"] = [(int(h["epoch"]), float(h["test_loss"])) for h in history]
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
        "runs": clean,
        "summary": summary,
        "paired": paired,
        "pictures": pictures,
        "metrics": metrics,
        "note": "paper-legacy runs optimised the reference code's objective, which is NOT an ELBO"
        if legacy
        else "",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    buf = io.StringIO()
    fields = list(clean[0])
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(clean)
    (out / "runs.csv").write_text(buf.getvalue())
    (out / "report.md").write_text(_markdown(exp, report, setup_keys, legacy))
    return out / "report.md"


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
    wall = report["wall_seconds"]
    lines += [
        f"Machine: {m.get('device', '?')}, {m['cpus']} CPUs, torch {m.get('torch', '?')}, "
        f"Python {m['python']}" + (f"; wall time {wall / 60:.1f} min" if wall else "") + ".",
        f"IWAE with k = {exp.iwae_k}"
        + (f" on the first {exp.iwae_limit} test images" if exp.iwae_limit else " on every test image")
        + ". All losses in nats per image.",
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

    pictures = []
    for setup in setups:
        label = "-".join(str(v) for v in setup) or "all"
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
        ax.set_ylabel("test loss (nats per image)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = f"curves-{label}.png"
        fig.savefig(out / path, dpi=100)
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
            fig.savefig(out / path, dpi=100)
            plt.close(fig)
            what = (
                "Random samples from the prior"
                if kind == "samples"
                else "Test images (odd) and reconstructions"
            )
            pictures.append({"title": f"{what}, lowest seed: {title}", "path": path})
    return pictures


def print_summary(report_path: Path, stream=sys.stdout) -> None:
    """A short table for the terminal: each setup's posteriors with test −ELBO and IWAE NLL."""
    report = json.loads((report_path.parent / "report.json").read_text())
    for s in report["summary"]:
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
    for p in report["paired"]:
        d = p["iwae_nll"]
        ci = "" if math.isnan(d["low"]) else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
        print(
            f"Δ IWAE NLL {p['posterior']} − {p['baseline']}: {d['mean']:+.2f}{ci} (95% CI over seeds)",
            file=stream,
        )
    print(f"report: {report_path}", file=stream)
