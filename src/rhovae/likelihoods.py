"""Observation models ``p(x | z)``: modules that turn the decoder's output into a Distribution over x.

A likelihood is called on the decoder's output ``params (N, *data_shape)`` and returns a
``torch.distributions.Distribution`` with batch shape ``(N,)`` and event shape ``data_shape``, so
``log_prob(x)`` is ``(N,)`` in nats (summed over every event dimension, whatever their number) and
``mean`` is what a person looks at. A decoder may also return a Distribution over x itself (the
sequence decoders do: an autoregressive p(x|z)); the VAE then uses it as it is.

Which number is which: ``bernoulli`` on grey levels in [0, 1] (the paper's protocol) is the binary
cross-entropy, **not a normalised density** over [0, 1]; ``continuous-bernoulli`` (Loaiza-Ganem &
Cunningham 2019) is, and so is ``gaussian``. Reports name the likelihood next to every number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, ContinuousBernoulli, Distribution, Independent, Normal

from rhovae.errors import RhovaeError

__all__ = [
    "LIKELIHOODS",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "DecoderLikelihood",
    "GaussianLikelihood",
    "GaussianPerFeatureLikelihood",
    "make_likelihood",
]


class _Likelihood(nn.Module):
    """Common shape handling: the event is the data's shape ``data_shape``."""

    #: True when x must lie in [0, 1] (the data loader checks it at the edge)
    unit_interval: bool = False
    #: True when ``log_prob`` is a normalised density (or mass) over the data's space
    normalised: bool = True

    def __init__(self, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)

    def _independent(self, base: Distribution) -> Distribution:
        return Independent(base, len(self.data_shape), validate_args=False)


class BernoulliLikelihood(_Likelihood):
    """``Bernoulli(logits = params)`` per element: exact for binary x, the paper's cross-entropy for
    grey levels (not normalised there). Never BCE on a sigmoid output (log 0 when it saturates)."""

    unit_interval = True

    def forward(self, params: Tensor) -> Distribution:
        return self._independent(Bernoulli(logits=params, validate_args=False))


class ContinuousBernoulliLikelihood(_Likelihood):
    """``ContinuousBernoulli(logits = params)``: the normalised density for x in [0, 1]."""

    unit_interval = True

    def forward(self, params: Tensor) -> Distribution:
        return self._independent(ContinuousBernoulli(logits=params, validate_args=False))


class GaussianLikelihood(_Likelihood):
    """``N(x; params, sigma^2)``: the decoder gives the mean; ``log sigma`` is learned, one for all
    elements (``per_feature=False``) or one per element of the data shape. Starts at sigma = 0.1."""

    def __init__(self, data_shape: tuple[int, ...], per_feature: bool = False, init_std: float = 0.1) -> None:
        super().__init__(data_shape)
        shape = self.data_shape if per_feature else ()
        self.log_std = nn.Parameter(torch.full(shape, math.log(init_std)))

    def forward(self, params: Tensor) -> Distribution:
        std = self.log_std.exp().expand_as(params)
        return self._independent(Normal(params, std, validate_args=False))


class GaussianPerFeatureLikelihood(GaussianLikelihood):
    """:class:`GaussianLikelihood` with one learned ``log sigma`` per element of the data shape."""

    def __init__(self, data_shape: tuple[int, ...], init_std: float = 0.1) -> None:
        super().__init__(data_shape, per_feature=True, init_std=init_std)


class DecoderLikelihood(_Likelihood):
    """``decoder``: the decoder returns its own Distribution over x (the lstm model's autoregressive
    categorical + Gaussian steps, or your own networks through ``rhovae.fit``), so there is nothing to
    wrap; called only when a decoder returns a Tensor instead, which it says in one line."""

    def forward(self, params: Tensor) -> Distribution:
        raise RhovaeError(
            f"likelihood 'decoder' needs a decoder that returns a torch Distribution over x, got a "
            f"{type(params).__name__} of shape {tuple(params.shape)}; choose another likelihood"
        )


LIKELIHOODS: dict[str, type[_Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "continuous-bernoulli": ContinuousBernoulliLikelihood,
    "decoder": DecoderLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian-per-feature": GaussianPerFeatureLikelihood,
}


def make_likelihood(name: str, data_shape: tuple[int, ...]) -> nn.Module:
    """The likelihood module ``name`` for data of shape ``data_shape`` (the name is checked by the config)."""
    return LIKELIHOODS[name](data_shape)
