"""A hierarchy of latent groups: a ladder VAE's posterior head and prior on one shared top-down path.

``z = (z_0, ..., z_(N-1))`` concatenated, group t of size ``d_t`` (Sønderby et al. 2016; Vahdat & Kautz
2020; Child 2020). Both directions read their conditionals off one top-down state ``s_t``, a function of
``z_<t`` only (:class:`TopDownPath`)::

    s_0 = 0,   s_t = s_(t-1) + f_t([s_(t-1), z_(t-1)])
    p(z_0)           = the group-0 prior of the ``prior`` registry (standard, ar1, made)
    p(z_t | z_<t)    = N(mu_t(s_t), diag sigma_t(s_t)^2)                     t >= 1, N(0, I) when fresh
    q(z_0 | x)       = head_0(h)                                              any posterior family
    q(z_t | z_<t, x) = law of mu_t(s_t) + r_t,  r_t ~ head_t(ELU(U_t h + V_t s_t))    residual, t >= 1

``h`` are the encoder's features: the encoder network is the bottom-up path (``U_t h`` its per-group
projections), so any backbone that gives features hosts a hierarchy, and the decoder takes the
concatenated z. Each ``head_t`` is a :func:`~rhovae.posteriors.make_head` head of the one chosen family
(diagonal, ar1, full, flows, ...). With one group this is exactly the flat model: ``head_0(h)`` and
``p(z_0)``.

The VAE needs no change: ``head(h)`` is a :class:`HierarchicalPosterior` and ``prior()`` a
:class:`HierarchicalPrior`, Distributions over the whole ``z (..., d)``. ``log_prob`` of either
evaluates the chain rule for any z by recomputing the top-down states from ``z_<t``; samples are
ancestral. ``kl_divergence(q, p)`` is registered as the standard single-sample estimator of the
hierarchical KL, analytic within groups::

    KL(q || p) ~ sum_t KL(q(z_t | z_<t, x) || p(z_t | z_<t)),   z_<t from q's last draw

unbiased since ``E_q`` of the sum is the KL (chain rule). By translation invariance the group term is
``KL(r_t || N(0, sigma_t^2))``, in closed form for every Gaussian family (AR1Normal and
MultivariateNormal vs Independent(Normal) are registered in kl.py); a flow group, or a group-0 pair with
no closed form (e.g. a MADE prior), contributes its one-sample term ``log q_t - log p_t`` at the draw.
The per-group terms are kept on the posterior (:func:`per_group_kl`) for logging and free bits.

Flow groups: a flow's density is known only at its own samples, so a hierarchy of flow groups
evaluates ``log_prob`` only at its own last draw (as :class:`~rhovae.distributions.flows.FlowPosterior`
does), which covers the ELBO, its KL and the IWAE bound; any other z raises ``NotImplementedError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, constraints, kl_divergence, register_kl

from rhovae.distributions.flows import FlowPosterior
from rhovae.errors import RhovaeError
from rhovae.posteriors import make_head, posterior_statistics
from rhovae.priors import make_prior

__all__ = [
    "HierarchicalHead",
    "HierarchicalPosterior",
    "HierarchicalPrior",
    "HierarchicalPriorModule",
    "TopDownPath",
    "active_units_per_group",
    "build_hierarchy",
    "group_free_bits_kl",
    "group_sizes",
    "per_group_kl",
]


def group_sizes(latent_dim: int, groups: int | list[int]) -> list[int]:
    """Sizes ``d_t`` of the groups: ``groups`` as a list (summing to ``latent_dim``), or a count N that
    splits ``latent_dim`` evenly, the first ``latent_dim % N`` groups one larger (10 in 4: 3, 3, 2, 2)."""
    if isinstance(groups, int):
        if not 1 <= groups <= latent_dim:
            raise RhovaeError(f"latent groups must be between 1 and latent-dim {latent_dim}, got {groups}")
        size, extra = divmod(latent_dim, groups)
        return [size + (t < extra) for t in range(groups)]
    sizes = [int(d) for d in groups]
    if not sizes or min(sizes) < 1 or sum(sizes) != latent_dim:
        raise RhovaeError(
            f"group sizes must be positive and sum to latent-dim {latent_dim}, got {list(groups)}"
        )
    return sizes


LOG_SCALE_BOUND = 5.0


class TopDownPath(nn.Module):
    """The state ``s_t(z_<t)`` and the conditional priors ``p(z_t | z_<t)``, t >= 1; shared by the head
    and the prior module (one set of weights, which ``state_dict`` lists under both).

    ``s_t = s_(t-1) + f_t([s_(t-1), z_(t-1)])`` with ``f_t`` = Linear, ELU, Linear (``hidden`` units);
    ``p(z_t | z_<t) = N(loc, diag(exp(log_scale))^2)``, ``[loc, raw] = Linear(s_t)`` started at zero, so a
    fresh hierarchy's prior is exactly N(0, I) on every group; ``log_scale = 5 tanh(raw / 5)`` keeps the
    scales in [e^-5, e^5] (a soft clamp as in NVAE: a collapsing prior scale would make every KL infinite).
    """

    def __init__(self, sizes: list[int], hidden: int) -> None:
        super().__init__()
        self.sizes, self.hidden = list(sizes), hidden
        self.steps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden + d, hidden), nn.ELU(), nn.Linear(hidden, hidden))
            for d in sizes[:-1]
        )
        self.priors = nn.ModuleList(nn.Linear(hidden, 2 * d) for d in sizes[1:])
        for layer in self.priors:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def initial_state(self, z_first: Tensor) -> Tensor:
        """``s_0 = 0`` of shape ``z_first.shape[:-1] + (hidden,)``."""
        return z_first.new_zeros(z_first.shape[:-1] + (self.hidden,))

    def step(self, t: int, state: Tensor, z_prev: Tensor) -> Tensor:
        """``s_t (..., hidden)`` from ``s_(t-1)`` and ``z_(t-1) (..., d_(t-1))``, t >= 1."""
        state = state.expand(z_prev.shape[:-1] + (self.hidden,))
        return state + self.steps[t - 1](torch.cat([state, z_prev], -1))

    def conditional_prior(self, t: int, state: Tensor) -> Independent:
        """``p(z_t | z_<t)`` at ``s_t (..., hidden)``, t >= 1: batch ``(...)``, event ``(d_t,)``."""
        loc, raw = self.priors[t - 1](state).chunk(2, -1)
        log_scale = LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)
        return Independent(Normal(loc, log_scale.exp(), validate_args=False), 1, validate_args=False)


# --- the posterior ----------------------------------------------------------------------------------


class HierarchicalHead(nn.Module):
    """``h (B, in_features) -> q(z|x)``, a :class:`HierarchicalPosterior` over the concatenated z.

    ``groups[0]`` is a ``make_head(posterior, in_features, d_0)`` head on ``h``; ``groups[t]``, t >= 1,
    a ``make_head(posterior, hidden, d_t)`` head on ``ELU(bottom_up[t-1](h) + from_state[t-1](s_t))``
    whose sample is the residual ``z_t - mu_t(s_t)``.
    """

    def __init__(self, posterior: str, in_features: int, top_down: TopDownPath, flow_steps: int = 4) -> None:
        super().__init__()
        sizes, hidden = top_down.sizes, top_down.hidden
        self.in_features, self.latent_dim, self.group_sizes = in_features, sum(sizes), list(sizes)
        self.top_down = top_down
        self.groups = nn.ModuleList(
            [make_head(posterior, in_features, sizes[0], flow_steps)]
            + [make_head(posterior, hidden, d, flow_steps) for d in sizes[1:]]
        )
        self.bottom_up = nn.ModuleList(nn.Linear(in_features, hidden) for _ in sizes[1:])
        self.from_state = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in sizes[1:])

    def forward(self, h: Tensor) -> HierarchicalPosterior:
        return HierarchicalPosterior(self, h)

    def residual_posterior(self, t: int, bottom_up: Tensor, state: Tensor) -> Distribution:
        """The law of ``z_t - mu_t(s_t)`` given the projected features ``bottom_up (B, hidden)`` and
        ``s_t (..., B, hidden)``, t >= 1."""
        return self.groups[t](F.elu(bottom_up + self.from_state[t - 1](state)))


@dataclass
class _GroupDraw:
    """One group of an ancestral draw: the law of the residual, the residual, ``z_t``, ``p(z_t|z_<t)``
    (None for group 0, whose residual is ``z_0`` itself and whose prior lives in the prior module)."""

    residual_law: Distribution
    residual: Tensor
    z: Tensor
    prior: Distribution | None


class _Ancestral:
    """``rsample``/``sample`` of a distribution drawn group by group by its ``_draw`` method."""

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self._draw(sample_shape, reparameterised=True)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self._draw(sample_shape, reparameterised=False)


class HierarchicalPosterior(_Ancestral, Distribution):
    """``q(z|x) = q(z_0|x) prod_t q(z_t | z_<t, x)`` over the concatenated ``z``: batch ``(B,)``, event
    ``(d,)``.

    ``rsample``/``sample(shape)`` draw group by group, ``(*shape, B, d)``, and keep the draw (the
    registered KL and flow groups' ``log_prob`` use it). ``log_prob(z)`` for any ``z (..., B, d)``
    recomputes the top-down states from ``z_<t`` (flow groups: own last draw only). ``mean`` is the
    ancestral pass through each group's mean, a deterministic summary (used for reconstructions and
    active units), not ``E_q[z]``. After ``kl_divergence(q, p)``, ``group_kl`` holds the per-group terms
    ``(*shape, B, N)``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, head: HierarchicalHead, h: Tensor) -> None:
        self.head, self.h = head, h
        self.group_sizes = head.group_sizes
        self.first = head.groups[0](h)
        self.bottom_up = [project(h) for project in head.bottom_up]  # (B, hidden) per group t >= 1
        self.has_flow = isinstance(self.first, FlowPosterior)
        self.last_draw: list[_GroupDraw] | None = None
        self._last_z: Tensor | None = None
        self.group_kl: Tensor | None = None
        super().__init__(h.shape[:-1], torch.Size((head.latent_dim,)), validate_args=False)

    def _draw(self, sample_shape, reparameterised: bool) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        top_down = self.head.top_down
        z = self.first.rsample(sample_shape) if reparameterised else self.first.sample(sample_shape)
        draws = [_GroupDraw(self.first, z, z, None)]
        state = top_down.initial_state(z)
        for t in range(1, len(self.group_sizes)):
            state = top_down.step(t, state, z)
            prior = top_down.conditional_prior(t, state)
            law = self.head.residual_posterior(t, self.bottom_up[t - 1], state)
            residual = law.rsample() if reparameterised else law.sample()
            z = prior.mean + residual
            draws.append(_GroupDraw(law, residual, z, prior))
        self.last_draw, self.group_kl = draws, None
        self._last_z = torch.cat([draw.z for draw in draws], -1)
        return self._last_z

    def log_prob(self, value: Tensor) -> Tensor:
        if value.shape[-1] != self.event_shape[0]:
            raise ValueError(f"expected z of shape (..., {self.event_shape[0]}), got {tuple(value.shape)}")
        if self.has_flow:
            if self.last_draw is None or value is not self._last_z:
                raise NotImplementedError(
                    "a hierarchy of flow groups evaluates log_prob only at its own last sample (flows are "
                    "not inverted)"
                )
            return sum(d.residual_law.log_prob(d.residual) for d in self.last_draw)  # type: ignore[return-value]
        parts = value.split(self.group_sizes, -1)
        top_down = self.head.top_down
        total = self.first.log_prob(parts[0])
        state = top_down.initial_state(parts[0])
        for t in range(1, len(parts)):
            state = top_down.step(t, state, parts[t - 1])
            prior = top_down.conditional_prior(t, state)
            law = self.head.residual_posterior(t, self.bottom_up[t - 1], state)
            total = total + law.log_prob(parts[t] - prior.mean)
        return total

    def _mean_path(self) -> list[tuple[Distribution, Tensor, Distribution | None]]:
        """``(residual law, z_t, p(z_t|z_<t))`` along the path of group means."""
        top_down = self.head.top_down
        z = self.first.mean
        path: list[tuple[Distribution, Tensor, Distribution | None]] = [(self.first, z, None)]
        state = top_down.initial_state(z)
        for t in range(1, len(self.group_sizes)):
            state = top_down.step(t, state, z)
            prior = top_down.conditional_prior(t, state)
            law = self.head.residual_posterior(t, self.bottom_up[t - 1], state)
            z = prior.mean + law.mean
            path.append((law, z, prior))
        return path

    @property
    def mean(self) -> Tensor:
        return torch.cat([z for _, z, _ in self._mean_path()], -1)


