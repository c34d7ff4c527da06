"""Posterior heads: ``nn.Module``s that map encoder features ``h (B, in_features)`` to ``q(z|x)``.

Every head returns a ``torch.distributions.Distribution`` with ``event_shape = (latent_dim,)``; models
only ever call ``head(h)`` and never ask which family they hold. Adding a family is one class here
(or in its own file) and one entry in :data:`HEADS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial, singledispatch

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from rhovae.distributions import AR1Normal, BandedNormal, LatentMap, SeparableAR1Normal
from rhovae.distributions.flows import FlowPosterior, IAFStep, PlanarStep, reverse_order
from rhovae.errors import RhovaeError

__all__ = [
    "FLOWS",
    "HEADS",
    "FlowHead",
    "posterior_names",
    "AR1GaussianHead",
    "BN_HEADS",
    "BatchNormMean",
    "DiagonalGaussianHead",
    "FullCovGaussianHead",
    "MAP_HEADS",
    "TRAJECTORY_HEADS",
    "TrajectoryHead",
    "MapHead",
    "make_head",
    "make_map_head",
    "posterior_statistics",
]

# tanh saturates to exactly 1.0 in float32 for pre-activations beyond ~9; scaling by this bound keeps
# 1 - rho^2 >= 2e-6, so log det and its gradients stay finite whatever the encoder emits.
RHO_BOUND = 1.0 - 1e-6


class DiagonalGaussianHead(nn.Module):
    """``q = N(mu, diag(sigma^2))``: a ``Linear(h, 2d)`` for the mean and the log-variance.

    Returns ``Independent(Normal(mu, sigma), 1)`` of batch shape ``(B,)`` and event shape ``(d,)``.
    """

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.in_features, self.latent_dim = in_features, latent_dim
        self.loc = nn.Linear(in_features, latent_dim)
        self.log_var = nn.Linear(in_features, latent_dim)

    def forward(self, h: Tensor) -> Distribution:
        std = torch.exp(0.5 * self.log_var(h))
        return Independent(Normal(self.loc(h), std, validate_args=False), 1, validate_args=False)


class AR1GaussianHead(nn.Module):
    """The ρ-VAE posterior ``q = N(mu, s T(rho))`` from two scalar heads (Ferdowsi et al. 2019).

    ``mu = Linear(h, d)``, ``rho = RHO_BOUND * tanh(Linear(h, 1))``, ``log s = Linear(h, 1)``.
    With ``per_dim_scale=True`` the log-variance head is ``Linear(h, d)`` instead ("ρ + diagonal",
    docs/math.md §3). With ``correlated=False`` there is no ρ head and ρ = 0: ``N(mu, s I)``, the
    isotropic control that separates what ρ does from what the single shared scale does. Returns an
    :class:`AR1Normal` of batch shape ``(B,)``.
    """

    def __init__(
        self, in_features: int, latent_dim: int, per_dim_scale: bool = False, correlated: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.latent_dim = in_features, latent_dim
        self.per_dim_scale = per_dim_scale
        self.loc = nn.Linear(in_features, latent_dim)
        self.rho = nn.Linear(in_features, 1) if correlated else None
        self.log_var = nn.Linear(in_features, latent_dim if per_dim_scale else 1)

    def forward(self, h: Tensor) -> Distribution:
        if self.rho is None:
            rho = h.new_zeros((*h.shape[:-1], 1))
        else:
            rho = RHO_BOUND * torch.tanh(self.rho(h))
        scale = torch.exp(0.5 * self.log_var(h))
        return AR1Normal(self.loc(h), rho, scale, validate_args=False)


class FullCovGaussianHead(nn.Module):
    """``q = N(mu, L L^T)`` with ``L`` = strictly-lower part + ``diag(exp(log_var / 2))``.

    ``d + d + d(d-1)/2`` outputs. With the strictly-lower part at zero it is the diagonal family.
    Returns ``MultivariateNormal(mu, scale_tril=L)`` of batch shape ``(B,)``.
    """

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.in_features, self.latent_dim = in_features, latent_dim
        self.loc = nn.Linear(in_features, latent_dim)
        self.log_var = nn.Linear(in_features, latent_dim)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.off_diagonal = nn.Linear(in_features, rows.numel()) if rows.numel() else None

    def forward(self, h: Tensor) -> Distribution:
        d = self.latent_dim
        tril = torch.diag_embed(torch.exp(0.5 * self.log_var(h)))
        if self.off_diagonal is not None:
            lower = h.new_zeros(h.shape[:-1] + (d, d))
            lower[..., self._rows, self._cols] = self.off_diagonal(h)
            tril = tril + lower
        return MultivariateNormal(self.loc(h), scale_tril=tril, validate_args=False)


HeadFactory = Callable[[int, int], nn.Module]

HEADS: dict[str, HeadFactory] = {
    "diagonal": DiagonalGaussianHead,
    "ar1": AR1GaussianHead,
    "ar1-diag": partial(AR1GaussianHead, per_dim_scale=True),
    "isotropic": partial(AR1GaussianHead, correlated=False),
    "full": FullCovGaussianHead,
}


class FlowHead(nn.Module):
    """A base head followed by ``steps`` flow steps whose parameters come from the same features.

    ``flow="planar"``: amortised planar steps (``Linear(h, steps * (2d + 1))`` gives u, w, b per input),
    or global ones with ``amortised=False``. ``flow="iaf"``: IAF steps with a MADE of ``hidden`` units
    and the context ``ELU(Linear(h, hidden))``, reversing the variable order between steps.
    Returns a :class:`~rhovae.distributions.flows.FlowPosterior` on the base's distribution.
    """

    def __init__(
        self, base: nn.Module, flow: str, steps: int = 4, amortised: bool = True, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.base, self.flow, self.steps, self.amortised = base, flow, steps, amortised
        self.in_features, self.latent_dim = base.in_features, base.latent_dim
        d = self.latent_dim
        if flow == "planar":
            if amortised:
                self.planar = nn.Linear(self.in_features, steps * (2 * d + 1))
            else:
                self.planar_u = nn.Parameter(0.01 * torch.randn(steps, d))
                self.planar_w = nn.Parameter(0.01 * torch.randn(steps, d))
                self.planar_b = nn.Parameter(torch.zeros(steps, 1))
        elif flow == "iaf":
            hidden = hidden or max(64, 4 * d)
            self.context = nn.Sequential(nn.Linear(self.in_features, hidden), nn.ELU())
            self.iaf = nn.ModuleList(IAFStep(d, hidden, hidden) for _ in range(steps))
        else:
            raise RhovaeError(f"unknown flow {flow!r}; choose one of: {', '.join(sorted(FLOWS))}")

    def _transforms(self, h: Tensor) -> list:
        d = self.latent_dim
        if self.flow == "planar":
            if self.amortised:
                params = self.planar(h).view(*h.shape[:-1], self.steps, 2 * d + 1)
                return [
                    PlanarStep(params[..., k, :d], params[..., k, d : 2 * d], params[..., k, 2 * d :])
                    for k in range(self.steps)
                ]
            return [
                PlanarStep(self.planar_u[k], self.planar_w[k], self.planar_b[k]) for k in range(self.steps)
            ]
        context = self.context(h)
        transforms = []
        for k, step in enumerate(self.iaf):
            if k:
                transforms.append(reverse_order)
            transforms.append(step.bind(context))
        return transforms

    def forward(self, h: Tensor) -> Distribution:
        return FlowPosterior(self.base(h), self._transforms(h))


FLOWS = ("planar", "iaf")


#: the families whose mean BN-VAE can normalise (``--bn-gamma``): each has a ``loc`` layer
BN_HEADS = tuple(sorted(HEADS))


class BatchNormMean(nn.Module):
    """BN-VAE's posterior mean (Zhu et al., ACL 2020): ``mu = gamma * BN(mu_raw) + beta``, batch
    normalisation whose scale ``gamma`` is fixed and whose shift ``beta`` is learned.

    Over a batch each dimension's means then have mean ``beta_j`` and variance ``gamma^2``, so the
    batch's average KL to N(0, I) is at least ``sum_j (gamma^2 + beta_j^2) / 2 >= d gamma^2 / 2`` minus
    what the variances can give back: the posterior cannot collapse onto the prior. In eval mode the
    running statistics are used, as in any BatchNorm.
    """

    def __init__(self, latent_dim: int, gamma: float) -> None:
        super().__init__()
        self.gamma = float(gamma)
        # eps far below the usual 1e-5: a fresh encoder's means may spread by less than 1e-2, and the
        # usual eps would then shrink the normalised spread below gamma, and the KL floor with it
        self.norm = nn.BatchNorm1d(latent_dim, affine=False, eps=1e-10)
        self.shift = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, mu: Tensor) -> Tensor:
        flat = mu.reshape(-1, mu.shape[-1])
        if self.training and len(flat) == 1:  # one example has no batch statistics: the running ones
            normed = torch.nn.functional.batch_norm(
                flat, self.norm.running_mean, self.norm.running_var, training=False, eps=self.norm.eps
            )
        else:
            normed = self.norm(flat)
        return (self.gamma * normed + self.shift).reshape(mu.shape)


def with_batchnorm_means(head: nn.Module, gamma: float) -> nn.Module:
    """``head`` (a family of :data:`BN_HEADS`) with BN-VAE's normalised means (:class:`BatchNormMean`)."""
    head.loc = nn.Sequential(head.loc, BatchNormMean(head.latent_dim, gamma))
    return head


