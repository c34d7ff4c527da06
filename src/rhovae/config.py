"""The run configuration: one typed dataclass, read from and written to TOML.

A run folder holds ``config.toml``, the resolved configuration it was trained with; the CLI reads a
``--config FILE.toml`` and lets flags override it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rhovae.errors import RhovaeError
from rhovae.model import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RESUMABLE_FIELDS", "RunConfig", "load_config", "to_toml"]


@dataclass
class RunConfig(ModelConfig):
    """Everything that determines a training run (model fields come from :class:`ModelConfig`)."""

    dataset: str = "fashion-mnist"
    data_dir: str = ""  # empty: the dataset's default sources
    pixels: str = "continuous"
    val_size: int = 5000
    limit: int = 0  # > 0: keep only this many images per split (smoke tests)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    lr_patience: int = 2
    lr_factor: float = 0.5
    early_stopping: int = 0  # > 0: stop after this many epochs without validation improvement
    beta: float = -1.0  # -1: the model's default (1; 4 for betavae)
    objective: str = ""  # empty: the model's default (elbo; infovae for infovae)
    info_alpha: float = 0.0
    info_lambda: float = 1000.0
    mmd_kernel: str = "imq"
    kl_warmup: int = 0  # > 0: beta rises linearly from kl_warmup_start over this many units
    kl_warmup_unit: str = "epochs"  # or "steps"
    kl_warmup_start: float = 0.0
    free_bits: float = 0.0  # > 0: nats per latent dimension (Kingma et al. 2016)
    free_bits_groups: int = 0  # groups of latent dimensions for free bits (0: one per dimension)
    seed: int = 0
    device: str = "auto"
    pictures: bool = True

    def validate(self) -> RunConfig:
        positive = ["latent_dim", "hidden", "epochs", "batch_size", "val_size", "flow_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise RhovaeError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.kl_estimator not in ("exact", "paper-legacy"):
            raise RhovaeError(f"unknown kl-estimator {self.kl_estimator!r}; choose exact or paper-legacy")
        if self.kl_estimator == "paper-legacy" and self.posterior not in ("ar1", "diagonal"):
            raise RhovaeError(
                "kl-estimator paper-legacy exists for the ar1 and diagonal posteriors, "
                f"not {self.posterior!r}"
            )
        if self.kl_warmup_unit not in ("epochs", "steps"):
            raise RhovaeError(f"kl-warmup-unit must be epochs or steps, got {self.kl_warmup_unit!r}")
        if self.free_bits_groups and self.latent_dim % self.free_bits_groups:
            raise RhovaeError(
                f"free-bits-groups must divide latent-dim {self.latent_dim}, got {self.free_bits_groups}"
            )
        if not self.free_bits >= 0 or not self.kl_warmup_start >= 0:
            raise RhovaeError("free-bits and kl-warmup-start must be >= 0")
        for name in ("limit", "early_stopping", "lr_patience", "kl_warmup", "free_bits_groups"):
            if getattr(self, name) < 0:
                raise RhovaeError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RhovaeError(f"lr must be positive, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise RhovaeError(f"lr-factor must be in (0, 1), got {self.lr_factor}")
        from rhovae.model import MODELS

        if self.model in MODELS:  # resolve the model's defaults, so config.toml records what ran
            if self.beta == -1.0:
                self.beta = MODELS[self.model].beta
            if not self.objective:
                self.objective = MODELS[self.model].objective
        if not self.beta >= 0:
            raise RhovaeError(f"beta must be >= 0 (or -1 for the model's default), got {self.beta}")
        # Names are checked before any data is read, so a typo fails in a second, not after loading.
        from rhovae.data import DATASETS, PIXEL_MODES
        from rhovae.likelihoods import LIKELIHOODS
        from rhovae.objectives import KERNELS, OBJECTIVES
        from rhovae.posteriors import posterior_names
        from rhovae.priors import PRIORS

        for what, value, known in (
            ("model", self.model, MODELS),
            ("posterior", self.posterior, posterior_names()),
            ("prior", self.prior, PRIORS),
            ("likelihood", self.likelihood, LIKELIHOODS),
            ("dataset", self.dataset, DATASETS),
            ("pixel mode", self.pixels, PIXEL_MODES),
            ("objective", self.objective, OBJECTIVES),
            ("MMD kernel", self.mmd_kernel, KERNELS),
        ):
            if value not in known:
                raise RhovaeError(f"unknown {what} {value!r}; choose one of: {', '.join(sorted(known))}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run may change without becoming a different run.
RESUMABLE_FIELDS = frozenset({"epochs", "device", "pictures", "early_stopping"})


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise RhovaeError(f"config key {name!r} must be a {kind.__name__}, got {value!r}")


def from_dict(values: dict[str, Any], base: RunConfig | None = None, where: str = "config") -> RunConfig:
    """A :class:`RunConfig` from ``values`` over ``base``; unknown keys and wrong types are errors."""
    base = base or RunConfig()
    known = {f.name: f for f in fields(RunConfig)}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise RhovaeError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        out[name] = _coerce(key, value, getattr(RunConfig(), name))
    return dataclasses.replace(base, **out)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RhovaeError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise RhovaeError(f"{path}: not valid TOML ({e})") from None
    return from_dict(values, where=str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(cfg: RunConfig) -> str:
    lines = ["# rhovae run configuration (resolved)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.to_dict().items()]
    return "\n".join(lines) + "\n"
