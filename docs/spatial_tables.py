"""The latent-map comparisons a `rhovae compare` report does not pair by itself, from the run folders
of a finished (or partial) spatial grid: each (posterior, prior) against the diagonal map with N(0, I),
the ar1-2d prior against N(0, I) for each posterior, and each map setup against the flat z = 10 cnn;
with the KL in nats per image and per latent unit, the mutual information and the active units.

    python docs/spatial_tables.py OUT          # OUT: the compare folder (holds runs/*/evaluation.json)

Prints Markdown. Differences are paired by seed (mean and 95% Student-t interval, as in the reports).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rhovae.experiments.stats import paired_difference


def _load(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("runs/*/evaluation.json")):
        record = json.loads(path.read_text())
        cfg = record["config"]
        rows.append(
            {
                "dataset": cfg["dataset"],
                "latent": cfg["latent_shape"] or f"flat {cfg['latent_dim']}",
                "posterior": cfg["posterior"],
                "prior": cfg["prior"],
                "seed": cfg["seed"],
                "units": cfg["latent_dim"],
                "iwae": record["iwae_nll"],
                "kl": record["test_kl"],
                "mi": record.get("mutual_information", float("nan")),
                "active": record["active_units"],
            }
        )
    return rows


def _interval(d: dict) -> str:
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def _paired(rows: list[dict], a: dict, b: dict) -> str:
    def pick(spec):
        return {r["seed"]: r["iwae"] for r in rows if all(r[k] == v for k, v in spec.items())}

    left, right = pick(a), pick(b)
    seeds = sorted(set(left) & set(right))
    if not seeds:
        return "–"
    return _interval(paired_difference([left[s] for s in seeds], [right[s] for s in seeds]))


def main() -> None:
    out = Path(sys.argv[1])
    rows = _load(out)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        here = [r for r in rows if r["dataset"] == dataset]
        maps = [r for r in here if not r["latent"].startswith("flat")]
        flat = [r for r in here if r["latent"].startswith("flat")]
        print(f"\n### {dataset}\n")
        print(
            "| posterior | prior | seeds | IWAE NLL | Δ vs diagonal, N(0, I) | Δ ar1-2d prior vs N(0, I) "
            "| Δ vs flat z = 10 | KL / image | KL / unit | MI | active units |"
        )
        print("|---|---|---:|---:|---|---|---|---:|---:|---:|---:|")
        order = {"diagonal": 0, "ar1-2d": 1, "ar1-2d-diag": 2, "ar1": 3, "standard": 0}
        setups = sorted(
            dict.fromkeys((r["posterior"], r["prior"], r["latent"]) for r in maps),
            key=lambda s: (order.get(s[1], 9), order.get(s[0], 9), s),
        )
        for posterior, prior, latent in setups:
            group = [
                r for r in maps if (r["posterior"], r["prior"], r["latent"]) == (posterior, prior, latent)
            ]
            n = len(group)
            mean = {k: sum(r[k] for r in group) / n for k in ("iwae", "kl", "mi", "active")}
            spec = {"posterior": posterior, "prior": prior, "latent": latent}
            base = {"posterior": "diagonal", "prior": "standard", "latent": latent}
            versus_base = "–" if spec == base else _paired(maps, spec, base)
            versus_prior = _paired(maps, spec, {**spec, "prior": "standard"}) if prior != "standard" else "–"
            versus_flat = _paired(here, spec, {"latent": flat[0]["latent"]}) if flat else "–"
            print(
                f"| {posterior} | {prior} | {n} | {mean['iwae']:.2f} | {versus_base} | {versus_prior} | "
                f"{versus_flat} | {mean['kl']:.1f} | {mean['kl'] / group[0]['units']:.3f} | {mean['mi']:.2f} "
                f"| {mean['active']:.0f} of {group[0]['units']} |"
            )
        if flat:
            n = len(flat)
            iwae, kl = sum(r["iwae"] for r in flat) / n, sum(r["kl"] for r in flat) / n
            mi, active = sum(r["mi"] for r in flat) / n, sum(r["active"] for r in flat) / n
            units = flat[0]["units"]
            print(
                f"| flat z = {units}: diagonal | standard | {n} | {iwae:.2f} | – | – | – | {kl:.1f} | "
                f"{kl / units:.3f} | {mi:.2f} | {active:.0f} of {units} |"
            )


if __name__ == "__main__":
    main()
