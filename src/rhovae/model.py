"""The VAE: encoder net -> posterior head -> q(z|x) -> z -> decoder net -> likelihood p(x|z), plus a prior.

Every model in rhovae is this one class with different parts plugged in. It never asks which
posterior family it holds: the KL comes from ``kl_divergence`` where a closed form is registered,
otherwise from the single-sample Monte-Carlo estimate ``log q(z) - log p(z)``. The loss a step
minimises is defined once, in :mod:`rhovae.objectives`; the model only supplies the per-sample terms.

Inputs: public methods (``encode``, ``elbo``, ``log_likelihood``, ``reconstruct``) accept the data in
its own raw form (uint8 images of the size the run was trained at, arrays, PIL images) when the model
carries its training ``preprocessing`` (``rhovae.load`` and ``rhovae.fit`` attach it), and prepared
float tensors ``(B, *data_shape)`` always.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from rhovae.errors import RhovaeError
from rhovae.hierarchy import build_hierarchy
from rhovae.legacy import ESTIMATORS, PaperLegacyAR1Head
from rhovae.likelihoods import LIKELIHOODS, make_likelihood
from rhovae.nets import (
    BurgessDecoder,
    BurgessEncoder,
    ConvDecoder,
    ConvEncoder,
    DCGANDecoder,
    DCGANEncoder,
    MLPDecoder,
    MLPEncoder,
    SpatialConvDecoder,
    SpatialConvEncoder,
)
from rhovae.posteriors import TrajectoryHead, make_head, make_map_head, posterior_names, with_batchnorm_means
from rhovae.priors import PRIORS, TRAJECTORY_PRIORS, make_prior, make_trajectory_prior

__all__ = ["FRAME_MODELS", "MODELS", "VAE", "Backbone", "ModelConfig", "VAEOutput", "build_model", "kl_term"]


@dataclass
class VAEOutput:
    """Per-sample terms of one pass, each ``(B,)`` in nats, and the sample ``z (B, d)``.

    ``recon = -log p(x|z)``; ``kl`` is the closed form when ``kl_exact`` is True, else a one-sample
    Monte-Carlo estimate. The loss built from them is :class:`rhovae.objectives.Objective`'s.
    """

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
    """``VAE(encoder, head, decoder, likelihood, prior)``: any parts, one path.

    Args:
        encoder: ``(B, *data_shape) -> (B, F)`` features.
        head: ``(B, F) -> q(z|x)``, a Distribution with event shape ``(d,)`` (:mod:`rhovae.posteriors`).
        decoder: ``(N, d) -> params (N, ...)``, or ``-> p(x|z)`` as a Distribution (sequence decoders).
        likelihood: ``params -> p(x|z)``, a Distribution with batch shape ``(N,)`` and event shape
            ``data_shape`` (:mod:`rhovae.likelihoods`).
        prior: a module whose ``forward()`` returns ``p(z)``.
        preprocessing: optional callable turning raw inputs into ``(B, *data_shape)`` floats, as in
            training (set by ``rhovae.fit`` and ``rhovae.load``).

    Example::

        vae = build_model(ModelConfig(posterior="ar1"), (1, 28, 28))
        q = vae.encode(x)                 # AR1Normal, batch (B,), event (10,)
        px = vae.decode(q.rsample())      # Independent(Bernoulli), event (1, 28, 28)
        vae.elbo(x), vae.log_likelihood(x, k=1000)
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        prior: nn.Module,
        preprocessing: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.head, self.decoder = encoder, head, decoder
        self.likelihood, self.prior = likelihood, prior
        self.preprocessing = preprocessing

    @property
    def latent_dim(self) -> int:
        """The latent dimension d (``C * H * W`` units for a latent map)."""
        return self.head.latent_dim

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The event shape of z: ``(d,)``, or ``(C, H, W)`` for a latent map."""
        return tuple(getattr(self.head, "latent_shape", (self.latent_dim,)))

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on."""
        return next(self.parameters()).device

    # --- inputs ---------------------------------------------------------------------------------------

    def prepare(self, x: Any) -> Tensor:
        """``x`` as the model takes it, ``(B, *data_shape)`` float on the model's device.

        A float tensor of that shape is taken as already prepared; anything else (uint8 images, arrays,
        PIL images, other sizes) goes through the training ``preprocessing``.
        """
        shape = getattr(self.preprocessing, "data_shape", None)
        if isinstance(x, Tensor) and x.is_floating_point() and (shape is None or x.shape[1:] == shape):
            return x.to(self.device)
        if self.preprocessing is None:
            raise RhovaeError(
                "this model has no preprocessing attached: pass float tensors (B, *data_shape), or load "
                "it with rhovae.load(run_dir)"
            )
        return self.preprocessing(x, device=self.device)

    # --- the path -------------------------------------------------------------------------------------

    def posterior(self, x: Tensor) -> Distribution:
        """``q(z|x)`` for prepared inputs ``x (B, *data_shape)``."""
        return self.head(self.encoder(x))

    def encode(self, x: Any) -> Distribution:
        """``q(z|x)``, batch shape ``(B,)``, event shape ``(d,)`` (``(C, H, W)`` for a latent map); raw
        inputs are prepared first."""
        return self.posterior(self.prepare(x))

    def decode(self, z: Tensor) -> Distribution:
        """``p(x|z)`` for ``z (N, d)`` or ``(N, C, H, W)``: batch ``(N,)``, event shape ``data_shape``."""
        out = self.decoder(z)
        return out if isinstance(out, Distribution) else self.likelihood(out)

    def forward(self, x: Tensor) -> VAEOutput:
        """One pass with one ``z ~ q(z|x)`` per input; ``x`` prepared, ``(B, *data_shape)``."""
        q = self.posterior(x)
        z = q.rsample()
        recon = -self.decode(z).log_prob(x)
        kl, exact = kl_term(q, self.prior(), z)
        return VAEOutput(recon, kl, z, q, exact)

    # --- what users ask of a trained model ------------------------------------------------------------

    @torch.no_grad()
    def elbo(self, x: Any) -> Tensor:
        """A one-sample estimate of the ELBO per input, ``(B,)`` nats (KL exact where a closed form
        exists)."""
        out = self(self.prepare(x))
        return -(out.recon + out.kl)

    @torch.no_grad()
    def log_likelihood(self, x: Any, k: int = 1000) -> Tensor:
        """``log p(x)`` estimated by the k-sample importance-weighted bound, ``(B,)`` nats."""
        return self.iwae_bound(self.prepare(x), k)

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int, max_decoded: int | None = None) -> Tensor:
        """Importance-weighted bound ``log (1/k) sum_i p(x, z_i) / q(z_i|x)``, ``(B,)``, z_i ~ q.

        Tends to ``log p(x)`` as k grows; at k = 1 it is the ELBO. Samples are drawn in chunks so that
        at most ``max_decoded`` inputs pass the decoder at once (k = 5000 fits in memory), and the
        log-mean-exp is accumulated as a running log-sum-exp. Default: 32,768 on an accelerator, 2,048
        on a CPU, where smaller chunks stay in cache (the cnn's bound is 25 % faster than at 32,768).
        """
        if k < 1:
            raise RhovaeError(f"iwae k must be positive, got {k}")
        if max_decoded is None:
            max_decoded = 2048 if x.device.type == "cpu" else 32768
        q = self.posterior(x)
        p = self.prior()
        batch = x.shape[0]
        chunk = max(1, min(k, max_decoded // max(batch, 1)))
        total = torch.full((batch,), -math.inf, device=x.device, dtype=x.dtype)
        done = 0
        while done < k:
            m = min(chunk, k - done)
            z = q.sample((m,))  # (m, B, d)
            x_rep = x.unsqueeze(0).expand((m,) + x.shape).reshape((m * batch,) + x.shape[1:])
            log_px_z = self.decode(z.reshape(m * batch, *self.latent_shape)).log_prob(x_rep).view(m, batch)
            log_w = log_px_z + p.log_prob(z) - q.log_prob(z)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
            done += m
        return total - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """Means of ``p(x|z)`` for ``n`` draws ``z ~ p(z)``, ``(n, *data_shape)``.

        With ``seed`` the draw is reproducible and leaves the global random state untouched.
        """
        try:
            count = operator.index(n) if not isinstance(n, bool) else 0
        except TypeError:
            count = 0
        if count < 1:
            raise RhovaeError(f"sample(n): n must be a positive whole number, got {n!r:.40}")
        n = count
        p = self.prior()
        if seed is None:
            return self.decode(p.sample((n,))).mean
        device = self.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            z = p.sample((n,))
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: Any) -> Tensor:
        """Means of ``p(x|z)`` at the posterior means, ``(B, *data_shape)``."""
        return self.decode(self.encode(x).mean).mean


def _help(text: str, choices: Callable[[], list[str]] | None = None) -> dict[str, Any]:
    """Field metadata the CLI builds its flags from: help text and, where fixed, the valid names."""
    return {"help": text, "choices": choices}


@dataclass
class ModelConfig:
    """What ``build_model`` needs; part of every run's saved config."""

    model: str = field(
        default="mlp",
        metadata=_help(
            "encoder/decoder backbone: mlp (the paper's MLP, vectors or images), cnn (the paper's two-conv "
            "CNN), betavae (Burgess et al. convs on 64x64 inputs, beta 4), infovae (DCGAN with the InfoVAE "
            "objective), lstm (sequences: a bidirectional LSTM encoder and the notes' autoregressive LSTM "
            "decoder); 'custom' marks runs of rhovae.fit with your own networks",
            lambda: sorted(MODELS),
        ),
    )
    posterior: str = field(
        default="ar1",
        metadata=_help(
            "posterior family: diagonal, ar1 (the paper's 2-scalar AR(1)), ar1-diag (AR(1) with "
            "per-dimension scales), isotropic (N(mu, s I): ar1 with rho = 0), full (full covariance), planar "
            "or iaf (flows on the diagonal base), "
            "or BASE+FLOW such as ar1+iaf; --model frames: diagonal, ar1 (along time per channel) or "
            "banded (GP-VAE's bidiagonal-precision posterior)",
            posterior_names,
        ),
    )
    prior: str = field(
        default="standard",
        metadata=_help(
            "prior p(z): standard (N(0, I)), ar1 (a learned AR(1) Gaussian) or made (a learned Gaussian "
            "autoregressive prior from a MADE); with latent groups, the prior of the top group; "
            "--model frames: standard, ar1 (a learned AR(1) along time per channel) or gp (GP-VAE's "
            "Cauchy-kernel Gaussian process)",
            lambda: sorted({*PRIORS, *TRAJECTORY_PRIORS}),
        ),
    )
    prior_rho: float = field(
        default=0.0,
        metadata=_help(
            "with --prior ar1: fix the prior's correlation at this value in (-1, 1), unit variance, not "
            "learned: the delta-VAE's committed rate (Razavi et al., ICLR 2019), whose KL to a factorised "
            "posterior is at least delta(rho) nats (docs/math.md); 0: the AR(1) prior is learned"
        ),
    )
    bn_gamma: float = field(
        default=0.0,
        metadata=_help(
            "BN-VAE (Zhu et al., ACL 2020): the posterior means are batch-normalised with this fixed "
            "scale gamma (learned shift), which keeps the expected KL at least d*gamma^2/2 (0: off)"
        ),
    )
    likelihood: str = field(
        default="bernoulli",
        metadata=_help(
            "p(x|z): bernoulli (logits; on grey levels the paper's cross-entropy, not a density), "
            "continuous-bernoulli (the normalised density on [0, 1]), gaussian (learned sigma), "
            "gaussian-per-feature (a learned sigma per pixel/feature) or decoder (the decoder returns "
            "its own distribution: the lstm model's, set for it)",
            lambda: sorted(LIKELIHOODS),
        ),
    )
    latent_dim: int = field(
        default=10,
        metadata=_help(
            "size d of the latent vector; 0 (--model lstm): no latent, the language-model baseline; "
            "with --latent-shape it is set to C*H*W; --model frames: channels C per frame (each a "
            "trajectory over the T frames)"
        ),
    )
    latent_shape: str = field(
        default="",
        metadata=_help(
            "a spatial latent map C,H,W instead of a vector (--model cnn), e.g. 8,7,7 or 16,4,4 for 28x28 "
            "images: the encoder ends in convolutions that give each position's posterior, the decoder "
            "starts from the map; posteriors diagonal, ar1-2d, ar1-2d-diag (separable 2-D AR(1) per "
            "channel), ar1/ar1-diag/isotropic (per channel, along the raster order), full (small maps); "
            "priors standard or ar1-2d"
        ),
    )
    hidden: int = field(
        default=0,
        metadata=_help(
            "features the mlp, cnn, lstm and frames backbones hand to the posterior head, and the lstm's "
            "width; 0: the model's default (mlp, cnn: 400; lstm: 128, so that a words run takes minutes on "
            "a CPU; frames: 256, per frame, as GP-VAE's HMNIST networks; betavae: 256, infovae: 1024, fixed)"
        ),
    )
    frame_net: str = field(
        default="mlp",
        metadata=_help(
            "--model frames: the network applied to each frame, mlp (any frame shape) or conv (the "
            "paper's cnn, image frames)",
            lambda: ["mlp", "conv"],
        ),
    )
    flow_steps: int = field(default=4, metadata=_help("number of flow steps of planar/iaf posteriors"))
    latent_groups: int = field(
        default=1,
        metadata=_help(
            "hierarchy of latent groups z_0..z_(N-1) sharing a top-down path (ladder/NVAE style; "
            "latent-dim split evenly, the first groups one larger); 1: the flat model"
        ),
    )
    group_sizes: str = field(
        default="",
        metadata=_help(
            "explicit group sizes as a comma list summing to latent-dim, e.g. '4,3,3' "
            "(overrides latent-groups)"
        ),
    )
    group_hidden: int = field(default=128, metadata=_help("width of the hierarchy's top-down path"))
    rnn_cell: str = field(
        default="lstm",
        metadata=_help(
            "the lstm model's encoder cell: lstm or gru (the decoder is an LSTM)", lambda: ["lstm", "gru"]
        ),
    )
    word_dropout: float = field(
        default=0.0,
        metadata=_help(
            "the lstm model: probability of hiding each teacher-forced input step in training (Bowman et "
            "al. 2016; a remedy for posterior collapse)"
        ),
    )
    kl_estimator: str = field(
        default="exact",
        metadata=_help(
            "exact, or paper-legacy: train with the reference code's random-walk sampler and batch-mixed "
            "KL (NOT an ELBO; for reproducing the published curves; evaluation stays exact)",
            lambda: list(ESTIMATORS),
        ),
    )


@dataclass(frozen=True)
class Backbone:
    """A registered encoder/decoder pair and what it expects of the run.

    ``build(cfg, data_shape, meta) -> (encoder, decoder)``; ``meta`` is what the data source says about
    itself (e.g. a sequence set's vocabulary). ``input_size``: images are resized to (H, W) once,
    on the device, when loaded (None: as they come). ``beta`` and ``objective``: the defaults a run of
    this model gets unless it sets its own. ``likelihood``: set when the decoder returns its own
    distribution over x (``"decoder"``); a run of this model then takes no other. ``hidden``: the width a
    run gets with ``hidden = 0`` (the default).
    """

    build: Callable[[ModelConfig, tuple[int, ...], dict[str, Any]], tuple[nn.Module, nn.Module]]
    input_size: tuple[int, int] | None = None
    beta: float = 1.0
    objective: str = "elbo"
    likelihood: str = ""
    hidden: int = 400


def _image_shape(model: str, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(data_shape) != 3:
        raise RhovaeError(
            f"the {model} model takes images (C, H, W), got data of shape {tuple(data_shape)}; "
            "use --model mlp for vectors"
        )
    return data_shape  # type: ignore[return-value]


def _mlp(cfg: ModelConfig, shape: tuple[int, ...], meta: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    return MLPEncoder(shape, cfg.hidden), MLPDecoder(cfg.latent_dim, shape, cfg.hidden)


def _cnn(cfg: ModelConfig, shape: tuple[int, ...], meta: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    shape = _image_shape("cnn", shape)
    latent_shape = parse_latent_shape(cfg.latent_shape)
    if latent_shape is not None:
        return SpatialConvEncoder(shape, latent_shape), SpatialConvDecoder(latent_shape, shape)
    return ConvEncoder(shape, cfg.hidden), ConvDecoder(cfg.latent_dim, shape)


#: the backbones that take a spatial latent map (``--latent-shape``)
MAP_MODELS = ("cnn",)


def parse_latent_shape(text: str) -> tuple[int, int, int] | None:
    """``"C,H,W"`` as a shape of three positive integers; ``""``: None (a flat latent)."""
    if not text.strip():
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise RhovaeError(f"latent-shape must be three positive integers C,H,W such as 8,7,7, got {text!r}")
    return shape  # type: ignore[return-value]


def _betavae(cfg: ModelConfig, shape: tuple[int, ...], meta: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    shape = _image_shape("betavae", shape)
    return BurgessEncoder(shape), BurgessDecoder(cfg.latent_dim, shape)


def _infovae(cfg: ModelConfig, shape: tuple[int, ...], meta: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    shape = _image_shape("infovae", shape)
    return DCGANEncoder(shape), DCGANDecoder(cfg.latent_dim, shape)


def _lstm(cfg: ModelConfig, shape: tuple[int, ...], meta: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    from rhovae.data.sequences import SequenceVocab
    from rhovae.nets.lstm import LSTMDecoder, LSTMEncoder

    if "vocab" not in meta or len(shape) != 2:
        raise RhovaeError(
            f"the lstm model takes sequence data (nas201, layers, words), got data of shape {tuple(shape)}"
        )
    vocab = SequenceVocab.from_dict(meta["vocab"])
    encoder = LSTMEncoder(shape, cfg.hidden, cell=cfg.rnn_cell)
    return encoder, LSTMDecoder(cfg.latent_dim, shape, vocab, cfg.hidden, cfg.word_dropout)


def _frames(cfg: ModelConfig, shape: tuple[int, ...], meta: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    from rhovae.nets.frames import FrameDecoder, FrameEncoder

    if "frames" not in meta or len(shape) < 2:
        raise RhovaeError(
            f"the frames model takes sequences of frames (rotating:mnist-5k, rotating:fashion-mnist, or "
            f"npz:PATH with --model frames), got data of shape {tuple(shape)}"
        )
    encoder = FrameEncoder(shape, cfg.hidden, cfg.frame_net)
    return encoder, FrameDecoder(cfg.latent_dim, shape, cfg.hidden, cfg.frame_net)


#: the backbones over frame sequences (``(T, *frame)`` data, a latent trajectory per channel)
FRAME_MODELS = ("frames",)


MODELS: dict[str, Backbone] = {
    "mlp": Backbone(_mlp),
    "cnn": Backbone(_cnn),
    "betavae": Backbone(_betavae, input_size=(64, 64), beta=4.0),
    "infovae": Backbone(_infovae, objective="infovae"),
    "lstm": Backbone(_lstm, likelihood="decoder", hidden=128),
    "frames": Backbone(_frames, hidden=256),
}


class NoEncoder(nn.Module):
    """The encoder of a model without a latent (``latent_dim = 0``): no parameters, no computation; its
    empty features ``(B, 0)`` give an empty posterior, so the KL is 0 and the IWAE bound is the
    decoder's exact log-likelihood."""

    out_features = 0

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros((x.shape[0], 0))


class NoLatentHead(nn.Module):
    """The posterior of a model without a latent: ``N(0, I_0)`` per example (batch ``(B,)``, event
    ``(0,)``), whose samples are empty, log-density 0 and KL to the prior 0."""

    latent_dim = 0

    def forward(self, h: Tensor) -> Distribution:
        loc = h.new_zeros((*h.shape[:-1], 0))
        return Independent(Normal(loc, torch.ones_like(loc), validate_args=False), 1, validate_args=False)


def encoder_features(encoder: nn.Module, data_shape: tuple[int, ...]) -> int:
    """The encoder's output size: its ``out_features`` attribute, else measured on two zero inputs."""
    n = getattr(encoder, "out_features", None)
    if isinstance(n, int) and (n > 0 or isinstance(encoder, NoEncoder)):
        return n
    try:
        with torch.no_grad():
            was_training = encoder.training
            encoder.eval()
            h = encoder(torch.zeros(2, *data_shape, device=_module_device(encoder)))
            encoder.train(was_training)
    except Exception as e:  # noqa: BLE001 - a user network: say what it was given
        raise RhovaeError(
            f"the encoder failed on inputs of shape (2, {', '.join(map(str, data_shape))}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[0] != 2:
        shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise RhovaeError(f"the encoder must map (B, ...) inputs to (B, F) features, it returned {shape}")
    return int(h.shape[1])


def check_networks(model: VAE, x: Tensor) -> None:
    """One pass on a few prepared examples ``x``, turning a mismatch between the user's networks, the
    likelihood and the data into one line that says which part failed and what it should return."""
    with torch.no_grad():
        try:
            q = model.posterior(x)
        except Exception as e:  # noqa: BLE001 - a user network
            raise RhovaeError(
                f"the encoder or posterior head failed on inputs {tuple(x.shape)}: {_first(e)}"
            ) from None
        z = q.sample()
        try:
            log_px = model.decode(z).log_prob(x)
        except Exception as e:  # noqa: BLE001 - a user network
            raise RhovaeError(
                f"the decoder's output does not fit the likelihood for data {tuple(x.shape[1:])}: "
                f"{_first(e)}; "
                f"the decoder must map z (N, {z.shape[-1]}) to the likelihood's parameters (N, "
                f"{', '.join(map(str, x.shape[1:]))}) or return a Distribution over x"
            ) from None
    if log_px.shape != x.shape[:1]:
        raise RhovaeError(
            f"the decoder's p(x|z) gives log-probabilities of shape {tuple(log_px.shape)}, not ({len(x)},): "
            f"it must map z (N, {z.shape[-1]}) to parameters of shape (N, {', '.join(map(str, x.shape[1:]))})"
        )


def _first(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _module_device(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def build_model(
    cfg: ModelConfig,
    data_shape: tuple[int, ...],
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    meta: dict[str, Any] | None = None,
) -> VAE:
    """Assemble the VAE that ``cfg`` names, for data of shape ``data_shape`` (``meta``: what the data
    source says about itself, e.g. a sequence vocabulary).

    ``encoder`` and ``decoder`` replace the backbone's networks (both or neither): any ``nn.Module``s,
    ``x (B, *data_shape) -> (B, F)`` and ``z (N, d) -> `` the likelihood's parameters ``(N, *data_shape)``
    (or a Distribution over x). ``cfg`` is validated by :meth:`RunConfig.validate` (the edge).
    """
    data_shape = tuple(data_shape)
    if cfg.hidden == 0:  # the model's default width (RunConfig.validate records it)
        cfg = dataclasses.replace(cfg, hidden=default_hidden(cfg.model))
    if (encoder is None) != (decoder is None):
        raise RhovaeError("give both an encoder and a decoder, or neither (the backbone's pair)")
    if encoder is None:
        if cfg.model not in MODELS:
            raise RhovaeError(f"unknown model {cfg.model!r}; choose one of: {', '.join(sorted(MODELS))}")
        with warnings.catch_warnings():  # latent_dim 0: the decoder's first layer has no weights to draw
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            encoder, decoder = MODELS[cfg.model].build(cfg, data_shape, meta or {})
    if cfg.latent_dim == 0:  # no latent: the decoder alone (the sequence model's language-model baseline)
        encoder = NoEncoder()
    if cfg.model in FRAME_MODELS:  # per-frame features (B, T, F) feed a posterior over trajectories
        frames = data_shape[0]
        head = TrajectoryHead(cfg.posterior, encoder.out_features, cfg.latent_dim, frames)
        prior = make_trajectory_prior(cfg.prior, cfg.latent_dim, frames)
        likelihood = make_likelihood(cfg.likelihood, data_shape, masked=True)
        return VAE(encoder, head, decoder, likelihood, prior)
    latent_shape = parse_latent_shape(cfg.latent_shape)
    if latent_shape is not None:  # a latent map: the encoder's feature map feeds a map head
        out_shape = getattr(encoder, "out_shape", None)
        if out_shape is None or tuple(out_shape[1:]) != latent_shape[1:]:
            raise RhovaeError(
                f"a latent map {latent_shape} needs an encoder whose features are a map of the same size, "
                f"(B, F, {latent_shape[1]}, {latent_shape[2]}) with out_shape set; got {out_shape}"
            )
        head = make_map_head(cfg.posterior, out_shape[0], latent_shape)
        prior = make_prior(cfg.prior, math.prod(latent_shape), latent_shape=latent_shape)
        return VAE(encoder, head, decoder, make_likelihood(cfg.likelihood, data_shape), prior)
    features = encoder_features(encoder, data_shape)
    groups = hierarchy_groups(cfg)
    if groups != 1:  # the encoder is the bottom-up path; the decoder reads the concatenated z
        head, prior = build_hierarchy(
            cfg.posterior, features, cfg.latent_dim, groups, cfg.group_hidden, cfg.flow_steps, cfg.prior
        )
    elif cfg.kl_estimator == "paper-legacy" and cfg.posterior == "ar1":
        head = PaperLegacyAR1Head(features, cfg.latent_dim)
        prior = make_prior(cfg.prior, cfg.latent_dim, rho=cfg.prior_rho)
    elif cfg.latent_dim == 0:
        head, prior = NoLatentHead(), make_prior("standard", 0)
    else:
        head = make_head(cfg.posterior, features, cfg.latent_dim, cfg.flow_steps)
        if cfg.bn_gamma > 0:
            head = with_batchnorm_means(head, cfg.bn_gamma)
        prior = make_prior(cfg.prior, cfg.latent_dim, rho=cfg.prior_rho)
    return VAE(encoder, head, decoder, make_likelihood(cfg.likelihood, data_shape), prior)


def default_hidden(model: str) -> int:
    """The width ``hidden = 0`` stands for: the backbone's own (lstm 128), else 400."""
    return MODELS[model].hidden if model in MODELS else Backbone.hidden


def hierarchy_groups(cfg: ModelConfig) -> int | list[int]:
    """The latent groups ``cfg`` asks for: a list of sizes, or a count (1: the flat model)."""
    if cfg.group_sizes.strip():
        try:
            return [int(s) for s in cfg.group_sizes.split(",")]
        except ValueError:
            raise RhovaeError(
                f"group-sizes must be a comma list of integers, got {cfg.group_sizes!r}"
            ) from None
    return cfg.latent_groups
