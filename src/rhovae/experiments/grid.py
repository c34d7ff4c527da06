"""An experiment: a grid of run settings from a TOML file or a preset, checked and expanded into runs.

See :mod:`rhovae.experiments` for the file's format. Every point of the grid is one run, with an id
(:func:`file_label` safe) that names its folder.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rhovae.config import RunConfig, from_dict, parse_toml
from rhovae.errors import RhovaeError
from rhovae.files import read_toml_text

log = logging.getLogger(__name__)

__all__ = ["MAX_GRID_POINTS", "PRESETS", "Experiment", "file_label", "load_experiment"]

# every TOML file shipped in rhovae/presets is a preset: adding one is adding a file
PRESETS = tuple(
    sorted(
        f.name[: -len(".toml")]
        for f in resources.files("rhovae.presets").iterdir()
        if f.name.endswith(".toml")
    )
)


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
        stable order. Points that resolve to one run because a grid value does not apply to it (the
        posterior of a model without a latent, ``latent_dim = 0``) or because an option sets that grid
        key itself (an option ``flat = {latent_shape = "", posterior = "diagonal"}`` beside a posterior
        axis: the option's value wins) are one run, listed once, with the first point's values."""
        keys = list(self.grid)
        runs, seen = [], set()
        for values in itertools.product(*(self.grid[k] for k in keys)):
            settings = dict(self.run)
            overridden = set()  # plain grid keys an option sets (a flat reference's posterior)
            for k, v in zip(keys, values, strict=True):
                if k in self.options:
                    if v not in self.options[k]:
                        raise RhovaeError(
                            f"experiment {self.name!r}: {k} = {v!r} is not one of [options.{k}]: "
                            f"{', '.join(self.options[k])}"
                        )
                    settings.update(self.options[k][v])
                    overridden.update(set(self.options[k][v]) & set(keys))
                elif k not in overridden:
                    settings[k] = v
            if settings.get("dataset") == "auto":
                settings.update(_auto_dataset(settings))
            cfg = from_dict(settings, where=f"experiment {self.name!r}").validate()
            choices = {
                k: (v if k in self.options else getattr(cfg, k)) for k, v in zip(keys, values, strict=True)
            }
            for k in overridden:
                choices[k] = getattr(cfg, k)
            if overridden:  # the run is named after what ran, not after the grid value the option beat
                values = tuple(
                    getattr(cfg, k) if k in overridden else v for k, v in zip(keys, values, strict=True)
                )
            if cfg.latent_dim == 0 or overridden:  # one run, listed once, whatever the grid says
                key = repr(sorted(cfg.to_dict().items()))
                if key in seen:
                    continue
                seen.add(key)
                if "posterior" in choices and cfg.latent_dim == 0:  # the language model has none
                    choices["posterior"] = "none"
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
        text = read_toml_text(
            path, "an experiment", f"no such experiment file (presets: {', '.join(PRESETS)})"
        )
        where = str(path)
    raw = parse_toml(text, where, "an experiment")
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
