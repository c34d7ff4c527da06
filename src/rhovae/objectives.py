"""Training objectives on top of the VAE's per-sample terms: the (β-)ELBO and InfoVAE's MMD objective.

An objective turns one pass's :class:`~rhovae.model.VAEOutput` into the scalar the optimiser minimises
(per sample, averaged over the batch) and the terms it logs. Models and posteriors never see it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, kl_divergence

from rhovae.errors import RhovaeError
from rhovae.hierarchy import group_free_bits_kl
from rhovae.legacy import legacy_kl_term
from rhovae.model import VAE, VAEOutput

__all__ = [
    "KERNELS",
    "OBJECTIVES",
    "Objective",
    "batch_loss",
    "mmd",
    "objective_from_config",
    "per_dimension_kl",
]


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


def per_dimension_kl(q: Distribution, p: Distribution) -> Tensor | None:
    """``KL_j`` per latent dimension ``(B, d)`` (``(B, C, H, W)`` over a latent map; ``(B, C)``, one per
    channel's trajectory, for the frames model) when both sides factorise over dimensions (independent
    components with a registered KL), else None:
    for AR(1), full-covariance and flow posteriors the KL does not split into per-dimension terms."""
    if not (isinstance(q, Independent) and isinstance(p, Independent)):
        return None
    if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims or q.event_shape != p.event_shape:
        return None
    try:
        return kl_divergence(q.base_dist, p.base_dist)
    except NotImplementedError:
        return None


@dataclass
class Objective:
    """The scalar a step minimises, from one pass's per-sample terms (``recon``, ``kl``, ``z``).

    ``elbo``: ``recon + beta_t * KL``. ``infovae`` (Zhao et al. 2019):
    ``recon + (1 - alpha) * KL + (alpha + lambda - 1) * MMD(q(z) || p(z))``, the MMD between the batch's
    posterior samples and as many prior samples.

    KL warm-up: ``beta_t`` rises linearly from ``warmup_start`` to ``beta`` over ``warmup`` units of
    training progress (epochs or steps, as the trainer counts them), then stays (notes eq. 13).

    Cyclical annealing (Fu et al., NAACL 2019), ``cycles = M > 0``: training (``total`` units, set by the
    trainer) is split into M equal cycles; in each, ``beta_t`` rises linearly from 0 to ``beta`` over the
    first fraction ``cycle_rise = R`` of the cycle and then stays at ``beta`` (their eq. 4-5).

    Free bits (Kingma et al. 2016, notes eq. 14), ``free_bits = lambda > 0``: the KL term becomes
    ``sum_j max(lambda, KL_j)`` over ``free_bits_groups`` groups of latent dimensions, each ``KL_j``
    averaged over the batch before the max. Where the KL does not factorise (AR(1), full, flows) the
    whole-vector form ``max(lambda * d, KL)`` is used: see :func:`per_dimension_kl`.
    """

    kind: str = "elbo"
    beta: float = 1.0
    alpha: float = 0.0
    lam: float = 1000.0
    kernel: str = "imq"
    warmup: float = 0.0
    warmup_start: float = 0.0
    free_bits: float = 0.0
    free_bits_groups: int = 0  # 0: one group per latent dimension
    kl_estimator: str = "exact"  # "paper-legacy": the reference code's batch-mixed KL (not an ELBO)
    cycles: int = 0  # cyclical annealing: the number of cycles (0: off)
    cycle_rise: float = 0.5  # the fraction of each cycle over which beta rises

    def __post_init__(self) -> None:
        # settings are validated where they enter (RunConfig.validate); this is the loss only
        self.progress = 0.0
        self.total = 1.0  # the training's length in progress units (the trainer sets it)

    def at_target(self) -> Objective:
        """This objective at its target β, without warm-up or cycles: what validation and test losses
        are measured with, so that best.pt, early stopping and the learning-rate schedule compare
        epochs on one scale (with β still rising or cycling, an early epoch would look better only
        because its KL weighs less)."""
        if self.warmup <= 0 and self.cycles <= 0:
            return self
        target = dataclasses.replace(self, warmup=0.0, cycles=0)
        return target

    def kl_weight(self, progress: float | None = None) -> float:
        """``beta_t`` at ``progress`` (epochs or steps done; default: the last one set)."""
        t = self.progress if progress is None else progress
        if self.cycles > 0:
            period = self.total / self.cycles
            within = (t % period) / period  # the fraction of its cycle done
            return self.beta * min(1.0, within / self.cycle_rise)
        if self.warmup <= 0:
            return self.beta
        return self.warmup_start + (self.beta - self.warmup_start) * min(1.0, t / self.warmup)

    def _kl_term(self, out: VAEOutput, model: VAE) -> Tensor:
        """The batch's KL contribution (a scalar, per sample), clamped by free bits if asked."""
        if self.kl_estimator == "paper-legacy":
            # the reference code's batch total divided by B (docs/math.md §13): not a KL per sample
            legacy = legacy_kl_term(out.q)
            if legacy is not None:
                return legacy
        if self.free_bits <= 0:
            return out.kl.mean()
        grouped = group_free_bits_kl(out.q, self.free_bits)  # latent groups: per group
        if grouped is not None:
            return grouped
        d = model.latent_dim  # every unit, C * H * W for a latent map, C * T for trajectories
        per_dim = per_dimension_kl(out.q, model.prior()) if out.kl_exact else None
        if per_dim is None:
            return torch.clamp(out.kl.mean(), min=self.free_bits * d)
        parts = per_dim[0].numel()
        if parts != d:  # the KL splits into coarser parts (a trajectory per channel): free bits per part
            return torch.clamp(per_dim.mean(0).reshape(-1), min=self.free_bits * d / parts).sum()
        groups = self.free_bits_groups or d
        per_group = per_dim.mean(0).reshape(groups, d // groups).sum(-1)
        return torch.clamp(per_group, min=self.free_bits * d / groups).sum()

    def __call__(self, out: VAEOutput, model: VAE) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch loss (mean over samples, nats) and its extra terms, e.g. ``{"mmd": ...}``."""
        if self.kind == "elbo":
            return out.recon.mean() + self.kl_weight() * self._kl_term(out, model), {}
        prior_z = model.prior().sample((len(out.z),)).to(out.z.dtype)
        divergence = mmd(out.z.flatten(1), prior_z.flatten(1), self.kernel)  # a latent map as a vector
        kl = self._kl_term(out, model)
        loss = out.recon.mean() + (1 - self.alpha) * kl + (self.alpha + self.lam - 1) * divergence
        return loss, {"mmd": divergence}


OBJECTIVES = ("elbo", "infovae")


def batch_loss(model: VAE, x: Tensor, objective: Objective | None = None) -> Tensor:
    """The scalar a training step on ``x`` minimises (default objective: the ELBO), in nats per sample."""
    return (objective or Objective())(model(x), model)[0]


def objective_from_config(cfg) -> Objective:
    """The objective a :class:`~rhovae.config.RunConfig` (validated and resolved) asks for."""
    return Objective(
        cfg.objective,
        cfg.beta,
        cfg.info_alpha,
        cfg.info_lambda,
        cfg.mmd_kernel,
        cfg.kl_warmup,
        cfg.kl_warmup_start,
        cfg.free_bits,
        cfg.free_bits_groups,
        cfg.kl_estimator,
        cfg.kl_cycles,
        cfg.kl_cycle_rise,
    )
