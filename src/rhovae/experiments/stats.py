"""The statistics of a report: mean and sd over seeds, paired differences with a Student-t interval."""

from __future__ import annotations

import math

from rhovae.errors import RhovaeError

__all__ = ["paired_difference"]


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
