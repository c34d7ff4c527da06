"""Priors ``p(z)`` as modules that return a distribution (so a learned prior trains with the model)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from rhovae.distributions import AR1Normal, StandardNormal
from rhovae.errors import RhovaeError
from rhovae.posteriors import RHO_BOUND

__all__ = ["PRIORS", "AR1Prior", "StandardNormalPrior", "make_prior"]


class StandardNormalPrior(nn.Module):
    """``N(0, I_d)``, with no parameters."""

    def __init__(self, latent_dim: int) -> None:
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


PRIORS = {"standard": StandardNormalPrior, "ar1": AR1Prior}


def make_prior(name: str, latent_dim: int) -> nn.Module:
    if name not in PRIORS:
        raise RhovaeError(f"unknown prior {name!r}; choose one of: {', '.join(sorted(PRIORS))}")
    return PRIORS[name](latent_dim)
