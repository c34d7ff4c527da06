r"""The Gaussian with a banded (tridiagonal) precision over a trajectory: GP-VAE's structured posterior.

For one latent channel over T frames, ``z ~ N(loc, (B^T B)^-1)`` with ``B`` (T x T) upper-bidiagonal::

    B[i, i] = diagonal[i] > 0,   B[i, i+1] = upper[i],   every other entry 0

so the precision ``Lambda = B^T B`` is tridiagonal: given its two neighbours, a frame is independent of
the rest of the trajectory (Fortuin et al., "GP-VAE: Deep Probabilistic Time Series Imputation",
AISTATS 2020; code: github.com/ratschlab/GP-VAE). Every fast operation is O(T) per sample (the sample
and the variances are parallel scans, O(T log T) work in ceil(log2 T) vectorised steps); the dense views
exist for references and for the KL to a dense Gaussian, and are never touched by the fast paths.

The identities used, numbered (B1)-(B6) here (docs/math.md §16 summarises them). With
``d = diagonal``, ``u = upper`` and ``Sigma = B^-1 B^-T``:

(B1) Sample: ``z = loc + x`` with ``B x = eps``, ``eps ~ N(0, I)``, i.e. ``x_(T-1) = eps_(T-1) / d_(T-1)``
     and ``x_i = (eps_i - u_i x_(i+1)) / d_i``. With ``a_i = eps_i / d_i`` and ``c_i = -u_i / d_i`` that is
     the backward first-order recurrence ``x_i = a_i + c_i x_(i+1)``, solved by a Hillis–Steele scan of
     the affine maps ``x -> a + c x`` (composition ``(a, c) o (a', c') = (a + c a', c c')``): only
     products and sums of the loop's own terms, so as accurate as the loop, and plain autograd. The
     sample runs it (or, up to 16 frames, the loop itself) outside autograd, in one node whose backward
     is the same recurrence forwards in time for ``B^-T g``.
(B2) ``log det Sigma = -2 sum_i log d_i``.
(B3) ``(z - loc)^T Lambda (z - loc) = ||B (z - loc)||^2``, ``(B w)_i = d_i w_i + u_i w_(i+1)``.
(B4) The band of ``Sigma``: ``S_i = Sigma_(i,i)`` and ``C_i = Sigma_(i,i+1)``. Since ``a_i`` in (B1) is
     independent of ``x_(i+1)``: ``S_(T-1) = 1 / d_(T-1)^2``, ``S_i = 1 / d_i^2 + (u_i / d_i)^2 S_(i+1)``
     (the recurrence of (B1) with ``a_i = 1 / d_i^2``, ``c_i = (u_i / d_i)^2``: a sum of positive terms,
     no cancellation) and ``C_i = -(u_i / d_i) S_(i+1)``.
(B5) ``KL(q || p) = 1/2 [tr(Sigma_p^-1 Sigma_q) + m^T Sigma_p^-1 m - T + log det Sigma_p - log det Sigma_q]``
     with ``m = loc_q - loc_p``. A diagonal or tridiagonal ``Sigma_p^-1`` meets only the band of
     ``Sigma_q`` in the trace, so each trace is O(T):

     - ``N(0, I)``: ``tr = sum_i S_i``.
     - ``N(mu, diag tau^2)``: ``tr = sum_i S_i / tau_i^2``.
     - banded p (``d', u'``): by (B1), ``(B_p x)_i = d'_i a_i + (d'_i c_i + u'_i) x_(i+1)`` with ``a_i``
       independent of ``x_(i+1)``, so ``tr = sum_i E[(B_p x)_i^2]
       = sum_i (d'_i / d_i)^2 + sum_(i < T-1) ((d_i u'_i - d'_i u_i) / d_i)^2 S_(i+1)``.
     - AR(1) p, ``D T(rho) D``: with ``w = x / sigma`` and the innovations ``e_0 = w_0``,
       ``e_j = (w_j - rho w_(j-1)) / sqrt(1 - rho^2)`` (docs/math.md eq. 6), the same split of
       ``x_(j-1)`` gives ``tr = E||e||^2 = S_0 / sigma_0^2
       + sum_(j >= 1) [k_j^2 S_j + (rho / (d_(j-1) sigma_(j-1)))^2] / (1 - rho^2)`` with
       ``k_j = 1 / sigma_j + rho u_(j-1) / (d_(j-1) sigma_(j-1))``.

     Every trace is a sum of positive terms: no cancellation however strong the correlation. (Expanding
     ``E[(B_p x)_i^2]`` over the band ``(S, C)`` instead cancels terms of size ``u^2 S``, which reach
     1e15 at T = 16 with ``|u| = 3 d``, and loses ``KL(q || q) = 0`` to rounding.)
(B6) Against a dense ``N(mu, L_p L_p^T)`` (O(T^3)): ``tr = ||L_p^-1 B^-1||_F^2``, two triangular solves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal, constraints, register_kl
from torch.distributions.distribution import Distribution
from torch.distributions.utils import lazy_property

from rhovae.distributions.ar1 import (
    AR1Normal,
    _ar1_logdet,
    _ar1_mahalanobis,
    _first_order_only,
    _keep_validate_args,
    _one_minus_rho_sq,
    _raise_first_invalid,
    _reduce_to_shape,
)
from rhovae.distributions.standard_normal import StandardNormal

__all__ = ["BandedNormal", "reverse_affine_scan"]


def reverse_affine_scan(a: Tensor, c: Tensor) -> Tensor:
    """Solve ``x_(T-1) = a_(T-1)``, ``x_i = a_i + c_i x_(i+1)`` along the last axis (this module's (B1)).

    ``a (..., T)``; ``c (..., T - 1)``, broadcastable against ``a[..., :-1]``. A Hillis–Steele scan:
    after the step with shift k, ``x_i`` holds ``sum_(m < 2k) (c_i ... c_(i+m-1)) a_(i+m)``, so
    ``ceil(log2 T)`` vectorised steps replace the T-step loop. Every step is out of place, so autograd
    differentiates it (and differentiates it again). For T = 1 it returns ``a``.
    """
    t = a.shape[-1]
    if t == 1:
        return a
    coef = F.pad(c, (0, 1))  # c_(T-1) = 0: the last frame has no successor
    k = 1
    while True:
        a = a + coef * F.pad(a[..., k:], (0, k))
        if 2 * k >= t:
            return a
        coef = coef * F.pad(coef[..., k:], (0, k))
        k *= 2


# Up to this many frames the recurrence runs as an in-place loop outside autograd, above it as the scan:
# measured on one CPU thread for 64 x 256 trajectories of T = 10, the loop took 0.26 ms and the scan
# 1.7 ms (the scan allocates at each of its steps); at T = 64 (64 x 32 of them) both took 0.7-0.8 ms,
# and on an accelerator the scan's ceil(log2 T) steps launch fewer kernels than the loop's T. A whole
# sample-and-backward step, fused: 2.8 ms at T = 10 and 3.2 ms at T = 64, against 4.1 and 9.1 ms for
# the per-frame loop under autograd and 9.3 and 6.5 ms for the scan under autograd (same sizes, a
# loaded 2-core machine: ratios, not absolute times).
_LOOP_MAX_FRAMES = 16


def _solve_recurrence(a: Tensor, c: Tensor) -> Tensor:
    """:func:`reverse_affine_scan` outside autograd, for the fused sample; may overwrite ``a``."""
    t = a.shape[-1]
    if t > _LOOP_MAX_FRAMES:
        return reverse_affine_scan(a, c)
    for i in range(t - 2, -1, -1):
        a[..., i].addcmul_(c[..., i], a[..., i + 1])
    return a


class _BandedReparameterisation(torch.autograd.Function):
    """``z = loc + B^-1 eps`` (B1) as one autograd node instead of a few per scan step (or per frame).

    Backward: from ``B x = eps``, ``dx = -B^-1 (dB) x``, so with the adjoint ``lam = B^-T g`` (the
    recurrence of (B1) run forwards in time: ``lam_0 = g_0 / d_0``,
    ``lam_i = (g_i - u_(i-1) lam_(i-1)) / d_i``): ``dL/dd_i = -lam_i x_i``, ``dL/du_i = -lam_i x_(i+1)``,
    ``dL/dloc = g``. ``eps`` carries the full shape ``sample_shape + batch_shape + (T,)``.
    """

    @staticmethod
    def forward(ctx, loc: Tensor, diagonal: Tensor, upper: Tensor, eps: Tensor) -> Tensor:  # type: ignore[override]
        x = _solve_recurrence(eps / diagonal, -upper / diagonal[..., :-1])
        ctx.saved = (diagonal, upper, x)
        ctx.shapes = (loc.shape, diagonal.shape, upper.shape)
        return loc + x

    @staticmethod
    def backward(ctx, grad_z: Tensor):  # type: ignore[override]
        return _first_order_only(_banded_reparameterisation_backward, ctx, grad_z)


def _banded_reparameterisation_backward(ctx, grad_z: Tensor):
    diagonal, upper, x = ctx.saved
    loc_shape, diagonal_shape, upper_shape = ctx.shapes
    needs_loc, needs_diagonal, needs_upper = ctx.needs_input_grad[:3]
    grad_loc = _reduce_to_shape(grad_z, loc_shape) if needs_loc else None
    grad_diagonal = grad_upper = None
    if needs_diagonal or needs_upper:
        # B^T is lower-bidiagonal, so B^-T g is the recurrence of (B1) on time-reversed axes (flip copies)
        adjoint = _solve_recurrence((grad_z / diagonal).flip(-1), (-upper / diagonal[..., 1:]).flip(-1))
        adjoint = adjoint.flip(-1)
        if needs_diagonal:
            grad_diagonal = _reduce_to_shape(-(adjoint * x), diagonal_shape)
        if needs_upper:
            grad_upper = _reduce_to_shape(-(adjoint[..., :-1] * x[..., 1:]), upper_shape)
    return grad_loc, grad_diagonal, grad_upper, None


def _bidiagonal_product(diagonal: Tensor, upper: Tensor, w: Tensor) -> Tensor:
    """``B w`` for the upper-bidiagonal ``B``: ``(B w)_i = d_i w_i + u_i w_(i+1)`` (B3); broadcasts."""
    return diagonal * w + F.pad(upper * w[..., 1:], (0, 1))


def _dense_bidiagonal(diagonal: Tensor, upper: Tensor) -> Tensor:
    """``B`` as a dense ``(..., T, T)`` matrix."""
    dense = torch.diag_embed(diagonal)
    if upper.shape[-1] == 0:
        return dense
    return dense + torch.diag_embed(upper, offset=1)


class BandedNormal(Distribution):
    r"""A normal over a trajectory of T frames whose precision is ``B^T B``, ``B`` upper-bidiagonal::

        precision_matrix = B^T B,   B[i, i] = diagonal[i],   B[i, i+1] = upper[i]

    The structured posterior of GP-VAE (Fortuin et al., AISTATS 2020) for one latent channel: a
    tridiagonal precision couples each frame to its neighbours, and every operation stays O(T). Wrap it
    as ``Independent(BandedNormal(...), 1)`` for latents of shape ``(C, T)`` (channels first, time last),
    the layout of :class:`rhovae.distributions.gp.GaussianProcessPrior`.

    Example:
        >>> q = BandedNormal(torch.zeros(4, 10), torch.ones(4, 10), torch.full((4, 9), -0.5))
        >>> z = q.rsample()                      # (4, 10), differentiable in loc, diagonal, upper
        >>> q.log_prob(z).shape
        torch.Size([4])
        >>> kl_divergence(q, StandardNormal(10)).shape   # closed form, O(T)
        torch.Size([4])

    Args:
        loc (Tensor): mean, shape ``batch_shape + (T,)``, T >= 1.
        diagonal (Tensor): the diagonal of ``B``, positive (a head's output through softplus or exp),
            shape ``batch_shape + (T,)``.
        upper (Tensor): the superdiagonal of ``B``, any real, shape ``batch_shape + (T - 1,)`` (an empty
            last axis for T = 1).

    Batch shapes broadcast; a float for ``diagonal`` or ``upper`` stands for that value everywhere.
    ``rsample`` is exact: ``z = loc + B^-1 eps``, the backward recurrence
    ``x_i = (eps_i - u_i x_(i+1)) / d_i``, one autograd node with its analytic adjoint (an in-place loop
    outside autograd up to 16 frames, a parallel scan beyond).
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "diagonal": constraints.independent(constraints.positive, 1),
        "upper": constraints.independent(constraints.real, 1),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        diagonal: Tensor | float,
        upper: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 1:
            raise ValueError("loc must be a tensor of shape (..., T) with at least one dimension")
        t = loc.shape[-1]
        if t < 1:
            raise ValueError("loc must have T >= 1 frames in its last axis")
        if not isinstance(diagonal, Tensor):
            diagonal = torch.full((t,), float(diagonal), dtype=loc.dtype, device=loc.device)
        if not isinstance(upper, Tensor):
            upper = torch.full((t - 1,), float(upper), dtype=loc.dtype, device=loc.device)
        if diagonal.dim() < 1 or diagonal.shape[-1] != t:
            raise ValueError(
                f"diagonal must have shape (..., {t}), one entry per frame; got {tuple(diagonal.shape)}"
            )
        if upper.dim() < 1 or upper.shape[-1] != t - 1:
            raise ValueError(
                f"upper must have shape (..., {t - 1}), one entry per pair of neighbouring frames (T - 1); "
                f"got {tuple(upper.shape)}"
            )
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], diagonal.shape[:-1], upper.shape[:-1])
        except RuntimeError as e:
            raise ValueError(
                f"incompatible batch shapes: loc {tuple(loc.shape)}, diagonal {tuple(diagonal.shape)}, "
                f"upper {tuple(upper.shape)}"
            ) from e
        self.loc = loc.expand(batch_shape + (t,))
        self.diagonal = diagonal.expand(batch_shape + (t,))
        self.upper = upper.expand(batch_shape + (t - 1,))
        super().__init__(batch_shape, torch.Size((t,)), validate_args=False)
        _keep_validate_args(self, validate_args)
        if self._validate_args:
            self._check_arguments()

    def _check_arguments(self) -> None:
        """One line naming the first bad argument and its fix (torch's own message prints the tensor).

        The common case, all valid, is two reductions and two host reads (NaN fails every comparison,
        so a NaN anywhere falls through to the itemised checks)."""
        if self.loc.numel() == 0:
            return
        with torch.no_grad():
            total = torch.cat([self.loc.reshape(-1), self.upper.reshape(-1)]).sum()
            if bool(self.diagonal.amin() > 0) and not math.isnan(float(total)):
                return
        checks = (
            ("loc", ~self.loc.isnan(), "no NaN"),
            ("diagonal", self.diagonal > 0, "positive values: exponentiate (softplus) a head's output"),
            ("upper", ~self.upper.isnan(), "no NaN"),
        )
        _raise_first_invalid("BandedNormal", checks)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BandedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        t = self.num_frames
        new.loc = self.loc.expand(batch_shape + (t,))
        new.diagonal = self.diagonal.expand(batch_shape + (t,))
        new.upper = self.upper.expand(batch_shape + (t - 1,))
        super(BandedNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def num_frames(self) -> int:
        """The number of frames T."""
        return self._event_shape[0]

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @lazy_property
    def variance(self) -> Tensor:  # type: ignore[override]
        """``Sigma_(i,i)``, ``batch_shape + (T,)``, O(T) by the recurrence (B4)."""
        ratio = self.upper / self.diagonal[..., :-1]
        return reverse_affine_scan(self.diagonal.pow(-2), ratio.pow(2))

    @property
    def stddev(self) -> Tensor:
        return self.variance.sqrt()

    @lazy_property
    def covariance_band(self) -> tuple[Tensor, Tensor]:
        """``(S, C)``: the diagonal ``Sigma_(i,i)`` ``batch_shape + (T,)`` and the first superdiagonal
        ``Sigma_(i,i+1) = -(u_i / d_i) S_(i+1)`` ``batch_shape + (T - 1,)`` of the covariance, O(T) (B4)."""
        variance = self.variance
        return variance, -(self.upper / self.diagonal[..., :-1]) * variance[..., 1:]

    @lazy_property
    def log_det_covariance(self) -> Tensor:
        """``log det Sigma = -2 sum_i log d_i``, shape ``batch_shape`` (B2)."""
        return -2 * self.diagonal.log().sum(-1)

    # Dense views: for references, debugging and the KL to a dense Gaussian; O(T^2) memory per element.
    @lazy_property
    def precision_factor(self) -> Tensor:
        """``B``, the upper-bidiagonal factor of the precision, ``batch_shape + (T, T)``."""
        return _dense_bidiagonal(self.diagonal, self.upper)

    @lazy_property
    def precision_factor_inverse(self) -> Tensor:
        """``B^-1`` (upper triangular), ``batch_shape + (T, T)``: ``Sigma = B^-1 B^-T``."""
        factor = self.precision_factor
        eye = torch.eye(self.num_frames, dtype=factor.dtype, device=factor.device)
        return torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=True)

    @lazy_property
    def precision_matrix(self) -> Tensor:
        factor = self.precision_factor
        return factor.mT @ factor

    @lazy_property
    def covariance_matrix(self) -> Tensor:
        inverse = self.precision_factor_inverse
        return inverse @ inverse.mT

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        loc = self.loc
        eps = torch.randn(self._extended_shape(sample_shape), dtype=loc.dtype, device=loc.device)
        return _BandedReparameterisation.apply(loc, self.diagonal, self.upper, eps)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        innovations = _bidiagonal_product(self.diagonal, self.upper, value - self.loc)
        mahalanobis = innovations.pow(2).sum(-1)
        return self.diagonal.log().sum(-1) - 0.5 * (self.num_frames * math.log(2 * math.pi) + mahalanobis)

    def entropy(self) -> Tensor:
        return 0.5 * self.num_frames * (1.0 + math.log(2 * math.pi)) - self.diagonal.log().sum(-1)


