"""Distributions of rhovae: ``torch.distributions``-compatible, with closed-form KLs registered."""

from rhovae.distributions import kl  # noqa: F401  (registers the KL pairs)
from rhovae.distributions.ar1 import AR1Normal, ar1_filter
from rhovae.distributions.ar1_2d import SeparableAR1Normal
from rhovae.distributions.banded import BandedNormal
from rhovae.distributions.gp import GaussianProcessPrior, cauchy_kernel
from rhovae.distributions.kl import kl_ar1_standard_normal
from rhovae.distributions.latent_map import LatentMap
from rhovae.distributions.standard_normal import StandardNormal

__all__ = [
    "AR1Normal",
    "BandedNormal",
    "GaussianProcessPrior",
    "LatentMap",
    "SeparableAR1Normal",
    "StandardNormal",
    "ar1_filter",
    "cauchy_kernel",
    "kl_ar1_standard_normal",
]