# --- the prior --------------------------------------------------------------------------------------


class HierarchicalPrior(_Ancestral, Distribution):
    """``p(z) = p(z_0) prod_t p(z_t | z_<t)`` over the concatenated ``z``: batch ``()``, event ``(d,)``.

    Args:
        top_down: the shared :class:`TopDownPath`.
        first: ``p(z_0)``, event ``(d_0,)``, batch ``()``.

    ``log_prob`` for any ``z (..., d)``; ``sample``/``rsample((n,))`` ancestral, ``(n, d)``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, top_down: TopDownPath, first: Distribution) -> None:
        self.top_down, self.first = top_down, first
        self.group_sizes = top_down.sizes
        self.has_rsample = first.has_rsample
        super().__init__(torch.Size(), torch.Size((sum(self.group_sizes),)), validate_args=False)

    def _draw(self, sample_shape, reparameterised: bool) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        z = self.first.rsample(sample_shape) if reparameterised else self.first.sample(sample_shape)
        parts, state = [z], self.top_down.initial_state(z)
        for t in range(1, len(self.group_sizes)):
            state = self.top_down.step(t, state, z)
            prior = self.top_down.conditional_prior(t, state)
            z = prior.rsample() if reparameterised else prior.sample()
            parts.append(z)
        return torch.cat(parts, -1)

    def log_prob(self, value: Tensor) -> Tensor:
        if value.shape[-1] != self.event_shape[0]:
            raise ValueError(f"expected z of shape (..., {self.event_shape[0]}), got {tuple(value.shape)}")
        parts = value.split(self.group_sizes, -1)
        total = self.first.log_prob(parts[0])
        state = self.top_down.initial_state(parts[0])
        for t in range(1, len(parts)):
            state = self.top_down.step(t, state, parts[t - 1])
            total = total + self.top_down.conditional_prior(t, state).log_prob(parts[t])
        return total


class HierarchicalPriorModule(nn.Module):
    """The prior module of a hierarchy: ``forward() -> HierarchicalPrior``; ``first`` is the group-0
    prior module (``make_prior(prior, d_0)``), ``top_down`` the path shared with the head."""

    def __init__(self, top_down: TopDownPath, prior: str = "standard") -> None:
        super().__init__()
        self.top_down = top_down
        self.first = make_prior(prior, top_down.sizes[0])
        self.latent_dim, self.group_sizes = sum(top_down.sizes), list(top_down.sizes)

    def forward(self) -> HierarchicalPrior:
        return HierarchicalPrior(self.top_down, self.first())


def build_hierarchy(
    posterior: str,
    in_features: int,
    latent_dim: int,
    groups: int | list[int],
    hidden: int,
    flow_steps: int = 4,
    prior: str = "standard",
) -> tuple[HierarchicalHead, HierarchicalPriorModule]:
    """The head and the prior module of a hierarchy of latent groups, sharing one :class:`TopDownPath`.

    Args:
        posterior: the family of every group, a :func:`~rhovae.posteriors.make_head` name.
        in_features: size F of the encoder's features h.
        latent_dim: d, the size of the concatenated z.
        groups: a count N (even split, :func:`group_sizes`) or the list of sizes.
        hidden: width of the top-down state and of each group head's features.
        flow_steps: steps of flow families.
        prior: the registry name of ``p(z_0)`` (:data:`rhovae.priors.PRIORS`).
    """
    if hidden < 1:
        raise RhovaeError(f"hierarchy hidden size must be positive, got {hidden}")
    top_down = TopDownPath(group_sizes(latent_dim, groups), hidden)
    head = HierarchicalHead(posterior, in_features, top_down, flow_steps)
    return head, HierarchicalPriorModule(top_down, prior)


# --- the KL, and what it reports --------------------------------------------------------------------


def _kl_or_one_sample(q: Distribution, p: Distribution, sample: Tensor) -> Tensor:
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return q.log_prob(sample) - p.log_prob(sample)


@register_kl(HierarchicalPosterior, HierarchicalPrior)
def _kl_hierarchical(q: HierarchicalPosterior, p: HierarchicalPrior) -> Tensor:
    """``sum_t KL(q_t || p_t)`` at q's last draw, ``(*shape, B)``; the terms are kept in ``q.group_kl``."""
    if q.last_draw is None:
        raise RhovaeError(
            "the hierarchical KL is evaluated at the posterior's own sample: call q.rsample() first"
        )
    if q.head.top_down is not p.top_down:
        raise RhovaeError("this hierarchical posterior and prior do not share a top-down path")
    first = q.last_draw[0]
    terms = [_kl_or_one_sample(first.residual_law, p.first, first.z)]
    for draw in q.last_draw[1:]:
        # KL(q_t || p_t) = KL(r_t || N(0, sigma_t^2)): both laws shifted by mu_t
        scale = draw.prior.stddev  # type: ignore[union-attr]
        centred = Independent(Normal(torch.zeros_like(scale), scale, validate_args=False), 1)
        terms.append(_kl_or_one_sample(draw.residual_law, centred, draw.residual))
    q.group_kl = torch.stack(torch.broadcast_tensors(*terms), -1)
    return q.group_kl.sum(-1)


