"""Priors ``p(z)`` as modules that return a distribution (so a learned prior trains with the model).

``forward()`` takes no input and returns ``p(z)``: event shape ``(d,)``, batch shape ``()``, with
``log_prob`` for ``(B, d)`` and ``(m, B, d)`` and ``sample((n,))``. Registry :data:`PRIORS`::

    name        p(z)                                     log_prob            sample
    standard    StandardNormal, N(0, I)                  O(d)                O(d)
    ar1         AR1Normal, learned N(0, s T(rho))        O(d)                O(d log d) scan
    made        MADENormal, Gaussian autoregressive      one MADE pass       d MADE passes

Which ``KL(q || p)`` the VAE gets in closed form (``kl_divergence``; pairs registered in
:mod:`rhovae.distributions.kl` or by torch) and which fall back to the one-sample Monte-Carlo estimate
``log q(z) - log p(z)`` at the posterior's own sample (unbiased, see tests/test_priors.py)::

    posterior (head)            q's type                  standard   ar1       made
    diagonal                    Independent(Normal)       closed     closed    MC
    ar1, ar1-diag, isotropic    AR1Normal                 closed     closed    MC
    full                        MultivariateNormal        closed     MC        MC
    planar, iaf, BASE+FLOW      FlowPosterior             MC         MC        MC
    hierarchical (any family)   HierarchicalPosterior     per group, see rhovae.hierarchy

"closed" means: AR1Normal vs StandardNormal / Independent(Normal) / MultivariateNormal / AR1Normal,
MultivariateNormal vs Independent(Normal), Independent(Normal) vs AR1Normal (all in rhovae's kl.py;
the last one O(d), docs/math.md eq. 11), Independent(Normal) vs
Independent(Normal) and MultivariateNormal vs MultivariateNormal (torch). A flow never has one (its
density is known only at its own samples), and nothing is registered against :class:`MADENormal`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints
from torch.distributions.utils import _standard_normal

from rhovae.distributions import AR1Normal, GaussianProcessPrior, SeparableAR1Normal, StandardNormal
from rhovae.distributions.flows import made_masks
from rhovae.errors import RhovaeError
from rhovae.posteriors import RHO_BOUND

__all__ = [
    "PRIORS",
    "AR1Prior",
    "FixedAR1Prior",
    "MADENormal",
    "MADEPrior",
    "SeparableAR1Prior",
    "StandardNormalPrior",
    "TRAJECTORY_PRIORS",
    "TrajectoryAR1Prior",
    "TrajectoryStandardPrior",
    "make_trajectory_prior",
    "committed_rate",
    "make_prior",
]


class StandardNormalPrior(nn.Module):
    """``N(0, I_d)``, with no parameters; ``latent_dim`` a shape ``(C, H, W)``: over a latent map."""

    def __init__(self, latent_dim: int | tuple[int, ...]) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows .to(device/dtype)

    def forward(self) -> Distribution:
        return StandardNormal(self.latent_dim, dtype=self._anchor.dtype, device=self._anchor.device)


class AR1Prior(nn.Module):
    """A learned zero-mean AR(1) prior ``N(0, s T(rho))``, starting at N(0, I); O(d) KL to AR(1) q."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.rho_pre = nn.Parameter(torch.zeros(1))
        self.log_var = nn.Parameter(torch.zeros(1))

    def forward(self) -> Distribution:
        loc = torch.zeros(self.latent_dim, dtype=self.log_var.dtype, device=self.log_var.device)
        return AR1Normal(
            loc, RHO_BOUND * torch.tanh(self.rho_pre), torch.exp(0.5 * self.log_var), validate_args=False
        )


