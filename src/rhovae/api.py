"""The Python entry points: ``rhovae.fit`` trains on your data (and networks), ``rhovae.load`` reads a run.

Both go through exactly the trainer and run folder the CLI uses: the same checkpoints, metrics,
resume and evaluation.

    import numpy as np, rhovae
    model, run_dir = rhovae.fit(dict(posterior="ar1", epochs=5), data=np.load("x.npy"))
    model.log_likelihood(x_test[:10], k=100)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from rhovae.config import RunConfig, from_dict
from rhovae.errors import RhovaeError
from rhovae.model import VAE

__all__ = ["Fitted", "fit", "load"]


class Fitted(NamedTuple):
    """What :func:`fit` returns: the trained model (best validation checkpoint, eval mode, with its
    preprocessing) and its run folder."""

    model: VAE
    run_dir: Path


def _config(config: RunConfig | dict[str, Any] | None, settings: dict[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        base = dataclasses.replace(config)
    elif isinstance(config, dict):
        base = from_dict(config, where="fit(config)")
    elif config is None:
        base = RunConfig()
    else:
        raise RhovaeError(f"config must be a RunConfig, a dict or None, got {type(config).__name__}")
    return from_dict(settings, base=base, where="fit(...)")


def fit(
    config: RunConfig | dict[str, Any] | None = None,
    *,
    data: Any = None,
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    overwrite: bool = False,
    **settings: Any,
) -> Fitted:
    """Train a VAE and return ``(model, run_dir)``.

    Args:
        config: a :class:`RunConfig`, a dict of its fields, or None; ``settings`` (keyword arguments
            named like its fields, e.g. ``posterior="ar1", epochs=5``) override it.
        data: a Tensor or ndarray ``(N, ...)`` (uint8 is scaled by 1/255, floats are used as they are;
            a validation split is held out as for files), a dict of such arrays with keys ``train`` and
            optionally ``val``, ``test`` and ``*_labels``, or a ``torch.utils.data.Dataset`` whose items
            are tensors or ``(tensor, label)`` pairs. None: the dataset the config names.
        encoder: your own encoder network (give ``decoder`` too, or neither): any ``nn.Module``
            mapping ``x (B, *data_shape) -> (B, F)`` features. No subclassing; the run records
            ``model = "custom"``.
        decoder: your own decoder network: ``z (N, d) ->`` the likelihood's parameters
            ``(N, *data_shape)`` (Bernoulli logits, Gaussian means, ...) or a Distribution over x.
        run_dir: the run folder (default ``runs/fit-POSTERIOR-dD-sSEED``).
        resume: continue the run in ``run_dir`` from its ``last.pt``, on the same data (checkpoints
            record the training split's fingerprint).
        progress: show a progress bar per epoch.
        overwrite: replace the run ``run_dir`` holds (rhovae's files only).
        **settings: run settings named like :class:`RunConfig`'s fields.

    Example::

        model, run_dir = rhovae.fit(posterior="ar1", latent_dim=8, epochs=3, data=np.random.rand(500, 20),
                                    likelihood="gaussian")
    """
    from rhovae.data import raw_from_python
    from rhovae.runs import load_run, pick_device, prepare_data
    from rhovae.train import train

    cfg = _config(config, settings)
    custom = encoder is not None or decoder is not None
    if custom:
        if encoder is None or decoder is None:
            raise RhovaeError("give both an encoder and a decoder, or neither (the backbone's pair)")
        cfg.model = "custom"
    given = data is not None
    if given:
        cfg.dataset = "python"
    cfg.validate(custom_networks=custom, python_data=given)
    run_dir = (
        Path(run_dir)
        if run_dir is not None
        else Path("runs") / (f"fit-{cfg.posterior}-d{cfg.latent_dim}-s{cfg.seed}".replace("+", "_"))
    )
    prepared = None
    if given:
        prepared = prepare_data(cfg, pick_device(cfg.device), raw=raw_from_python(data))
    if resume and overwrite:
        raise RhovaeError("resume continues a run and overwrite replaces it; give one of them")
    train(
        cfg, run_dir, resume=resume, progress=progress, data=prepared, encoder=encoder, decoder=decoder,
        overwrite=overwrite,
    )  # fmt: skip
    model, _, _ = load_run(run_dir, "best", cfg.device, encoder=encoder, decoder=decoder)
    return Fitted(model, run_dir)


def load(
    run_dir: str | Path,
    checkpoint: str = "best",
    device: str = "auto",
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
) -> VAE:
    """The model of a run folder (``best.pt`` or ``last.pt``) in eval mode, with its preprocessing:
    ``encode``, ``reconstruct``, ``elbo`` and ``log_likelihood`` accept raw inputs as training saw them
    (``decode`` takes z, ``sample`` a count). Runs of your own networks need fresh
    ``encoder``/``decoder`` instances of the same classes (rhovae never pickles code)."""
    from rhovae.runs import load_run

    if checkpoint not in ("best", "last"):
        raise RhovaeError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    model, _, _ = load_run(run_dir, checkpoint, device, encoder=encoder, decoder=decoder)
    return model
