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
    "MaskedLikelihood",
    "MaskedObservations",
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


class MaskedObservations(Distribution):
    """``p(x_obs | z)``: a likelihood over data with missing values, scoring the observed values only.

    Wraps ``Independent(base, n)`` (any elementwise ``base``); ``log_prob(x)`` is the sum of
    ``base.log_prob`` over the values of ``x`` that are not NaN, ``(N,)`` nats: missing values (NaN)
    contribute nothing, so the ELBO and the IWAE bound are those of the observed values
    (``log p(x_obs) = log ∫ p(x_obs | z) p(z) dz`` for a decoder that factorises over values).
    ``mean`` and ``sample`` cover every value, missing ones included: the imputation.
    ``log_prob_values(x)`` gives the per-value log-densities (for scoring imputations).
    """

    arg_constraints: dict = {}

    def __init__(self, inner: Independent) -> None:
        self.inner = inner
        super().__init__(inner.batch_shape, inner.event_shape, validate_args=False)

    @property
    def base(self) -> Distribution:
        """The elementwise distribution, batch ``(N, *data_shape)``."""
        return self.inner.base_dist

    @property
    def mean(self) -> Tensor:
        return self.inner.mean

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008 - torch's signature
        return self.inner.sample(sample_shape)

    def log_prob_values(self, x: Tensor) -> Tensor:
        """``log p(x_i | z)`` per value, ``(N, *data_shape)``; 0 where ``x`` is NaN."""
        observed = ~x.isnan()
        lp = self.base.log_prob(x.masked_fill(~observed, 0.0))
        return lp.masked_fill(~observed, 0.0)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_values(x).flatten(-len(self.event_shape)).sum(-1)


class MaskedLikelihood(nn.Module):
    """A likelihood module whose distributions score observed values only (:class:`MaskedObservations`);
    the frames model wraps its likelihood in it. ``inner`` keeps its own parameters (a Gaussian's sigma)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.data_shape = inner.data_shape
        self.unit_interval, self.normalised = inner.unit_interval, inner.normalised

    def forward(self, params: Tensor) -> Distribution:
        return MaskedObservations(self.inner(params))


def make_likelihood(name: str, data_shape: tuple[int, ...], masked: bool = False) -> nn.Module:
    """The likelihood module ``name`` for data of shape ``data_shape`` (the name is checked by the config);
    ``masked``: wrapped in :class:`MaskedLikelihood` (data with missing values as NaN)."""
    module = LIKELIHOODS[name](data_shape)
    return MaskedLikelihood(module) if masked else module