class FixedAR1Prior(nn.Module):
    """A fixed AR(1) prior ``N(0, T(rho))``, ``T(rho)[j, k] = rho^|j-k|`` (unit marginal variance, no
    parameters): the delta-VAE's committed rate (Razavi et al., ICLR 2019).

    A factorised posterior cannot match a correlated prior: for the diagonal posterior,
    ``KL(q || p) >= committed_rate(rho, latent_dim)`` nats for every ``mu`` and ``sigma`` the encoder
    emits (docs/math.md eq. 12), so the latent code can never collapse to the prior. The KL is in closed
    form, O(d), for the diagonal and AR(1) posteriors; an AR(1) posterior can reach 0 (it contains the
    prior), so the committed rate binds factorised posteriors only.
    """

    def __init__(self, latent_dim: int, rho: float) -> None:
        super().__init__()
        self.latent_dim, self.rho = latent_dim, float(rho)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self) -> Distribution:
        loc = torch.zeros(self.latent_dim, dtype=self._anchor.dtype, device=self._anchor.device)
        rho = torch.full((1,), self.rho, dtype=loc.dtype, device=loc.device)
        return AR1Normal(loc, rho, torch.ones_like(rho), validate_args=False)


def committed_rate(rho: float, latent_dim: int) -> float:
    """delta(rho): the least ``KL(N(mu, diag sigma^2) || N(0, T(rho)))`` over all ``mu``, ``sigma``, in nats.

    ``1/2 [(d - 2) log(1 + rho^2) - log(1 - rho^2)]`` for ``d = latent_dim >= 2``, 0 for d = 1
    (docs/math.md eq. 12), reached at ``mu = 0``, ``sigma_j^2 = 1 / (T(rho)^-1)_jj``. It is the KL a
    diagonal posterior pays against :class:`FixedAR1Prior` whatever the encoder does (the delta-VAE's
    committed rate, Razavi et al., ICLR 2019); e.g. ``committed_rate(0.95, 16)`` is about 5.666.
    """
    rho = float(rho)
    if not -1.0 < rho < 1.0:
        raise RhovaeError(f"the committed rate needs |rho| < 1, got {rho}")
    if latent_dim < 1:
        raise RhovaeError(f"latent_dim must be at least 1, got {latent_dim}")
    if latent_dim == 1:
        return 0.0
    log_one_minus_rho_sq = math.log1p(-rho) + math.log1p(rho)  # (1 - rho)(1 + rho): no cancellation
    return 0.5 * ((latent_dim - 2) * math.log1p(rho * rho) - log_one_minus_rho_sq)


# --- a Gaussian autoregressive prior from a MADE (Germain et al. 2015) -------------------------------


