"""The original reference code's AR(1) training computations: the clearly labelled ``paper-legacy`` mode.

Everything this mode does lives here: which posteriors it applies to, the head that samples like the
reference training script, and the batch-mixed KL term the objective uses. Written from the
description in docs/math.md §13 (and ../shared/MATH.md §6), not from the reference code. Neither is
correct mathematics: the sampler is a random walk in which rho never appears, and the KL mixes a batch
sum with a batch mean. They exist so that a report can show how the published curves arise;
evaluation always uses the exact AR(1) distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.distributions.utils import _standard_normal

from rhovae.distributions.ar1 import AR1Normal
from rhovae.posteriors import AR1GaussianHead

__all__ = [
    "ESTIMATORS",
    "LEGACY_POSTERIORS",
    "PaperLegacyAR1",
    "PaperLegacyAR1Head",
    "legacy_kl_term",
    "paper_legacy_kl_total",
]

ESTIMATORS = ("exact", "paper-legacy")
#: the reference compared its AR(1) posterior with a diagonal one (whose KL it computed exactly)
LEGACY_POSTERIORS = ("ar1", "diagonal")


class PaperLegacyAR1(AR1Normal):
    """Samples like the reference training script: ``u_0 = sqrt(s) eps_0``, ``u_j = u_(j-1) + sqrt(s) eps_j``.

    Its ``log_prob``, ``entropy`` and KLs are still those of the AR(1) Gaussian it claims to be, exactly
    the mismatch of the reference code: the samples do not have covariance ``s T(rho)``.
    """

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * eps.cumsum(-1)


class PaperLegacyAR1Head(AR1GaussianHead):
    """The AR(1) head (same parameters) whose distribution samples like the reference code in
    training mode only; in eval mode it is the exact :class:`AR1Normal`."""

    def forward(self, h: Tensor) -> Distribution:
        q = super().forward(h)
        if not self.training:
            return q
        return PaperLegacyAR1(q.loc, q.rho, q.scale, validate_args=False)


def paper_legacy_kl_total(loc: Tensor, rho: Tensor, scale: Tensor) -> Tensor:
    """The reference code's KL for a batch, a scalar:
    ``1/2 (sum_(batch, dims) mu^2 + mean_batch[-d log s - (d-1) log(1-rho^2) + d (s - 1)])``.

    Args: ``loc (B, d)``, ``rho (B, 1)``, ``scale (B, 1)`` with ``s = scale^2``. Divided by B it is the
    per-sample term the reference adds to its per-sample reconstruction: weight 1 on ``|mu|^2``, 1/B on
    the covariance terms.
    """
    d = loc.shape[-1]
    s = scale[..., 0].pow(2)
    one_minus_rho_sq = (1 - rho[..., 0]) * (1 + rho[..., 0])
    covariance = -d * s.log() - (d - 1) * one_minus_rho_sq.log() + d * (s - 1)
    return 0.5 * (loc.pow(2).sum() + covariance.mean())


def legacy_kl_term(q: Distribution) -> Tensor | None:
    """The batch's KL contribution per sample under the reference code's estimator, or None where the
    reference computed the KL exactly (its diagonal baseline)."""
    if not isinstance(q, AR1Normal):
        return None
    return paper_legacy_kl_total(q.loc, q.rho, q.scale) / q.loc.shape[0]