def posterior_names() -> list[str]:
    """Every posterior name a run takes: base families, flows on the diagonal base, base+flow (flat
    latents), the families only a latent map has (``ar1-2d``, ``ar1-2d-diag``) and the one only a
    trajectory has (``banded``, the frames model)."""
    flat = sorted(HEADS) + list(FLOWS) + [f"{b}+{f}" for b in sorted(HEADS) for f in FLOWS]
    return flat + MAP_ONLY + TRAJECTORY_ONLY


#: the families that exist only over a latent map (``--latent-shape``)
MAP_ONLY = ["ar1-2d", "ar1-2d-diag"]
#: the families that exist only over latent trajectories (``--model frames``)
TRAJECTORY_ONLY = ["banded"]


def make_head(name: str, in_features: int, latent_dim: int, flow_steps: int = 4) -> nn.Module:
    """Build the posterior head ``name``: a base family of :data:`HEADS`, a flow of :data:`FLOWS` on the
    diagonal base (``planar``, ``iaf``, as in the literature), or ``base+flow`` (``ar1+iaf``, ...).
    Sizes are validated by the run configuration, the one edge where user settings enter."""
    base_name, _, flow = name.partition("+")
    if name in FLOWS:
        base_name, flow = "diagonal", name
    if base_name not in HEADS or (flow and flow not in FLOWS):
        raise RhovaeError(
            f"unknown posterior {name!r}; choose one of: {', '.join(sorted(HEADS) + list(FLOWS))} "
            f"or BASE+FLOW (e.g. ar1+iaf)"
        )
    base = HEADS[base_name](in_features, latent_dim)
    return FlowHead(base, flow, flow_steps) if flow else base


