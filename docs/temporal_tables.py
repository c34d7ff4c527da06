"""The temporal comparisons a `rhovae compare` report does not pair by itself, from the run folders of a
finished (or partial) temporal grid: every (posterior, prior) against the diagonal posterior with the
N(0, I) prior, on the IWAE NLL of the observed values and on the imputation NLL and MSE of the missing
ones, with the KL, the posterior's mean |rho| (ar1) and mean imputation's MSE beside them.

    python docs/temporal_tables.py OUT          # OUT: the compare folder (holds runs/*/evaluation.json)

Prints Markdown. Differences are paired by seed (mean and 95% Student-t interval, as in the reports).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rhovae.experiments.stats import paired_difference

#: (record key, column title, decimals)
MEASURES = (("iwae_nll", "IWAE NLL (observed)", 2), ("imputation_nll", "imput. NLL", 4),
            ("imputation_mse", "imput. MSE", 4))  # fmt: skip


def _load(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("runs/*/evaluation.json")):
        record = json.loads(path.read_text())
        cfg = record["config"]
        stats = record.get("posterior_statistics", {})
        rows.append(
            {
                "dataset": cfg["dataset"],
                "posterior": cfg["posterior"],
                "prior": cfg["prior"],
                "seed": cfg["seed"],
                "kl": record["test_kl"],
                "rho": stats.get("mean_abs_rho", math.nan),
                "mean_mse": record.get("imputation_mse_mean", math.nan),
                **{key: record[key] for key, _, _ in MEASURES},
            }
        )
    return rows


def _paired(rows: list[dict], key: str, a: dict, b: dict, digits: int) -> str:
    def pick(spec):
        return {r["seed"]: r[key] for r in rows if all(r[k] == v for k, v in spec.items())}

    left, right = pick(a), pick(b)
    seeds = sorted(set(left) & set(right))
    if not seeds:
        return "–"
    d = paired_difference([left[s] for s in seeds], [right[s] for s in seeds])
    if d["n"] < 2:
        return f"{d['mean']:+.{digits}f} (1 seed)"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def main() -> None:
    rows = _load(Path(sys.argv[1]))
    order = {"diagonal": 0, "ar1": 1, "banded": 2, "standard": 0, "gp": 2}
    base = {"posterior": "diagonal", "prior": "standard"}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        here = [r for r in rows if r["dataset"] == dataset]
        print(f"\n### {dataset}\n")
        head = ["posterior", "prior", "seeds", *(t for _, t, _ in MEASURES)]
        head += [f"Δ {t} vs diagonal, N(0, I)" for _, t, _ in MEASURES] + ["KL", "mean \\|ρ\\|"]
        print("| " + " | ".join(head) + " |")
        print("|---|---|---:|" + "---:|" * len(MEASURES) + "---|" * len(MEASURES) + "---:|---:|")
        setups = sorted(
            dict.fromkeys((r["posterior"], r["prior"]) for r in here),
            key=lambda s: (order.get(s[1], 9), order.get(s[0], 9), s),
        )
        for posterior, prior in setups:
            spec = {"posterior": posterior, "prior": prior}
            group = [r for r in here if r["posterior"] == posterior and r["prior"] == prior]
            n = len(group)
            cells = [posterior, prior, str(n)]
            cells += [f"{sum(r[k] for r in group) / n:.{dp}f}" for k, _, dp in MEASURES]
            cells += ["–" if spec == base else _paired(here, k, spec, base, dp) for k, _, dp in MEASURES]
            rho = sum(r["rho"] for r in group) / n
            cells += [f"{sum(r['kl'] for r in group) / n:.1f}", "–" if math.isnan(rho) else f"{rho:.3f}"]
            print("| " + " | ".join(cells) + " |")
        mean_mse = [r["mean_mse"] for r in here if not math.isnan(r["mean_mse"])]
        if mean_mse:
            print(f"\nMean imputation (each pixel position's mean over observed training values): MSE "
                  f"{sum(mean_mse) / len(mean_mse):.4f} on the same missing values.")  # fmt: skip


if __name__ == "__main__":
    main()
