"""Normalizing-flow posteriors: planar flows and inverse autoregressive flows on any base distribution.

``FlowPosterior(base, transforms)`` draws ``z_0 ~ base`` and pushes it through ``z_k = f_k(z_(k-1))``;
``log q(z_K) = log q_0(z_0) - sum_k log|det df_k/dz|``. The log-determinants are cached from the
forward pass, so ``log_prob`` is exact for the distribution's own samples and never inverts a step
(planar steps have no closed-form inverse; IAF's is sequential in d). KL divergences involving a flow
are not registered: callers fall back to the Monte-Carlo estimate ``log q(z_K) - log p(z_K)``.

A transform here is a callable ``z (..., B, d) -> (z', log|det| (..., B))`` whose parameters were
already bound to the encoder's features of the B inputs (amortised) or are global.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

__all__ = ["FlowPosterior", "IAFStep", "PlanarStep", "made_masks"]

Transform = Callable[[Tensor], tuple[Tensor, Tensor]]


class FlowPosterior(Distribution):
    """``q(z_K)`` for ``z_K = f_K(...f_1(z_0))``, ``z_0 ~ base``; batch and event shapes of ``base``.

    Args:
        base: a reparameterisable distribution with event shape ``(d,)``.
        transforms: callables ``z -> (f(z), log|det df/dz|)``, applied in order.

    ``log_prob`` accepts only tensors returned by this object's own ``rsample``/``sample`` (the cached
    log-density is returned); anything else raises ``NotImplementedError``. ``mean`` is the flow's image
    of the base mean, a deterministic summary used for reconstructions and active units, not ``E[z_K]``.
    Its base's statistics (e.g. an AR(1) base's rho) reach the trainer through
    :func:`rhovae.posteriors.posterior_statistics`, which looks through the flow.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self, base: Distribution, transforms: Sequence[Transform], validate_args: bool = False
    ) -> None:
        self.base = base
        self.transforms = list(transforms)
        self._cache: tuple[Tensor, Tensor] | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    def _push(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for transform in self.transforms:
            z, ld = transform(z)
            log_det = log_det + ld
        return z, log_det

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        z0 = self.base.rsample(sample_shape)
        z, log_det = self._push(z0)
        self._cache = (z, self.base.log_prob(z0) - log_det)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        if self._cache is not None and value is self._cache[0]:
            return self._cache[1]
        raise NotImplementedError(
            "a flow posterior evaluates log_prob only at its own samples (it caches their log-density; "
            "the flows are not inverted)"
        )

    @property
    def mean(self) -> Tensor:
        return self._push(self.base.mean)[0]


# --- planar flows (Rezende & Mohamed 2015) ----------------------------------------------------------


class PlanarStep:
    """``f(z) = z + u_hat * tanh(w^T z + b)`` with ``w^T u_hat >= -1`` (invertible).

    ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2``, ``m(a) = -1 + softplus(a)``;
    ``log|det| = log|1 + u_hat^T psi(z)|``, ``psi = (1 - tanh^2(w^T z + b)) w``.
    ``u, w`` are ``(B, d)`` (or ``(d,)`` for a global step), ``b`` is ``(B, 1)`` (or ``(1,)``).
    """

    def __init__(self, u: Tensor, w: Tensor, b: Tensor) -> None:
        wu = (w * u).sum(-1, keepdim=True)
        self.u_hat = u + (F.softplus(wu) - 1 - wu) * w / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        self.w, self.b = w, b

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.tanh((z * self.w).sum(-1, keepdim=True) + self.b)
        psi_u = (1 - a.pow(2)) * (self.w * self.u_hat).sum(-1, keepdim=True)
        # 1 + u_hat^T psi >= 0 by construction; the absolute value and floor guard round-off
        log_det = torch.log((1 + psi_u).abs().clamp_min(1e-12))[..., 0]
        return z + self.u_hat * a, log_det


# --- inverse autoregressive flow (Kingma et al. 2016) -----------------------------------------------


def made_masks(d: int, hidden: int) -> tuple[Tensor, Tensor]:
    """MADE masks for inputs ordered 1..d: ``(hidden, d)`` and ``(d, hidden)``.

    Hidden unit k has degree ``1 + k mod (d - 1)`` and sees inputs of degree <= its own; output i sees
    hidden units of degree < i, so output i depends on inputs 1..i-1 only (strictly autoregressive).
    """
    in_deg = torch.arange(1, d + 1)
    hid_deg = torch.arange(hidden) % max(d - 1, 1) + 1
    m_in = (hid_deg[:, None] >= in_deg[None, :]).float()
    m_out = (in_deg[:, None] > hid_deg[None, :]).float()
    return m_in, m_out


class _MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One IAF step: a MADE on z with an additive context from the encoder; ``(m, s) = MADE(z, c)``,
    ``sigma = sigmoid(s + gate_bias)``, ``z' = sigma * z + (1 - sigma) * m``, ``log|det| = sum log sigma``.

    The last layer starts at zero, so a fresh step is ``z' = sigmoid(gate_bias) * z``: close to the
    identity (0.82 per step with the default gate bias 1.5), exactly a scaling.
    """

    def __init__(self, latent_dim: int, context_dim: int, hidden: int, gate_bias: float = 1.5) -> None:
        super().__init__()
        m_in, m_out = made_masks(latent_dim, hidden)
        self.inp = _MaskedLinear(latent_dim, hidden, m_in)
        self.context = nn.Linear(context_dim, hidden, bias=False)
        self.mean = _MaskedLinear(hidden, latent_dim, m_out)
        self.gate = _MaskedLinear(hidden, latent_dim, m_out)
        self.gate_bias = gate_bias
        for layer in (self.mean, self.gate):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def bind(self, context: Tensor) -> Transform:
        """The step for the inputs whose encoder context is ``context (B, context_dim)``."""
        c = self.context(context)

        def transform(z: Tensor) -> tuple[Tensor, Tensor]:
            hidden = F.elu(self.inp(z) + c)
            m, s = self.mean(hidden), self.gate(hidden) + self.gate_bias
            sigma = torch.sigmoid(s)
            return sigma * z + (1 - sigma) * m, F.logsigmoid(s).sum(-1)

        return transform


def reverse_order(z: Tensor) -> tuple[Tensor, Tensor]:
    """The permutation between IAF steps: reverse the variable order (|det| = 1)."""
    return z.flip(-1), torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