# --- posteriors over latent maps ------------------------------------------------------------------------

#: families over a latent map ``(C, H, W)``: name -> (scalars per channel from the pooled features,
#: a log-variance per position, the family). Means always come from a 1x1 convolution of the features.
MAP_HEADS: dict[str, tuple[int, bool, str]] = {
    "diagonal": (0, True, "diagonal"),
    "ar1-2d": (3, False, "separable"),  # rho_rows, rho_cols, log s
    "ar1-2d-diag": (2, True, "separable"),  # rho_rows, rho_cols; a variance per position
    "ar1": (2, False, "raster"),  # rho, log s: per channel, an AR(1) along the raster order
    "ar1-diag": (1, True, "raster"),
    "isotropic": (1, False, "isotropic"),  # log s: N(mu, s I) per channel
}

#: the most units a full covariance over a flattened map is offered for: it needs n (n - 1) / 2 outputs
FULL_MAP_MAX_UNITS = 256


class MapHead(nn.Module):
    """A posterior over a latent map ``(C, H, W)`` from the encoder's feature map ``h (B, F, H, W)``.

    The mean is a 1x1 convolution of the features (each position's mean from that position's
    features); a per-position log-variance is another; the per-channel scalars (ρ along rows and
    columns, log s) come from ``Linear(F, k C)`` on the spatially averaged features. Families
    (:data:`MAP_HEADS`): ``diagonal`` (``Independent(Normal, 3)``), ``ar1-2d`` and ``ar1-2d-diag``
    (:class:`~rhovae.distributions.SeparableAR1Normal`), ``ar1``, ``ar1-diag`` and ``isotropic``
    (per channel, an :class:`AR1Normal` along the raster order, laid out as a map by
    :class:`~rhovae.distributions.LatentMap`). Every one has event shape ``(C, H, W)``.
    """

    def __init__(self, family: str, in_channels: int, latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if family not in MAP_HEADS:
            raise RhovaeError(
                f"posterior {family!r} has no form over a latent map; choose one of: "
                f"{', '.join(sorted(MAP_HEADS))} or full (small maps)"
            )
        self.family = family
        self.in_features, self.latent_shape = in_channels, tuple(latent_shape)
        self.latent_dim = math.prod(latent_shape)
        channels = latent_shape[0]
        scalars, per_position, self.kind = MAP_HEADS[family]
        self.loc = nn.Conv2d(in_channels, channels, 1)
        self.log_var = nn.Conv2d(in_channels, channels, 1) if per_position else None
        self.scalars = nn.Linear(in_channels, scalars * channels) if scalars else None

    def forward(self, h: Tensor) -> Distribution:
        loc = self.loc(h).contiguous()  # (B, C, H, W), the usual layout whatever the features'
        std = torch.exp(0.5 * self.log_var(h)).contiguous() if self.log_var is not None else None
        channels = loc.shape[1]
        if self.scalars is not None:
            per_channel = self.scalars(h.mean((-2, -1))).view(len(h), -1, channels)  # (B, k, C)
        if self.kind == "diagonal":
            return Independent(Normal(loc, std, validate_args=False), 3, validate_args=False)
        if self.kind == "separable":
            rho_rows = RHO_BOUND * torch.tanh(per_channel[:, 0])
            rho_cols = RHO_BOUND * torch.tanh(per_channel[:, 1])
            scale = std if std is not None else torch.exp(0.5 * per_channel[:, 2])
            return SeparableAR1Normal(loc, rho_rows, rho_cols, scale, validate_args=False)
        # raster order: each channel's H*W units, an AR(1) with its own rho
        flat = loc.flatten(-2)
        if self.kind == "isotropic":
            rho = flat.new_zeros(flat.shape[:-1] + (1,))
            scale = torch.exp(0.5 * per_channel[:, 0]).unsqueeze(-1)
        else:
            rho = (RHO_BOUND * torch.tanh(per_channel[:, 0])).unsqueeze(-1)
            scale = std.flatten(-2) if std is not None else torch.exp(0.5 * per_channel[:, 1]).unsqueeze(-1)
        inner = AR1Normal(flat, rho, scale, validate_args=False)
        return LatentMap(Independent(inner, 1, validate_args=False), self.latent_shape)


class FlatMapHead(nn.Module):
    """A flat family over the flattened map: the head of ``family`` on the flattened feature map
    ``(B, F H W)``, its distribution laid out as ``(C, H, W)`` by :class:`LatentMap`."""

    def __init__(self, family: str, in_channels: int, latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.latent_dim = math.prod(latent_shape)
        self.in_features = in_channels * latent_shape[1] * latent_shape[2]
        self.flat = HEADS[family](self.in_features, self.latent_dim)

    def forward(self, h: Tensor) -> Distribution:
        return LatentMap(self.flat(h.flatten(1)), self.latent_shape)


def make_map_head(name: str, in_channels: int, latent_shape: tuple[int, int, int]) -> nn.Module:
    """The posterior head ``name`` over a latent map ``latent_shape = (C, H, W)`` from feature maps of
    ``in_channels`` channels at the map's size: a family of :data:`MAP_HEADS`, or ``full`` (a full
    covariance over the flattened map, up to :data:`FULL_MAP_MAX_UNITS` units)."""
    if name == "full":
        units = math.prod(latent_shape)
        if units > FULL_MAP_MAX_UNITS:
            raise RhovaeError(
                f"posterior full over a latent map of {units} units needs {units * (units - 1) // 2} "
                f"covariance outputs; it is offered up to {FULL_MAP_MAX_UNITS} units: use a smaller "
                "--latent-shape or posterior ar1-2d"
            )
        return FlatMapHead("full", in_channels, latent_shape)
    return MapHead(name, in_channels, latent_shape)


def map_posterior_names() -> list[str]:
    """The posteriors a latent map takes."""
    return sorted(MAP_HEADS) + ["full"]


# --- what a family reports about itself ---------------------------------------------------------------


@singledispatch
def _family_statistics(q: Distribution) -> dict[str, Tensor]:
    return {}


def posterior_statistics(q: Distribution) -> dict[str, Tensor]:
    """Per-sample summaries a posterior family reports for logging and evaluation, ``{name: (B,) or
    (B, k)}``, detached from the graph (they are read, not trained on); families without any return
    ``{}``.

    The one hook through which trainer and evaluator learn about a family's own parameters (no caller
    reads attributes such as ``q.rho``). A new family registers its own::

        @posterior_statistics.register
        def _(q: MyDistribution) -> dict[str, Tensor]:
            return {"my_parameter": q.my_parameter}
    """
    return {
        name: value.detach() if isinstance(value, Tensor) else value
        for name, value in _family_statistics(q).items()
    }


# the singledispatch interface (register, dispatch, registry) on the detaching wrapper
posterior_statistics.register = _family_statistics.register  # type: ignore[attr-defined]
posterior_statistics.dispatch = _family_statistics.dispatch  # type: ignore[attr-defined]
posterior_statistics.registry = _family_statistics.registry  # type: ignore[attr-defined]


def mean_abs_rho(stats: dict[str, Tensor]) -> Tensor | None:
    """Per example ``(B,)``, the mean |ρ| over every correlation a family reports (``rho``; over a
    latent map ``rho_rows`` and ``rho_cols``, each ``(B, C)``); None for families without one."""
    found = [stats[k].abs() for k in ("rho", "rho_rows", "rho_cols") if k in stats]
    if not found:
        return None
    return torch.cat([f.reshape(len(f), -1) for f in found], 1).mean(1)


@posterior_statistics.register
def _ar1_statistics(q: AR1Normal) -> dict[str, Tensor]:
    # rho (B,) and the variance scale s = scale^2, (B, 1) or (B, d) for per-dimension scales
    return {"rho": q.rho[..., 0], "s": q.scale.pow(2)}


@posterior_statistics.register
def _separable_statistics(q: SeparableAR1Normal) -> dict[str, Tensor]:
    # per channel: rho_rows, rho_cols (B, C); s per channel (B, C) or per position (B, C, H, W)
    return {"rho_rows": q.rho_rows, "rho_cols": q.rho_cols, "s": q.scale.pow(2)}


@posterior_statistics.register
def _latent_map_statistics(q: LatentMap) -> dict[str, Tensor]:
    inner = q.base
    while isinstance(inner, Independent):
        inner = inner.base_dist
    return posterior_statistics(inner)


@posterior_statistics.register
def _independent_statistics(q: Independent) -> dict[str, Tensor]:
    # the trajectory head's Independent(AR1Normal, 1) over channels: rho (B, C) and s per channel
    inner = q.base_dist
    if isinstance(inner, AR1Normal):
        return {"rho": inner.rho[..., 0], "s": inner.scale.pow(2)}
    return {}


@posterior_statistics.register
def _flow_statistics(q: FlowPosterior) -> dict[str, Tensor]:
    return posterior_statistics(q.base)


# --- posteriors over trajectories: a latent of C channels over T frames --------------------------------

#: families over a trajectory latent ``(C, T)`` (channels first, time last), from per-frame features
TRAJECTORY_HEADS = ("diagonal", "ar1", "banded")


class TrajectoryHead(nn.Module):
    """A posterior over C latent trajectories of T frames from per-frame features ``h (B, T, F)``.

    Returns a distribution with batch ``(B,)`` and event ``(C, T)`` (channels first, time last), each
    channel's trajectory one of (``family``):

    - ``diagonal``: independent in time, a mean and a variance per frame and channel;
    - ``ar1``: an :class:`AR1Normal` along time per channel, its ρ and s from a sequence-level summary
      (the features averaged over the frames), the means per frame;
    - ``banded``: GP-VAE's structured posterior (Fortuin et al., AISTATS 2020), a
      :class:`~rhovae.distributions.BandedNormal` per channel whose precision ``B^T B`` has
      ``B[t, t] = exp(-Linear(h_t) / 2)`` and ``B[t, t+1] = Linear(h_t || h_(t+1))``: each neighbour
      pair's coupling from the two frames' features. The coupling layer starts at zero, so the family
      starts as (and with no coupling is exactly) the diagonal one, whose log-variance head is the
      same; it can only add correlation. (GP-VAE's code puts a softplus on both bands and adds the
      identity, with precision ``B B^T``.)

    Every family is an ``Independent`` over the channels of a distribution over time, so a prior in the
    same layout (:func:`rhovae.priors.make_trajectory_prior`) gets its closed-form KL per channel.
    """

    def __init__(self, family: str, in_features: int, channels: int, frames: int) -> None:
        super().__init__()
        if family not in TRAJECTORY_HEADS:
            raise RhovaeError(
                f"posterior {family!r} has no form over a trajectory; choose one of: "
                f"{', '.join(TRAJECTORY_HEADS)}"
            )
        self.family, self.in_features = family, in_features
        self.latent_shape = (channels, frames)
        self.latent_dim = channels * frames
        self.loc = nn.Linear(in_features, channels)
        if family == "diagonal":
            self.log_var = nn.Linear(in_features, channels)
        elif family == "ar1":
            self.summary = nn.Linear(in_features, 2 * channels)  # rho, log s per channel
        else:  # B[t, t] = exp(-a_t / 2): with no coupling, exactly the diagonal family (variance e^a_t)
            self.diagonal = nn.Linear(in_features, channels)
            self.coupling = nn.Linear(2 * in_features, channels)
            nn.init.zeros_(self.coupling.weight)  # starts uncoupled: the diagonal family's posterior
            nn.init.zeros_(self.coupling.bias)

    def forward(self, h: Tensor) -> Distribution:
        loc = self.loc(h).transpose(-1, -2)  # (B, C, T)
        if self.family == "diagonal":
            std = torch.exp(0.5 * self.log_var(h)).transpose(-1, -2)
            return Independent(Independent(Normal(loc, std, validate_args=False), 1), 1)
        if self.family == "ar1":
            rho_pre, log_var = self.summary(h.mean(-2)).unsqueeze(-1).chunk(2, dim=-2)  # (B, C, 1) each
            scale = torch.exp(0.5 * log_var)
            return Independent(AR1Normal(loc, RHO_BOUND * torch.tanh(rho_pre), scale, validate_args=False), 1)
        diagonal = torch.exp(-0.5 * self.diagonal(h)).transpose(-1, -2)
        upper = self.coupling(torch.cat([h[..., :-1, :], h[..., 1:, :]], -1)).transpose(-1, -2)
        return Independent(BandedNormal(loc, diagonal, upper, validate_args=False), 1)