class MADENormal(Distribution):
    """``p(z) = prod_t N(z_t; mu_t(z_<t), sigma_t(z_<t)^2)`` with ``(mu, log sigma) = net(z)``.

    Args:
        net: a callable ``z (..., d) -> (mu (..., d), log_sigma (..., d))`` whose output t depends on
            ``z_<t`` only (a MADE; :class:`MADEPrior` builds one).
        latent_dim: d.
        dtype, device: of the samples.

    Batch shape ``()``, event shape ``(d,)``. ``log_prob`` is exact and takes one pass of ``net`` for any
    ``(..., d)``; ``rsample`` takes d passes (:meth:`from_noise`). No KL is registered against it: the
    VAE uses the Monte-Carlo term ``log q(z) - log p(z)``.

    Example:
        >>> p = MADEPrior(8)()                  # N(0, I) until trained
        >>> p.sample((5,)).shape, p.log_prob(torch.zeros(3, 8)).shape
        (torch.Size([5, 8]), torch.Size([3]))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, net, latent_dim: int, dtype: torch.dtype | None = None, device=None) -> None:
        self.net = net
        self._dtype, self._device = dtype, device
        super().__init__(torch.Size(), torch.Size((latent_dim,)), validate_args=False)

    @property
    def latent_dim(self) -> int:
        """The latent dimension d."""
        return self._event_shape[0]

    def log_prob(self, value: Tensor) -> Tensor:
        mu, log_sigma = self.net(value)
        standardised = (value - mu) * torch.exp(-log_sigma)
        return -(0.5 * standardised.pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)).sum(-1)

    def from_noise(self, eps: Tensor) -> Tensor:
        """The sample ``z (..., d)`` for standard-normal noise ``eps (..., d)``, differentiable.

        Iterates ``z <- mu(z) + sigma(z) * eps`` from ``z = 0``: after pass k the first k coordinates are
        final (output t sees only ``z_<t``), so d passes give the ancestral sample with no in-place
        writes for autograd to trip over.
        """
        z = torch.zeros_like(eps)
        for _ in range(self.latent_dim):
            mu, log_sigma = self.net(z)
            z = mu + torch.exp(log_sigma) * eps
        return z

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return self.from_noise(_standard_normal(shape, dtype=self._dtype, device=self._device))


class _MaskedLinear(nn.Linear):
    """``Linear`` whose weight is multiplied by a fixed 0/1 mask (the MADE connectivity)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADEPrior(nn.Module):
    """A learned Gaussian autoregressive prior: a one-hidden-layer MADE with a direct connection.

    ``[mu, log_sigma] = out(ELU(inp(z))) + direct(z)``: ``inp``/``out`` carry the MADE masks of
    :func:`~rhovae.distributions.flows.made_masks`, ``direct`` is a strictly lower-triangular linear map
    (so the prior contains every linear-Gaussian autoregression ``z_t = b_t + sum_(s<t) A_ts z_s +
    sigma_t eps_t``). ``out`` and ``direct`` start at zero: a fresh prior is exactly ``N(0, I_d)``.
    Returns a :class:`MADENormal`.
    """

    def __init__(self, latent_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.latent_dim = d = latent_dim
        self.hidden = hidden = hidden or max(64, 4 * d)
        m_in, m_out = made_masks(d, hidden)
        strictly_lower = torch.ones(d, d).tril(-1)
        self.inp = _MaskedLinear(d, hidden, m_in)
        self.out = _MaskedLinear(hidden, 2 * d, m_out.repeat(2, 1))
        self.direct = _MaskedLinear(d, 2 * d, strictly_lower.repeat(2, 1), bias=False)
        for weight in (self.out.weight, self.out.bias, self.direct.weight):
            nn.init.zeros_(weight)

    def conditionals(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log_sigma)``, each ``(..., d)``, of ``p(z_t | z_<t)`` for every t at once."""
        params = self.out(F.elu(self.inp(z))) + self.direct(z)
        return params[..., : self.latent_dim], params[..., self.latent_dim :]

    def forward(self) -> Distribution:
        w = self.out.weight
        return MADENormal(self.conditionals, self.latent_dim, dtype=w.dtype, device=w.device)


class SeparableAR1Prior(nn.Module):
    """A learned prior over latent maps ``(C, H, W)``: per channel a zero-mean separable 2-D AR(1)
    Gaussian ``N(0, s_c T(rho_rows,c) kron T(rho_cols,c))`` (three parameters a channel), starting at
    N(0, I). The paper's "more natural prior for images" where the latent is an image-like map; its
    KL to the ``ar1-2d`` and diagonal map posteriors is closed-form, O(C H W)."""

    def __init__(self, latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        channels = latent_shape[0]
        self.rho_rows_pre = nn.Parameter(torch.zeros(channels))
        self.rho_cols_pre = nn.Parameter(torch.zeros(channels))
        self.log_var = nn.Parameter(torch.zeros(channels))

    def forward(self) -> Distribution:
        loc = torch.zeros(self.latent_shape, dtype=self.log_var.dtype, device=self.log_var.device)
        return SeparableAR1Normal(
            loc,
            RHO_BOUND * torch.tanh(self.rho_rows_pre),
            RHO_BOUND * torch.tanh(self.rho_cols_pre),
            torch.exp(0.5 * self.log_var),
            validate_args=False,
        )


PRIORS = {"standard": StandardNormalPrior, "ar1": AR1Prior, "made": MADEPrior, "ar1-2d": SeparableAR1Prior}

#: the priors a latent map takes
MAP_PRIORS = ("standard", "ar1-2d")


def make_prior(
    name: str, latent_dim: int, rho: float = 0.0, latent_shape: tuple[int, int, int] | None = None
) -> nn.Module:
    """The prior module ``name`` over ``latent_dim`` dimensions, or over a latent map of
    ``latent_shape = (C, H, W)`` (standard or ar1-2d); called, it returns p(z) as a
    Distribution (N(0, I), or a learned one whose parameters train with the model). ``rho`` != 0 with
    ``name = "ar1"``: the AR(1) prior with that fixed correlation and unit variance (the delta-VAE's
    committed rate), not learned."""
    if name not in PRIORS:
        raise RhovaeError(f"unknown prior {name!r}; choose one of: {', '.join(sorted(PRIORS))}")
    if latent_shape is not None:
        if name not in MAP_PRIORS or rho:
            raise RhovaeError(
                f"prior {name!r} has no form over a latent map; choose one of: {', '.join(MAP_PRIORS)}"
            )
        return (
            SeparableAR1Prior(latent_shape) if name == "ar1-2d" else StandardNormalPrior(tuple(latent_shape))
        )
    if name == "ar1-2d":
        raise RhovaeError(
            "prior ar1-2d is over latent maps: add --latent-shape C,H,W or choose another prior"
        )
    if rho:
        if name != "ar1":
            raise RhovaeError(f"a fixed correlation rho is for the ar1 prior, not {name!r}")
        return FixedAR1Prior(latent_dim, rho)
    return PRIORS[name](latent_dim)


# --- priors over trajectories: C channels over T frames, event (C, T) ---------------------------------


class TrajectoryStandardPrior(nn.Module):
    """N(0, I) over ``(C, T)`` trajectories, laid out as ``Independent(StandardNormal(T), 1)`` over the
    channels so that every trajectory posterior's KL is its per-channel closed form."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.latent_shape = (channels, frames)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self) -> Distribution:
        channels, frames = self.latent_shape
        p = StandardNormal(frames, dtype=self._anchor.dtype, device=self._anchor.device)
        return torch.distributions.Independent(p.expand((channels,)), 1)


class TrajectoryAR1Prior(nn.Module):
    """A learned zero-mean AR(1) prior along time per channel, ``N(0, s_c T(rho_c))``, starting at
    N(0, I): closed-form O(T) KLs to the diagonal, ar1 and banded trajectory posteriors."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.latent_shape = (channels, frames)
        self.rho_pre = nn.Parameter(torch.zeros(channels, 1))
        self.log_var = nn.Parameter(torch.zeros(channels, 1))

    def forward(self) -> Distribution:
        loc = torch.zeros(self.latent_shape, dtype=self.log_var.dtype, device=self.log_var.device)
        rho = RHO_BOUND * torch.tanh(self.rho_pre)
        return torch.distributions.Independent(
            AR1Normal(loc, rho, torch.exp(0.5 * self.log_var), validate_args=False), 1
        )


#: the priors a trajectory latent takes: N(0, I), a learned AR(1) per channel, GP-VAE's Cauchy-kernel GP
TRAJECTORY_PRIORS = ("standard", "ar1", "gp")


def make_trajectory_prior(name: str, channels: int, frames: int) -> nn.Module:
    """The prior ``name`` of :data:`TRAJECTORY_PRIORS` over ``(C, T)`` trajectories (``gp``:
    :class:`~rhovae.distributions.GaussianProcessPrior` with GP-VAE's HMNIST kernel)."""
    if name == "standard":
        return TrajectoryStandardPrior(channels, frames)
    if name == "ar1":
        return TrajectoryAR1Prior(channels, frames)
    if name == "gp":
        return GaussianProcessPrior(frames, channels)
    raise RhovaeError(
        f"prior {name!r} has no form over trajectories; choose one of: {', '.join(TRAJECTORY_PRIORS)}"
    )
