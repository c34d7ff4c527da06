"""The standard normal prior N(0, I_d) as a distribution type of its own.

It is an ``Independent(Normal(0, 1), 1)`` in every respect, so every KL that torch registers for
``Independent`` still applies; being its own type lets ``register_kl`` pick closed forms that know
the prior is standard without inspecting (and synchronising on) its parameters.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Independent, Normal

__all__ = ["StandardNormal"]


class StandardNormal(Independent):
    """``N(0, I_d)`` with event shape ``(d,)`` and empty batch shape (d = 0: the prior of a model without a
    latent, whose log-density is 0); ``StandardNormal((C, H, W))``: the same over a latent map, event
    shape ``(C, H, W)``.

    Example:
        >>> prior = StandardNormal(10)
        >>> kl_divergence(AR1Normal(torch.zeros(4, 10), torch.zeros(4, 1), torch.ones(4, 1)), prior)
        tensor([0., 0., 0., 0.])
    """

    def __init__(
        self, latent_dim: int | tuple[int, ...], dtype: torch.dtype | None = None, device=None
    ) -> None:
        shape = (latent_dim,) if isinstance(latent_dim, int) else tuple(latent_dim)
        if not shape or min(shape) < 0:
            raise ValueError(f"latent_dim must be >= 0 (or a shape of such sizes), got {latent_dim}")
        loc = torch.zeros(shape, dtype=dtype, device=device)
        base = Normal(loc, torch.ones_like(loc), validate_args=False)
        super().__init__(base, len(shape), validate_args=False)

    @property
    def latent_dim(self) -> int:
        """The number of latent units d (``C * H * W`` over a map)."""
        return math.prod(self.event_shape)

    def expand(self, batch_shape, _instance=None):
        # Independent.expand would return an Independent; a standard normal stays one.
        new = self._get_checked_instance(StandardNormal, _instance)
        return super().expand(batch_shape, _instance=new)