# --- closed-form KL divergences: kl_divergence(BandedNormal, p) ----------------------------------------


def _check_events(q: BandedNormal, p: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")


def _kl_from_terms(q: BandedNormal, trace: Tensor, mahalanobis: Tensor, log_det_p: Tensor) -> Tensor:
    """(B5) with ``log det Sigma_q = -2 sum log d_q`` (B2):
    ``1/2 [tr + m^T Sigma_p^-1 m - T + log det Sigma_p] + sum log d_q``."""
    return 0.5 * (trace + mahalanobis - q.num_frames + log_det_p) + q.diagonal.log().sum(-1)


@register_kl(BandedNormal, StandardNormal)
def _kl_banded_standard(q: BandedNormal, p: StandardNormal) -> Tensor:
    """``1/2 [sum_i S_i + |mu|^2 - T] + sum_i log d_i``, O(T) (B4-B5)."""
    _check_events(q, p)
    return _kl_from_terms(q, q.variance.sum(-1), q.loc.pow(2).sum(-1), q.loc.new_zeros(()))


@register_kl(BandedNormal, Independent)
def _kl_banded_independent(q: BandedNormal, p: Independent) -> Tensor:
    """KL to ``N(m, diag tau^2)``: only the diagonal of ``Sigma_q`` meets the diagonal precision, O(T)
    (B5)."""
    base = p.base_dist
    if not isinstance(base, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError("closed-form KL(BandedNormal || Independent) needs Independent(Normal, 1)")
    _check_events(q, p)
    std = base.scale
    trace = (q.variance / std.pow(2)).sum(-1)
    mahalanobis = ((q.loc - base.loc) / std).pow(2).sum(-1)
    return _kl_from_terms(q, trace, mahalanobis, 2 * std.log().sum(-1))


@register_kl(BandedNormal, BandedNormal)
def _kl_banded_banded(q: BandedNormal, p: BandedNormal) -> Tensor:
    """KL between two banded Gaussians in O(T): ``tr(B_p^T B_p Sigma_q) = sum_i E[(B_p x)_i^2]`` as a sum
    of positive terms (B5); the Mahalanobis term is ``||B_p (mu_q - mu_p)||^2`` (B3)."""
    _check_events(q, p)
    d_q, u_q, d_p, u_p = q.diagonal, q.upper, p.diagonal, p.upper
    trace = (d_p / d_q).pow(2).sum(-1)
    coupling = (d_q[..., :-1] * u_p - d_p[..., :-1] * u_q) / d_q[..., :-1]
    trace = trace + (coupling.pow(2) * q.variance[..., 1:]).sum(-1)
    mahalanobis = _bidiagonal_product(d_p, u_p, q.loc - p.loc).pow(2).sum(-1)
    return _kl_from_terms(q, trace, mahalanobis, p.log_det_covariance)


@register_kl(BandedNormal, AR1Normal)
def _kl_banded_ar1(q: BandedNormal, p: AR1Normal) -> Tensor:
    """KL to an AR(1) Gaussian ``N(m, D T(rho) D)`` in O(T): the trace is the expected squared AR(1)
    innovations of ``x / sigma`` (docs/math.md eq. 6), a sum of positive terms over the variances of q
    (B5); ``log det`` and the Mahalanobis term are the AR(1) family's own (docs/math.md eq. 5-6)."""
    _check_events(q, p)
    t = q.num_frames
    variance = q.variance
    sigma = p.scale.expand(p.scale.shape[:-1] + (t,))
    trace = variance[..., 0] / sigma[..., 0].pow(2)
    if t > 1:
        rho, d, u = p.rho, q.diagonal[..., :-1], q.upper
        coupling = sigma[..., 1:].reciprocal() + rho * u / (d * sigma[..., :-1])
        innovations = coupling.pow(2) * variance[..., 1:] + (rho / (d * sigma[..., :-1])).pow(2)
        trace = trace + innovations.sum(-1) / _one_minus_rho_sq(rho)[..., 0]
    mahalanobis = _ar1_mahalanobis((q.loc - p.loc) / p.scale, p.rho)
    return _kl_from_terms(q, trace, mahalanobis, _ar1_logdet(p.rho, p.scale, t))


@register_kl(BandedNormal, MultivariateNormal)
def _kl_banded_mvn(q: BandedNormal, p: MultivariateNormal) -> Tensor:
    """KL to a dense Gaussian, O(T^3) through p's Cholesky factor (B6):
    ``tr = ||L_p^-1 B^-1||_F^2``, Mahalanobis ``||L_p^-1 (mu_q - mu_p)||^2``."""
    _check_events(q, p)
    l_p = p._unbroadcasted_scale_tril
    trace = torch.linalg.solve_triangular(l_p, q.precision_factor_inverse, upper=False).pow(2).sum((-2, -1))
    diff = (q.loc - p.loc).unsqueeze(-1)
    mahalanobis = torch.linalg.solve_triangular(l_p, diff, upper=False).pow(2).sum((-2, -1))
    log_det_p = 2 * l_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return _kl_from_terms(q, trace, mahalanobis, log_det_p)
