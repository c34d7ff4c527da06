"""The original reference code's AR(1) training computations, for the clearly labelled legacy mode only.

Written from the description in docs/math.md §13 (and ../shared/MATH.md §6), not from its code. Neither
is correct mathematics: the sampler is a random walk in which rho never appears, and the KL mixes a
batch sum with a batch mean. They exist so that a report can show how the published curves arise.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions.utils import _standard_normal

from rhovae.distributions.ar1 import AR1Normal, _one_minus_rho_sq

__all__ = ["PaperLegacyAR1", "paper_legacy_kl_total"]


class PaperLegacyAR1(AR1Normal):
    """Samples like the reference training script: ``u_0 = sqrt(s) eps_0``, ``u_j = u_(j-1) + sqrt(s) eps_j``.

    Its ``log_prob``, ``entropy`` and KLs are still those of the AR(1) Gaussian it claims to be, exactly
    the mismatch of the reference code: the samples do not have covariance ``s T(rho)``.
    """

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * eps.cumsum(-1)


def paper_legacy_kl_total(loc: Tensor, rho: Tensor, scale: Tensor) -> Tensor:
    """The reference code's KL for a batch, a scalar:
    ``1/2 (sum_(batch, dims) mu^2 + mean_batch[-d log s - (d-1) log(1-rho^2) + d (s - 1)])``.

    Args: ``loc (B, d)``, ``rho (B, 1)``, ``scale (B, 1)`` with ``s = scale^2``. Divided by B it is the
    per-sample term the reference adds to its per-sample reconstruction: weight 1 on ``|mu|^2``, 1/B on
    the covariance terms.
    """
    d = loc.shape[-1]
    s = scale[..., 0].pow(2)
    covariance = -d * s.log() - (d - 1) * _one_minus_rho_sq(rho)[..., 0].log() + d * (s - 1)
    return 0.5 * (loc.pow(2).sum() + covariance.mean())
