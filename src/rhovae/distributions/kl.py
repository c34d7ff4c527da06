"""Closed-form KL divergences involving :class:`AR1Normal`, registered with ``register_kl``.

Callers write ``kl_divergence(q, p)`` and never branch on types. All results are per batch element
(shape = the broadcast batch shape), in nats. Equation numbers refer to docs/math.md.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl

from rhovae.distributions.ar1 import (
    AR1Normal,
    _ar1_logdet,
    _ar1_mahalanobis,
    _ar1_precision_trace,
    _one_minus_rho_sq,
)
from rhovae.distributions.standard_normal import StandardNormal

__all__ = ["kl_ar1_standard_normal"]


class _KLAR1StandardNormal(torch.autograd.Function):
    """``1/2 [|mu|^2 + sum_i (sigma_i^2 - 1 - log sigma_i^2) - (d-1) log(1-rho^2)]`` (docs/math.md eq. 7).

    Fused with its analytic gradient (``d/dmu = mu``, ``d/dsigma = sigma - 1/sigma``,
    ``d/drho = (d-1) rho / (1-rho^2)``): the most frequent term of every ρ-VAE loss costs one
    autograd node instead of twenty.
    """

    @staticmethod
    def forward(ctx, loc: Tensor, rho: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        d = loc.shape[-1]
        repeat = d if scale.shape[-1] == 1 else 1  # a shared scale stands for d equal ones
        var = scale.square()
        scale_terms = (var - 1 - var.log()).sum(-1) * repeat
        one_minus_rho_sq = _one_minus_rho_sq(rho)
        ctx.save_for_backward(loc, rho, scale, one_minus_rho_sq)
        ctx.repeat = repeat
        return 0.5 * (loc.square().sum(-1) + scale_terms - (d - 1) * one_minus_rho_sq.log()[..., 0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        loc, rho, scale, one_minus_rho_sq = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        d = loc.shape[-1]
        grad_loc = g * loc if ctx.needs_input_grad[0] else None
        grad_rho = g * ((d - 1) * rho / one_minus_rho_sq) if ctx.needs_input_grad[1] else None
        grad_scale = g * (ctx.repeat * (scale - scale.reciprocal())) if ctx.needs_input_grad[2] else None
        return grad_loc, grad_rho, grad_scale


def kl_ar1_standard_normal(q: AR1Normal) -> Tensor:
    """``KL(q || N(0, I)) = 1/2 [|mu|^2 + sum sigma_i^2 - d - log det C]`` per sample (docs/math.md eq. 7)."""
    return _KLAR1StandardNormal.apply(q.loc, q.rho, q.scale)


@register_kl(AR1Normal, StandardNormal)
def _kl_ar1_standard(q: AR1Normal, p: StandardNormal) -> Tensor:
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    return kl_ar1_standard_normal(q)


def _kl_ar1_diagonal(q: AR1Normal, loc: Tensor, std: Tensor) -> Tensor:
    """KL to ``N(loc, diag(std^2))``: only the diagonal of C meets a diagonal precision, O(d) (eq. 8)."""
    d = q.latent_dim
    trace = (q.variance / std.pow(2)).sum(-1)
    mahalanobis = ((q.loc - loc) / std).pow(2).sum(-1)
    log_det_p = 2 * std.log().sum(-1)
    return 0.5 * (trace + mahalanobis - d + log_det_p - q.log_det_covariance)


@register_kl(AR1Normal, Independent)
def _kl_ar1_independent(q: AR1Normal, p: Independent) -> Tensor:
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError("closed-form KL(AR1Normal || Independent) needs Independent(Normal, 1)")
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    return _kl_ar1_diagonal(q, p.base_dist.loc, p.base_dist.scale)


def _is_fixed_standard_normal(p: MultivariateNormal) -> bool:
    """True for a constant N(0, I); a learnable prior must keep its gradients, so it never qualifies."""
    tril = p._unbroadcasted_scale_tril
    if p.loc.requires_grad or tril.requires_grad:
        return False
    eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
    return bool(torch.count_nonzero(p.loc) == 0) and torch.equal(tril, eye.expand_as(tril))


@register_kl(AR1Normal, MultivariateNormal)
def _kl_ar1_mvn(q: AR1Normal, p: MultivariateNormal) -> Tensor:
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    if _is_fixed_standard_normal(p):
        return kl_ar1_standard_normal(q).expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))
    # A general prior: dense, O(d^3), through p's Cholesky factor.
    # tr(C_p^-1 C_q) = ||L_p^-1 L_q||_F^2, Mahalanobis = ||L_p^-1 (mu_q - mu_p)||^2.
    d = q.latent_dim
    batch = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    l_p = p._unbroadcasted_scale_tril.expand(batch + (d, d))
    l_q = q.scale_tril.expand(batch + (d, d))
    trace = torch.linalg.solve_triangular(l_p, l_q, upper=False).pow(2).sum((-2, -1))
    diff = (q.loc - p.loc).expand(batch + (d,)).unsqueeze(-1)
    mahalanobis = torch.linalg.solve_triangular(l_p, diff, upper=False).pow(2).sum((-2, -1))
    log_det_p = 2 * l_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - d + log_det_p - q.log_det_covariance)


@register_kl(AR1Normal, AR1Normal)
def _kl_ar1_ar1(q: AR1Normal, p: AR1Normal) -> Tensor:
    """KL between two AR(1) Gaussians in O(d) (docs/math.md §2, eq. 9-10)."""
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    d = q.latent_dim
    trace = _ar1_precision_trace(p.rho, q.rho, q.scale / p.scale, d)
    mahalanobis = _ar1_mahalanobis((q.loc - p.loc) / p.scale, p.rho)
    log_det_p = _ar1_logdet(p.rho, p.scale, d)
    return 0.5 * (trace + mahalanobis - d + log_det_p - q.log_det_covariance)


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_independent(q: MultivariateNormal, p: Independent) -> Tensor:
    """KL from a full-covariance Gaussian to a diagonal one, O(d^2) (torch registers no such pair).

    Only the diagonal of ``C_q = L L^T`` (row sums of ``L^2``) meets the diagonal precision.
    """
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError(
            "closed-form KL(MultivariateNormal || Independent) needs Independent(Normal, 1)"
        )
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    std = p.base_dist.scale
    tril = q._unbroadcasted_scale_tril
    variance_q = tril.pow(2).sum(-1)
    trace = (variance_q / std.pow(2)).sum(-1)
    mahalanobis = ((q.loc - p.base_dist.loc) / std).pow(2).sum(-1)
    log_det_q = 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_det_p = 2 * std.log().sum(-1)
    return 0.5 * (trace + mahalanobis - q.event_shape[0] + log_det_p - log_det_q)
