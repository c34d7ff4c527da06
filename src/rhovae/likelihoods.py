"""Observation models ``p(x | z)`` on the decoder's output, per sample in nats.

``log_prob(x, out)`` returns ``(B,)``: the log-likelihood summed over every pixel of each image.
``mean(out)`` is the image a person looks at.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rhovae.errors import RhovaeError

__all__ = ["LIKELIHOODS", "BernoulliLikelihood", "GaussianLikelihood", "make_likelihood"]


class BernoulliLikelihood(nn.Module):
    """Bernoulli from logits: ``log p(x|z) = -BCE_with_logits(out, x)`` summed over pixels.

    Never BCE on a sigmoid output (the seed's NaN on Fashion-MNIST: log(0) when the sigmoid saturates).
    For continuous x in [0, 1] (the paper's protocol) this is the cross-entropy the paper reports, not
    a normalised density.
    """

    def log_prob(self, x: Tensor, out: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        return -nll.flatten(1).sum(-1)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)


class GaussianLikelihood(nn.Module):
    """``N(x; sigmoid(out), sigma^2)`` per pixel with one learned ``log sigma`` (initially log 0.1)."""

    def __init__(self, init_std: float = 0.1) -> None:
        super().__init__()
        self.log_std = nn.Parameter(torch.tensor(math.log(init_std)))

    def log_prob(self, x: Tensor, out: Tensor) -> Tensor:
        mean = torch.sigmoid(out)
        z = (x - mean) * torch.exp(-self.log_std)
        lp = -0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(-1)

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}


def make_likelihood(name: str) -> nn.Module:
    if name not in LIKELIHOODS:
        raise RhovaeError(f"unknown likelihood {name!r}; choose one of: {', '.join(sorted(LIKELIHOODS))}")
    return LIKELIHOODS[name]()
