r"""GP-VAE's Gaussian-process prior over latent trajectories: a Cauchy kernel over the frame indices.

Each of C latent channels is an independent zero-mean Gaussian process over the frames
``t = 0, 1, ..., T - 1`` with the Cauchy kernel (Fortuin et al., "GP-VAE: Deep Probabilistic Time Series
Imputation", AISTATS 2020)::

    k(t, t') = variance / (1 + (t - t')^2 / length_scale^2),   K = [k(t_i, t_j)] + jitter * I

The values GP-VAE uses, from its code (github.com/ratschlab/GP-VAE, ``lib/gp_kernel.py`` and the flags of
``train.py`` / the README's "Reproducibility" commands): frames at integer times ``0 .. T-1``;
``sigma = 1.0`` (this module's ``variance``: the kernel's value at lag 0, so a variance, not a standard
deviation), ``length_scale = 2.0`` and T = 10 for HMNIST (Sprites: the same kernel, T = 8; Physionet:
``sigma = 1.005``, ``length_scale = 7``, T = 48); a jitter of ``1e-3`` added to the diagonal, hard-coded
in its ``cauchy_kernel``; one length scale shared by all latent channels (``kernel_scales = 1``).

The kernel is positive semi-definite (it is the rational-quadratic kernel with ``alpha = 1``, length
scale ``length_scale / sqrt(2)``: a scale mixture of squared-exponential kernels), so every eigenvalue of
``K`` is at least ``jitter``; in floating point the jitter is what keeps ``K`` factorable when the length
scale is long against T. The Cholesky factor is computed once, in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Independent, MultivariateNormal

from rhovae.errors import RhovaeError

__all__ = ["GaussianProcessPrior", "cauchy_kernel"]

#: GP-VAE's values for HMNIST (github.com/ratschlab/GP-VAE: README "Reproducibility", lib/gp_kernel.py)
GPVAE_LENGTH_SCALE = 2.0
GPVAE_VARIANCE = 1.0
GPVAE_JITTER = 1e-3


def _positive(name: str, value: float | Tensor, fix: str) -> None:
    if not bool((torch.as_tensor(value) > 0).all()):
        raise RhovaeError(f"{name} must be positive, got {value}; {fix}")


def cauchy_kernel(times: Tensor, length_scale: float | Tensor, variance: float | Tensor) -> Tensor:
    """The Cauchy kernel matrix ``k(t, t') = variance / (1 + (t - t')^2 / length_scale^2)``.

    Args:
        times: the frames' times, shape ``(T,)`` (or ``(..., T)``: one kernel matrix per leading index).
        length_scale: the lag at which the covariance halves, positive (GP-VAE, HMNIST: 2).
        variance: the kernel at lag 0, positive (GP-VAE's ``sigma``; HMNIST: 1).

    Returns:
        ``(T, T)`` (``(..., T, T)``), symmetric; no jitter added (see :class:`GaussianProcessPrior`).
    """
    if not isinstance(times, Tensor) or times.dim() < 1:
        raise RhovaeError("times must be a tensor of shape (T,), one time per frame")
    _positive("length_scale", length_scale, "it is the lag at which the covariance halves")
    _positive("variance", variance, "it is the kernel's value at lag 0")
    lag = times.unsqueeze(-1) - times.unsqueeze(-2)
    return variance / (1 + (lag / length_scale).pow(2))


class GaussianProcessPrior(nn.Module):
    r"""GP-VAE's prior: C independent zero-mean GPs with the Cauchy kernel over T frames, fixed.

    Called, it returns ``Independent(MultivariateNormal(zeros(C, T), scale_tril=L), 1)`` with
    ``L L^T = K = cauchy_kernel(0..T-1) + jitter I`` shared by all channels: event shape ``(C, T)``,
    **channels first, time last** (a trajectory per channel, the layout of
    ``Independent(BandedNormal(loc (B, C, T), ...), 1)``; transpose a ``(T, C)`` latent before scoring
    it). ``K`` and ``L`` are dense, ``(T, T)``: fine for T <= 64.

    Example:
        >>> prior = GaussianProcessPrior(num_frames=10, channels=8)
        >>> p = prior()                               # event shape (8, 10)
        >>> q = Independent(BandedNormal(torch.zeros(4, 8, 10), torch.ones(4, 8, 10),
        ...                              torch.zeros(4, 8, 9)), 1)
        >>> kl_divergence(q, p).shape                 # per sample, summed over channels
        torch.Size([4])

    Args:
        num_frames: T >= 1.
        channels: C >= 1, the latent channels (GP-VAE's ``latent_dim``).
        length_scale: the kernel's length scale, in frames (GP-VAE, HMNIST: 2).
        variance: the kernel at lag 0 (GP-VAE's ``sigma``; HMNIST: 1).
        jitter: added to the diagonal of ``K`` (GP-VAE: 1e-3), >= 0.

    The kernel and its factor are computed once in float64 and cast, on use, to the module's dtype and
    device (``.to``, ``.double()`` move a zero-size anchor; nothing is saved in the state dict).
    """

    def __init__(
        self,
        num_frames: int,
        channels: int,
        length_scale: float = GPVAE_LENGTH_SCALE,
        variance: float = GPVAE_VARIANCE,
        jitter: float = GPVAE_JITTER,
    ) -> None:
        super().__init__()
        if num_frames < 1:
            raise RhovaeError(f"num_frames must be at least 1, got {num_frames}")
        if channels < 1:
            raise RhovaeError(f"channels must be at least 1, got {channels}")
        if not jitter >= 0:
            raise RhovaeError(f"jitter must be >= 0, got {jitter}; GP-VAE adds 1e-3")
        self.num_frames, self.channels = int(num_frames), int(channels)
        self.length_scale, self.variance, self.jitter = float(length_scale), float(variance), float(jitter)
        times = torch.arange(self.num_frames, dtype=torch.float64)
        kernel = cauchy_kernel(times, self.length_scale, self.variance)
        kernel = kernel + self.jitter * torch.eye(self.num_frames, dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:
            raise RhovaeError(
                f"the Cauchy kernel over {self.num_frames} frames (length_scale {self.length_scale}) plus "
                f"jitter {self.jitter} is not positive definite; raise jitter"
            )
        self._kernel64, self._factor64 = kernel, factor
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows .to(device/dtype)

    def _matrices(self) -> tuple[Tensor, Tensor]:
        key = (self._anchor.dtype, self._anchor.device)
        if key not in self._cast:
            self._cast[key] = (
                self._kernel64.to(device=key[1], dtype=key[0]),
                self._factor64.to(device=key[1], dtype=key[0]),
            )
        return self._cast[key]

    @property
    def covariance(self) -> Tensor:
        """``K = cauchy_kernel + jitter I``, ``(T, T)``: each channel's covariance over the frames."""
        return self._matrices()[0]

    @property
    def scale_tril(self) -> Tensor:
        """The lower Cholesky factor of :attr:`covariance`, ``(T, T)``."""
        return self._matrices()[1]

    def log_det(self) -> Tensor:
        """``log det`` of the prior's covariance over its whole event ``(C, T)``: ``C log det K``, a scalar
        (per channel: divide by ``channels``)."""
        return 2 * self.channels * self.scale_tril.diagonal().log().sum()

    def forward(self) -> Independent:
        factor = self.scale_tril
        loc = factor.new_zeros(self.channels, self.num_frames)
        base = MultivariateNormal(loc, scale_tril=factor, validate_args=False)
        return Independent(base, 1, validate_args=False)

    def extra_repr(self) -> str:
        return (
            f"num_frames={self.num_frames}, channels={self.channels}, length_scale={self.length_scale}, "
            f"variance={self.variance}, jitter={self.jitter}"
        )
