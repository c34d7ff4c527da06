"""The VAE: encoder net -> posterior head -> q(z|x) -> z -> decoder net -> likelihood, plus a prior.

Every model in rhovae is this one class with different parts plugged in. It never asks which
posterior family it holds: the KL comes from ``kl_divergence`` where a closed form is registered,
otherwise from the single-sample Monte-Carlo estimate ``log q(z) - log p(z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, kl_divergence

from rhovae.errors import RhovaeError
from rhovae.likelihoods import make_likelihood
from rhovae.nets import (
    BurgessDecoder,
    BurgessEncoder,
    ConvDecoder,
    ConvEncoder,
    DCGANDecoder,
    DCGANEncoder,
    MLPDecoder,
    MLPEncoder,
)
from rhovae.posteriors import make_head
from rhovae.priors import make_prior

__all__ = ["MODELS", "VAE", "Backbone", "ModelConfig", "VAEOutput", "build_model", "kl_term"]


@dataclass
class VAEOutput:
    """Per-sample terms of one pass, each ``(B,)`` in nats, and the sample ``z (B, d)``.

    ``loss = recon + beta * kl`` where ``recon = -log p(x|z)``. ``kl_exact`` says whether ``kl`` is
    the closed form (True) or a one-sample Monte-Carlo estimate.
    """

    loss: Tensor
    recon: Tensor
    kl: Tensor
    z: Tensor
    q: Distribution
    kl_exact: bool


def kl_term(q: Distribution, p: Distribution, z: Tensor) -> tuple[Tensor, bool]:
    """``KL(q || p)`` per sample: closed form where registered, else ``log q(z) - log p(z)`` at ``z``."""
    try:
        return kl_divergence(q, p), True
    except NotImplementedError:
        return q.log_prob(z) - p.log_prob(z), False


class VAE(nn.Module):
    """``VAE(encoder, head, decoder, likelihood, prior)``.

    Args:
        encoder: ``(B, C, H, W) -> (B, F)`` features.
        head: ``(B, F) -> q(z|x)``, a Distribution with event shape ``(d,)``.
        decoder: ``(..., d) -> (..., C, H, W)``, the likelihood's parameters.
        likelihood: ``log_prob(x, out) -> (B,)`` and ``mean(out)``.
        prior: a module whose ``forward()`` returns ``p(z)``.
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module, decoder: nn.Module, likelihood: nn.Module, prior: nn.Module
    ) -> None:
        super().__init__()
        self.encoder, self.head, self.decoder = encoder, head, decoder
        self.likelihood, self.prior = likelihood, prior

    @property
    def latent_dim(self) -> int:
        return self.head.latent_dim

    def posterior(self, x: Tensor) -> Distribution:
        return self.head(self.encoder(x))

    def forward(self, x: Tensor, beta: float = 1.0) -> VAEOutput:
        q = self.posterior(x)
        z = q.rsample()
        recon = -self.likelihood.log_prob(x, self.decoder(z))
        kl, exact = kl_term(q, self.prior(), z)
        return VAEOutput(recon + beta * kl, recon, kl, z, q, exact)

    def elbo(self, x: Tensor) -> Tensor:
        """A one-sample estimate of the ELBO, ``(B,)`` (exact in the KL where a closed form exists)."""
        out = self(x)
        return -(out.recon + out.kl)

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int, max_decoded: int = 32768) -> Tensor:
        """Importance-weighted bound ``log (1/k) sum_i p(x, z_i) / q(z_i|x)``, ``(B,)``, z_i ~ q.

        Tends to ``log p(x)`` as k grows; at k = 1 it is the ELBO. Samples are drawn in chunks so that
        at most ``max_decoded`` images pass the decoder at once (k = 5000 fits in memory), and the
        log-mean-exp is accumulated as a running log-sum-exp.
        """
        if k < 1:
            raise RhovaeError(f"iwae k must be positive, got {k}")
        q = self.posterior(x)
        p = self.prior()
        batch = x.shape[0]
        chunk = max(1, min(k, max_decoded // max(batch, 1)))
        total = torch.full((batch,), -math.inf, device=x.device, dtype=x.dtype)
        done = 0
        while done < k:
            m = min(chunk, k - done)
            z = q.sample((m,))  # (m, B, d)
            out = self.decoder(z.reshape(m * batch, -1))
            x_rep = x.unsqueeze(0).expand((m,) + x.shape).reshape((m * batch,) + x.shape[1:])
            log_px_z = self.likelihood.log_prob(x_rep, out).view(m, batch)
            log_w = log_px_z + p.log_prob(z) - q.log_prob(z)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
            done += m
        return total - math.log(k)

    @torch.no_grad()
    def sample_images(self, n: int, seed: int | None = None) -> Tensor:
        """Means of ``p(x|z)`` for ``n`` draws ``z ~ p(z)``, ``(n, C, H, W)``.

        With ``seed`` the draw is reproducible and leaves the global random state untouched.
        """
        p = self.prior()
        if seed is None:
            return self.likelihood.mean(self.decoder(p.sample((n,))))
        device = p.mean.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            z = p.sample((n,))
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder means at the posterior means, ``(B, C, H, W)``."""
        return self.likelihood.mean(self.decoder(self.posterior(x).mean))


@dataclass
class ModelConfig:
    """What ``build_model`` needs; part of every run's saved config."""

    model: str = "mlp"
    posterior: str = "ar1"
    prior: str = "standard"
    likelihood: str = "bernoulli"
    latent_dim: int = 10
    hidden: int = 400
    flow_steps: int = 4  # for flow posteriors (planar, iaf, BASE+FLOW)
    kl_estimator: str = "exact"  # or "paper-legacy": the reference code's sampler and KL (not an ELBO)


@dataclass(frozen=True)
class Backbone:
    """A registered encoder/decoder pair and what it expects of the run.

    ``input_size``: images are resized to (H, W) once, on the device, when loaded (None: as they come).
    ``beta`` and ``objective``: the defaults a run of this model gets unless it sets its own.
    """

    build: Callable[[ModelConfig, tuple[int, int, int]], tuple[nn.Module, nn.Module]]
    input_size: tuple[int, int] | None = None
    beta: float = 1.0
    objective: str = "elbo"


def _mlp(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    return MLPEncoder(image_shape, cfg.hidden), MLPDecoder(cfg.latent_dim, image_shape, cfg.hidden)


def _cnn(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    return ConvEncoder(image_shape, cfg.hidden), ConvDecoder(cfg.latent_dim, image_shape)


def _betavae(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    return BurgessEncoder(image_shape), BurgessDecoder(cfg.latent_dim, image_shape)


def _infovae(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    return DCGANEncoder(image_shape), DCGANDecoder(cfg.latent_dim, image_shape)


MODELS: dict[str, Backbone] = {
    "mlp": Backbone(_mlp),
    "cnn": Backbone(_cnn),
    "betavae": Backbone(_betavae, input_size=(64, 64), beta=4.0),
    "infovae": Backbone(_infovae, objective="infovae"),
}


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> VAE:
    """Assemble the VAE that ``cfg`` names, for images of shape ``(C, H, W)``."""
    if cfg.model not in MODELS:
        raise RhovaeError(f"unknown model {cfg.model!r}; choose one of: {', '.join(sorted(MODELS))}")
    for name in ("latent_dim", "hidden"):
        if getattr(cfg, name) < 1:
            raise RhovaeError(f"{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    encoder, decoder = MODELS[cfg.model].build(cfg, image_shape)
    head = make_head(cfg.posterior, encoder.out_features, cfg.latent_dim, cfg.flow_steps, cfg.kl_estimator)
    return VAE(encoder, head, decoder, make_likelihood(cfg.likelihood), make_prior(cfg.prior, cfg.latent_dim))
