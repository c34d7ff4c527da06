"""A flat posterior family laid out as a latent map: the same distribution, its event reshaped.

The flat families (``ar1`` along the raster order of each channel, ``full``, ...) are defined over
vectors; over a latent map ``(C, H, W)`` they act on the flattened map. :class:`LatentMap` gives such a
distribution the map's event shape, so that a model, its prior and its decoder see one shape whatever
the family. It changes no density: the reshape is a bijection with unit Jacobian.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

__all__ = ["LatentMap"]


class LatentMap(Distribution):
    """``base`` (batch ``B``, an event of ``C * H * W`` values in any layout) seen with event ``shape``.

    Example:
        >>> flat = Independent(AR1Normal(torch.zeros(4, 8, 49), torch.zeros(4, 8, 1), torch.ones(4, 8, 1)), 1)
        >>> q = LatentMap(flat, (8, 7, 7))        # per channel, an AR(1) along the raster order
        >>> q.rsample().shape, q.event_shape
        (torch.Size([4, 8, 7, 7]), torch.Size([8, 7, 7]))

    ``log_prob``, ``entropy`` and the KL to ``StandardNormal(shape)`` are the base's; the base's own
    cached log-densities (flows) are not carried over, so flows are not offered on maps.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base: Distribution, shape: tuple[int, ...], validate_args: bool | None = None) -> None:
        shape = torch.Size(shape)
        if math.prod(base.event_shape) != math.prod(shape):
            raise ValueError(
                f"a base event of {tuple(base.event_shape)} cannot be laid out as {tuple(shape)}"
            )
        self.base = base
        super().__init__(
            base.batch_shape, shape, validate_args=False if validate_args is None else validate_args
        )

    @property
    def support(self):  # type: ignore[override]
        return constraints.independent(constraints.real, len(self.event_shape))

    def _to_base(self, value: Tensor) -> Tensor:
        lead = value.shape[: value.dim() - len(self.event_shape)]
        return value.reshape(lead + self.base.event_shape)

    def _to_map(self, value: Tensor) -> Tensor:
        lead = value.shape[: value.dim() - len(self.base.event_shape)]
        return value.reshape(lead + self.event_shape)

    def expand(self, batch_shape, _instance=None):
        return LatentMap(self.base.expand(batch_shape), tuple(self.event_shape))

    @property
    def latent_dim(self) -> int:
        """The number of latent units."""
        return math.prod(self.event_shape)

    @property
    def mean(self) -> Tensor:
        return self._to_map(self.base.mean)

    @property
    def mode(self) -> Tensor:
        return self._to_map(self.base.mode)

    @property
    def variance(self) -> Tensor:  # type: ignore[override]
        return self._to_map(self.base.variance)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self._to_map(self.base.rsample(sample_shape))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self._to_map(self.base.sample(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base.log_prob(self._to_base(value))

    def entropy(self) -> Tensor:
        return self.base.entropy()
