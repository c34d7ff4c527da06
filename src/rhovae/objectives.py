"""Training objectives on top of the VAE's per-sample terms: the (β-)ELBO and InfoVAE's MMD objective.

An objective turns one pass's :class:`~rhovae.model.VAEOutput` into the scalar the optimiser minimises
(per sample, averaged over the batch) and the terms it logs. Models and posteriors never see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rhovae.errors import RhovaeError
from rhovae.model import VAE, VAEOutput

__all__ = ["KERNELS", "OBJECTIVES", "Objective", "mmd"]


def _sq_distances(x: Tensor, y: Tensor) -> Tensor:
    """``||x_i - y_j||^2``, ``(n, m)``, clamped at 0 against round-off."""
    return (x.pow(2).sum(-1)[:, None] + y.pow(2).sum(-1)[None, :] - 2 * x @ y.T).clamp_min(0)


def _gaussian_kernel(sq: Tensor, d: int) -> Tensor:
    # bandwidth 2d: the squared distance of two N(0, I_d) draws is 2d on average (InfoVAE's choice, scaled)
    return torch.exp(-sq / (2.0 * d))


def _imq_kernel(sq: Tensor, d: int) -> Tensor:
    # inverse multiquadratic C / (C + ||x - y||^2), C = 2d (Tolstikhin et al. 2018, for N(0, I_d) priors)
    c = 2.0 * d
    return c / (c + sq)


KERNELS = {"gaussian": _gaussian_kernel, "imq": _imq_kernel}


def mmd(x: Tensor, y: Tensor, kernel: str = "imq", unbiased: bool = True) -> Tensor:
    """Squared maximum mean discrepancy between samples ``x (n, d)`` and ``y (m, d)``.

    Unbiased: the U-statistic (diagonal terms dropped), zero in expectation when both come from one
    distribution, possibly negative. Biased: the V-statistic, exactly 0 for identical samples.
    """
    if kernel not in KERNELS:
        raise RhovaeError(f"unknown MMD kernel {kernel!r}; choose one of: {', '.join(sorted(KERNELS))}")
    k = KERNELS[kernel]
    d = x.shape[-1]
    kxx, kyy, kxy = k(_sq_distances(x, x), d), k(_sq_distances(y, y), d), k(_sq_distances(x, y), d)
    n, m = len(x), len(y)
    if unbiased:
        if n < 2 or m < 2:
            raise RhovaeError("the unbiased MMD needs at least two samples on each side")
        xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return xx + yy - 2 * kxy.mean()


@dataclass
class Objective:
    """``elbo``: ``recon + beta * KL``. ``infovae`` (Zhao et al. 2019):
    ``recon + (1 - alpha) * KL + (alpha + lambda - 1) * MMD(q(z) || p(z))``, the MMD between the batch's
    posterior samples and as many prior samples.
    """

    kind: str = "elbo"
    beta: float = 1.0
    alpha: float = 0.0
    lam: float = 1000.0
    kernel: str = "imq"

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise RhovaeError(f"unknown objective {self.kind!r}; choose one of: {', '.join(OBJECTIVES)}")
        if self.kernel not in KERNELS:
            raise RhovaeError(
                f"unknown MMD kernel {self.kernel!r}; choose one of: {', '.join(sorted(KERNELS))}"
            )

    def __call__(self, out: VAEOutput, model: VAE) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch loss (mean over samples, nats) and its extra terms, e.g. ``{"mmd": ...}``."""
        if self.kind == "elbo":
            return (out.recon + self.beta * out.kl).mean(), {}
        prior_z = model.prior().sample((len(out.z),)).to(out.z.dtype)
        divergence = mmd(out.z, prior_z, self.kernel)
        loss = (out.recon + (1 - self.alpha) * out.kl).mean() + (self.alpha + self.lam - 1) * divergence
        return loss, {"mmd": divergence}


OBJECTIVES = ("elbo", "infovae")


def objective_from_config(cfg) -> Objective:
    """The objective a :class:`~rhovae.config.RunConfig` (already resolved) asks for."""
    if not math.isfinite(cfg.beta):
        raise RhovaeError(f"beta must be finite, got {cfg.beta}")
    return Objective(cfg.objective, cfg.beta, cfg.info_alpha, cfg.info_lambda, cfg.mmd_kernel)