def per_group_kl(q: Distribution) -> tuple[Tensor, list[int]] | None:
    """The per-group KL terms ``(*shape, B, N)`` of the last ``kl_divergence(q, p)`` and the group sizes,
    or None when ``q`` is not hierarchical or no KL was taken."""
    if isinstance(q, HierarchicalPosterior) and q.group_kl is not None:
        return q.group_kl, q.group_sizes
    return None


def group_free_bits_kl(q: Distribution, free_bits: float) -> Tensor | None:
    """Free bits per group: ``sum_t max(free_bits * d_t, mean_B KL_t)``, a scalar per sample; None when
    ``q`` carries no per-group KL (see :func:`per_group_kl`)."""
    found = per_group_kl(q)
    if found is None:
        return None
    kl, sizes = found
    batch_mean = kl.reshape(-1, kl.shape[-1]).mean(0)
    floor = free_bits * torch.tensor(sizes, dtype=kl.dtype, device=kl.device)
    return torch.maximum(batch_mean, floor).sum()


def active_units_per_group(variances: Tensor, sizes: list[int], threshold: float = 0.01) -> list[int]:
    """Active units of each group from the per-dimension ``Cov_x(E_q[z|x])`` variances ``(d,)``."""
    return [int((v > threshold).sum()) for v in variances.split(sizes)]


@posterior_statistics.register
def _hierarchical_statistics(q: HierarchicalPosterior) -> dict[str, Tensor]:
    """``kl_group_t`` (B,) once a KL was taken (averaged over any sample shape), and each group's own
    family statistics as ``NAME_group_t``: at the last one-sample draw, else along the mean path."""
    stats: dict[str, Tensor] = {}
    batch = q.batch_shape
    if q.group_kl is not None:
        kl = q.group_kl.reshape((-1,) + batch + q.group_kl.shape[-1:]).mean(0)
        stats.update({f"kl_group_{t}": kl[..., t] for t in range(kl.shape[-1])})
    draw = q.last_draw
    if draw is not None and all(d.residual_law.batch_shape == batch for d in draw):
        laws = [d.residual_law for d in draw]
    else:
        laws = [law for law, _, _ in q._mean_path()]
    for t, law in enumerate(laws):
        stats.update({f"{name}_group_{t}": value for name, value in posterior_statistics(law).items()})
    return stats
