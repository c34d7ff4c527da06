"""The report of a grid (``report.md``, ``report.json``, ``runs.csv`` and pictures), written from the
run folders so it can be rebuilt at any time, and its short summary for the terminal."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

from rhovae.errors import RhovaeError
from rhovae.experiments.grid import Experiment, file_label
from rhovae.experiments.records import _evaluation, _matches
from rhovae.experiments.stats import _mean_sd, paired_difference
from rhovae.files import require_regular_file, strict_json
from rhovae.runs import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["METRICS", "METRIC_NAMES", "OPTIONAL_METRICS", "print_summary", "write_report"]

METRICS = ["test_neg_elbo", "iwae_nll", "test_recon", "test_kl", "active_units", "epoch_seconds"]
# reported when every run of a grid has them (sequence runs)
OPTIONAL_METRICS = [
    "recon_seq_acc",
    "recon_token_acc",
    "validity",
    "uniqueness",
    "novelty",
    "interpolation_validity",
    "mutual_information",
    "imputation_nll",
    "imputation_mse",
    "imputation_mse_mean",
]
#: paired like the bounds when every run of a pair has them (frame sequences with known missing values)
PAIRED_OPTIONAL = ["imputation_nll", "imputation_mse"]
METRIC_NAMES = {
    "imputation_nll": "imput. NLL/value",
    "imputation_mse": "imput. MSE",
    "imputation_mse_mean": "mean-imput. MSE",
    "recon_seq_acc": "recon. sequences",
    "recon_token_acc": "recon. tokens",
    "validity": "validity",
    "uniqueness": "uniqueness",
    "novelty": "novelty",
    "interpolation_validity": "interp. validity",
    "mutual_information": "MI",
    "test_neg_elbo": "test −ELBO",
    "iwae_nll": "IWAE NLL",
    "test_recon": "reconstruction",
    "test_kl": "KL",
    "active_units": "active units",
    "epoch_seconds": "s/epoch",
}


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
            # the posterior column names each run's family also where the grid does not vary it
            row.setdefault("posterior", "none" if cfg.latent_dim == 0 else cfg.posterior)
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
        row["_language_model"] = cfg.latent_dim == 0
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
                "posterior": post
                if post is not None
                else "/".join(dict.fromkeys(r["posterior"] for r in group)),
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
            for m in PAIRED_OPTIONAL:
                if all(m in a and m in b for a, b in pairs):
                    entry[m] = paired_difference(
                        [float(a[m]) for a, _ in pairs], [float(b[m]) for _, b in pairs]
                    )
            paired.append(entry)

    versus_lm = _versus_language_model(exp, rows, setup_keys)
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
        "grid_runs": len(exp.points()),  # after merging points that are one run (a language model's)
        "runs": clean,
        "summary": summary,
        "paired": paired,
        "versus_lm": versus_lm,
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
            _fmt(
                s[k],
                1
                if k == "active_units"
                else 4
                if k.startswith("imputation")
                else 3
                if k in OPTIONAL_METRICS
                else 2,
            )
            for k in metrics
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
        extra = [m for m in PAIRED_OPTIONAL if all(m in p for p in report["paired"])]
        head = [*setup_keys, "posterior", "n", "Δ test −ELBO [95% CI]", "Δ IWAE NLL [95% CI]"]
        head += [f"Δ {METRIC_NAMES[m]} [95% CI]" for m in extra]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in report["paired"]:
            cells = [str(p[k]) for k in setup_keys] + [p["posterior"], str(p["test_neg_elbo"]["n"])]
            for key in ("test_neg_elbo", "iwae_nll", *extra):
                d = p[key]
                digits = 2 if key in ("test_neg_elbo", "iwae_nll") else 4
                ci = "" if math.isnan(d["low"]) else f" [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"
                cells.append(f"{d['mean']:+.{digits}f}{ci}")
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("versus_lm"):
        lines += [
            "",
            "## Against the language model: IWAE NLL − LM NLL, seed by seed",
            "",
            "The language model is the same decoder without a latent (`latent_dim = 0`), trained and "
            "evaluated alike; its NLL is exact. Negative: the VAE's bound is below the LM's NLL. Mean "
            "difference with its 95% Student-t interval over seeds, and the VAE's mean KL, MI and active "
            "units beside it.",
            "",
        ]
        head = [*setup_keys, "posterior", "n", "Δ IWAE NLL vs LM [95% CI]", "KL", "MI", "active units"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in report["versus_lm"]:
            d = p["iwae_nll"]
            ci = "" if math.isnan(d["low"]) else f" [{d['low']:+.2f}, {d['high']:+.2f}]"
            cells = [str(p[k]) for k in setup_keys] + [
                str(p["posterior"]),
                str(d["n"]),
                f"{d['mean']:+.2f}{ci}",
            ]
            cells += [
                f"{p[k]:.2f}" if isinstance(p.get(k), float) else "–"
                for k in ("test_kl", "mutual_information")
            ]
            cells.append(f"{p['active_units']:.1f}")
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


def _versus_language_model(exp: Experiment, rows: list[dict[str, Any]], setup_keys: list[str]) -> list[dict]:
    """Each VAE setup's paired difference IWAE NLL − LM NLL, where the grid holds language models
    (``latent_dim = 0``): pairs share the seed and every grid value that is a run setting (the dataset,
    the model, ...); named option bundles (the remedy that made a run the LM) are what differs."""
    lms = [r for r in rows if r["_language_model"]]
    if not lms:
        return []
    match = [k for k in setup_keys if k not in exp.options and k != "latent_dim"]
    lm_of = {(tuple(r[k] for k in match), r.get("seed")): r for r in lms}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        lm = lm_of.get((tuple(r[k] for k in match), r.get("seed")))
        if r["_language_model"] or lm is None:
            continue
        groups.setdefault((*(r[k] for k in setup_keys), r.get("posterior")), []).append((r, lm))
    out = []
    for key, pairs in groups.items():
        entry = dict(zip([*setup_keys, "posterior"], key, strict=True))
        entry["iwae_nll"] = paired_difference(
            [float(a["iwae_nll"]) for a, _ in pairs], [float(b["iwae_nll"]) for _, b in pairs]
        )
        for m in ("test_kl", "mutual_information", "active_units"):
            values = [float(a[m]) for a, _ in pairs if m in a]
            entry[m] = sum(values) / len(values) if values else None
        out.append(entry)
    return out


def _pictures(exp, out: Path, rows, setup_keys, setups, posteriors) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from rhovae.plots import save_figure

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
        path = f"curves-{label}.png"
        save_figure(fig, out / path)
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
            path = f"{kind}-{label}.png"
            save_figure(fig, out / path)
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
        total = report.get("grid_runs") or math.prod(len(v) for v in grid.values())
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
