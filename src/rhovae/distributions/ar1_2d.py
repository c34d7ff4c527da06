"""The separable 2-D AR(1) Gaussian over latent maps ``(C, H, W)``: per channel, an AR(1) correlation
along the rows times one along the columns.

For channel c the covariance over the ``H * W`` positions (raster order, ``i * W + j``) is::

    Cov_c = D_c^(1/2) (T(rho_rows_c) kron T(rho_cols_c)) D_c^(1/2),   T(rho)[j, k] = rho ** |j - k|

with ``D_c`` the variances: one per channel (``ar1-2d``, ``Cov_c = s_c T kron T``) or one per position
(``ar1-2d-diag``). Channels are independent. Every fast operation is O(C H W) per sample (the sample
is two products with small matrices of powers, O(C H W (H + W)), or two parallel scans for sides
beyond 32); the dense views exist for references. Equation numbers refer to docs/math.md §15.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.distribution import Distribution
from torch.distributions.utils import lazy_property

from rhovae.distributions.ar1 import (
    _first_order_only,
    _keep_validate_args,
    _raise_first_invalid,
    _reduce_to_shape,
    _scan_first_order,
    open_unit_interval,
)
from rhovae.distributions.ar1 import (
    _one_minus_rho_sq as _one_minus_sq,
)

__all__ = ["SeparableAR1Normal", "ar1_cholesky"]


def ar1_cholesky(rho: Tensor, n: int) -> Tensor:
    """The lower Cholesky factor ``L`` of ``T(rho)`` (n x n), ``(..., n, n)`` for ``rho (...)``.

    ``L[j, 0] = rho^j`` and ``L[j, k] = rho^(j-k) sqrt(1 - rho^2)`` for ``1 <= k <= j``: the AR(1)
    recurrence ``w_0 = e_0, w_j = rho w_(j-1) + sqrt(1 - rho^2) e_j`` written as ``w = L e``
    (docs/math.md eq. 13). Powers are taken for lags >= 1 only and the diagonal set apart, so the
    gradient stays finite at ``rho = 0`` (``rho ** 0`` through ``pow`` would give 0 * inf there); all
    elementwise, whose backward is cheap (a gather of powers would scatter in backward).
    """
    index = torch.arange(n, device=rho.device)
    lag = index.unsqueeze(-1) - index  # j - k
    powers = rho[..., None, None].pow(lag.clamp(min=1).to(rho.dtype))
    lower = torch.where(lag > 0, powers, (lag == 0).to(rho.dtype))
    column_scale = torch.where(
        index > 0, _one_minus_sq(rho).sqrt().unsqueeze(-1), torch.ones_like(rho).unsqueeze(-1)
    )
    return lower * column_scale.unsqueeze(-2)


#: up to this length the filter is one matrix product with the matrix of powers (a batched matmul of
#: small matrices beats the scan's log2(n) steps on a CPU: bench_spatial.py), beyond it the scan
_DENSE_FILTER_MAX_LENGTH = 32


def _powers_matrix(rho: Tensor, n: int) -> Tensor | None:
    """``F[..., j, k] = rho^(j - k)`` for ``j >= k``, else 0: the AR(1) filter without its innovation
    scale, ``(..., n, n)`` for ``rho (..., 1, 1)``; None past :data:`_DENSE_FILTER_MAX_LENGTH` (scan).
    Powers by a cumulative product and a gather (no autograd: the Function supplies the adjoint)."""
    if n == 1 or n > _DENSE_FILTER_MAX_LENGTH:
        return None
    r = rho[..., 0, 0]
    steps = r.unsqueeze(-1).expand(*r.shape, n - 1)
    powers = torch.cumprod(torch.cat([torch.ones_like(r).unsqueeze(-1), steps], -1), -1)
    index = torch.arange(n, device=rho.device)
    lag = index.unsqueeze(-1) - index
    return powers[..., lag.clamp(min=0)] * (lag >= 0)


def _filter_forward(x: Tensor, rho: Tensor, innovation: Tensor, powers: Tensor | None) -> Tensor:
    """``L(rho) x`` along the last axis (no autograd): ``w_0 = x_0, w_j = rho w_(j-1) + s x_j`` with
    ``s = sqrt(1 - rho^2)``: ``F (s x)`` with the matrix of powers ``powers`` (:func:`_powers_matrix`),
    or the parallel scan of :mod:`rhovae.distributions.ar1` (docs/math.md §4) when it is None."""
    if x.shape[-1] == 1:
        return x
    if powers is None:
        return _scan_first_order(x, rho, x_scale=innovation, unscaled_first=True)
    scaled = x * innovation
    scaled[..., 0] = x[..., 0]
    return scaled @ powers.transpose(-1, -2)


def _filter_backward(
    grad: Tensor, x: Tensor, w: Tensor, rho: Tensor, innovation: Tensor, powers: Tensor | None
):
    """The adjoint of :func:`_filter_forward` at its output ``w``: the gradients to its input ``x``
    and to ``rho`` (summed over everything ``rho`` was broadcast against, to ``rho``'s shape).

    With the adjoint ``a = F^T g``, ``a_j = sum_(m >= j) rho^(m-j) g_m`` (a product with the powers, or a
    reverse scan), ``dL/dx_j = s a_j`` (``a_0`` for j = 0) and
    ``dL/drho = sum_(j >= 1) a_j (w_(j-1) - rho / s x_j)``: the formula of the 1-D AR(1) sample's
    backward (docs/math.md §4).
    """
    if x.shape[-1] == 1:
        return grad, torch.zeros_like(rho)
    adjoint = _scan_first_order(grad, rho, reverse=True) if powers is None else grad @ powers
    grad_x = adjoint * innovation
    grad_x[..., 0] = adjoint[..., 0]
    terms = torch.addcmul(w[..., :-1], x[..., 1:], rho / innovation, value=-1)
    grad_rho = _reduce_to_shape((adjoint[..., 1:] * terms).sum(-1, keepdim=True), rho.shape)
    return grad_x, grad_rho


class _SeparableFilter(torch.autograd.Function):
    """``L_rows eps L_cols^T`` per channel: the AR(1) recurrence along each row (``rho_cols``), then
    along each column (``rho_rows``), as one autograd node with the analytic adjoint: a dozen
    elementwise nodes per scan step cost several times the diagonal sample. Each filter is a product
    with the matrix of powers up to length 32, a parallel scan beyond.
    ``rho_rows`` and ``rho_cols`` are ``(..., C, 1, 1)``, ``eps`` is ``(..., C, H, W)``."""

    @staticmethod
    def forward(ctx, eps: Tensor, rho_rows: Tensor, rho_cols: Tensor) -> Tensor:  # type: ignore[override]
        s_cols = _one_minus_sq(rho_cols).sqrt()
        s_rows = _one_minus_sq(rho_rows).sqrt()
        f_cols, f_rows = _powers_matrix(rho_cols, eps.shape[-1]), _powers_matrix(rho_rows, eps.shape[-2])
        if f_cols is not None and f_rows is not None:  # small maps: two products, no transposes
            along_rows = _scaled_first_kept(eps, s_cols, -1) @ f_cols.transpose(-1, -2)
            out = f_rows @ _scaled_first_kept(along_rows, s_rows, -2)
            ctx.saved = (True, eps, rho_rows, rho_cols, along_rows, out, s_rows, s_cols, f_rows, f_cols)
            return out
        along_rows = _filter_forward(eps, rho_cols, s_cols, f_cols)  # (..., H, W): each row filtered
        out = _filter_forward(along_rows.transpose(-1, -2), rho_rows, s_rows, f_rows)  # (..., W, H)
        ctx.saved = (False, eps, rho_rows, rho_cols, along_rows, out, s_rows, s_cols, f_rows, f_cols)
        return out.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _first_order_only(_separable_filter_backward, ctx, grad)


def _scaled_first_kept(x: Tensor, innovation: Tensor, dim: int) -> Tensor:
    """``x`` times the innovation scale along ``dim`` (-1 or -2), its first entry there unscaled."""
    scaled = x * innovation
    if dim == -1:
        scaled[..., 0] = x[..., 0]
    else:
        scaled[..., 0, :] = x[..., 0, :]
    return scaled


def _separable_filter_backward(ctx, grad: Tensor):
    dense, eps, rho_rows, rho_cols, along_rows, out, s_rows, s_cols, f_rows, f_cols = ctx.saved
    if dense:  # the adjoints of the two products (docs/math.md §4, §15), rows first
        adjoint = f_rows.transpose(-1, -2) @ grad  # (..., H, W)
        grad_mid = _scaled_first_kept(adjoint, s_rows, -2)
        terms = torch.addcmul(out[..., :-1, :], along_rows[..., 1:, :], rho_rows / s_rows, value=-1)
        grad_rho_rows = _reduce_to_shape(
            (adjoint[..., 1:, :] * terms).sum((-2, -1), keepdim=True), rho_rows.shape
        )
        adjoint = grad_mid @ f_cols
        grad_eps = _scaled_first_kept(adjoint, s_cols, -1)
        terms = torch.addcmul(along_rows[..., :-1], eps[..., 1:], rho_cols / s_cols, value=-1)
        grad_rho_cols = _reduce_to_shape(
            (adjoint[..., 1:] * terms).sum((-2, -1), keepdim=True), rho_cols.shape
        )
    else:
        grad_mid, grad_rho_rows = _filter_backward(
            grad.transpose(-1, -2), along_rows.transpose(-1, -2), out, rho_rows, s_rows, f_rows
        )
        grad_eps, grad_rho_cols = _filter_backward(
            grad_mid.transpose(-1, -2), eps, along_rows, rho_cols, s_cols, f_cols
        )
    needs_eps, needs_rows, needs_cols = ctx.needs_input_grad
    return (
        (grad_eps if needs_eps else None),
        (grad_rho_rows if needs_rows else None),
        (grad_rho_cols if needs_cols else None),
    )


def _whiten_last(x: Tensor, rho: Tensor) -> Tensor:
    """``L(rho)^-1 x`` along the last axis: ``e_0 = x_0``, ``e_j = (x_j - rho x_(j-1)) / sqrt(1-rho^2)``.

    ``rho`` broadcasts against ``x[..., :1]``. The squared sum of the result is ``x^T T(rho)^-1 x``.
    """
    if x.shape[-1] == 1:
        return x
    rest = (x[..., 1:] - rho * x[..., :-1]) / _one_minus_sq(rho).sqrt()
    return torch.cat([x[..., :1], rest], -1)


def separable_mahalanobis(w: Tensor, rho_rows: Tensor, rho_cols: Tensor) -> Tensor:
    """``vec(w)^T (T(rho_rows) kron T(rho_cols))^-1 vec(w)`` per channel, summed over channels.

    ``w (..., C, H, W)``, ``rho_* (..., C)``; the inverse of a Kronecker product is the product of the
    inverses, so whitening along the columns and then along the rows gives independent standard
    innovations (docs/math.md eq. 14). Returns ``(...)``.
    """
    e = _whiten_last(w, rho_cols[..., None, None])
    e = _whiten_last(e.transpose(-1, -2), rho_rows[..., None, None])
    return e.pow(2).sum((-3, -2, -1))


def separable_logdet(
    rho_rows: Tensor, rho_cols: Tensor, log_var: Tensor, shape: torch.Size, per_position: bool
) -> Tensor:
    """``sum_c log det Cov_c = sum_c [W (H-1) log(1-rho_r^2) + H (W-1) log(1-rho_c^2)] + sum log D``.

    ``log_var (..., C)`` (one variance per channel, counted H W times) or ``(..., C, H, W)``.
    (docs/math.md eq. 15; ``log |T_n(rho)| = (n - 1) log(1 - rho^2)``.) Returns ``(...)``.
    """
    _, h, w = shape
    rows = w * (h - 1) * _one_minus_sq(rho_rows).log() if h > 1 else torch.zeros_like(rho_rows)
    cols = h * (w - 1) * _one_minus_sq(rho_cols).log() if w > 1 else torch.zeros_like(rho_cols)
    if per_position:
        variances = log_var.sum((-3, -2, -1))
    else:
        variances = h * w * log_var.sum(-1)
    return (rows + cols).sum(-1) + variances


def _band(rho_p: Tensor, rho_q: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For ``T(rho_p)^-1`` against ``T(rho_q)``: the diagonal ``a_0 (..., n)`` of the precision and the
    product ``a_1 = P[i, i+1] * T_q[i+1, i] = -rho_p rho_q / (1 - rho_p^2)`` of the off-diagonal band,
    ``(..., 1)`` (docs/math.md eq. 16).
    The precision's diagonal is ``(1, 1+rho^2, ..., 1+rho^2, 1)/(1-rho^2)``.
    """
    denom = _one_minus_sq(rho_p).unsqueeze(-1)
    if n == 1:
        return torch.ones_like(denom), torch.zeros_like(denom)
    ends = torch.ones_like(denom)
    inner = (1 + rho_p.pow(2)).unsqueeze(-1).expand(*rho_p.shape, n - 2)
    diagonal = torch.cat([ends, inner, ends], -1) / denom
    return diagonal, -(rho_p * rho_q).unsqueeze(-1) / denom


def separable_precision_trace(
    rho_rows_p: Tensor, rho_cols_p: Tensor, rho_rows_q: Tensor, rho_cols_q: Tensor, std: Tensor
) -> Tensor:
    """``sum_c tr((T_p,r kron T_p,c)^-1 D^(1/2) (T_q,r kron T_q,c) D^(1/2))`` in O(C H W).

    ``std (..., C, H, W)`` are the square roots of the q's variances divided by the prior's. The
    precision of a Kronecker product of AR(1) matrices is tridiagonal in each axis, so only the nine
    neighbour offsets of each position meet q's covariance (docs/math.md eq. 16). Returns ``(...)``.
    """
    h, w = std.shape[-2:]
    a0, a1 = _band(rho_rows_p, rho_rows_q, h)  # (..., C, H), (..., C, 1)
    b0, b1 = _band(rho_cols_p, rho_cols_q, w)  # (..., C, W), (..., C, 1)
    a0, a1 = a0.unsqueeze(-1), a1.unsqueeze(-1)  # against (..., C, H, W)
    b0, b1 = b0.unsqueeze(-2), b1.unsqueeze(-2)
    total = (a0 * b0 * std.pow(2)).sum((-2, -1))
    if h > 1:  # (i, j) with (i + 1, j), counted twice (the matrix is symmetric)
        total = total + 2 * (a1 * b0 * std[..., :-1, :] * std[..., 1:, :]).sum((-2, -1))
    if w > 1:
        total = total + 2 * (a0 * b1 * std[..., :, :-1] * std[..., :, 1:]).sum((-2, -1))
    if h > 1 and w > 1:  # the two diagonals (i, j)-(i+1, j+1) and (i, j+1)-(i+1, j)
        diagonals = std[..., :-1, :-1] * std[..., 1:, 1:] + std[..., :-1, 1:] * std[..., 1:, :-1]
        total = total + 2 * (a1 * b1).squeeze(-1).squeeze(-1) * diagonals.sum((-2, -1))
    return total.sum(-1)


class SeparableAR1Normal(Distribution):
    r"""A Gaussian over latent maps ``(C, H, W)``: per channel, a separable 2-D AR(1) covariance.

    ``Cov_c = D_c^(1/2) (T(rho_rows_c) kron T(rho_cols_c)) D_c^(1/2)``; channels are independent. With one
    ``scale`` per channel this is ``s_c T kron T`` (``ar1-2d``: three scalars per channel); with one per
    position it contains the diagonal Gaussian over the map at ``rho = 0`` (``ar1-2d-diag``).

    Example:
        >>> q = SeparableAR1Normal(torch.zeros(4, 8, 7, 7), torch.full((4, 8), 0.5),
        ...                        torch.full((4, 8), -0.2), torch.ones(4, 8))
        >>> z = q.rsample()                       # (4, 8, 7, 7), differentiable in every argument
        >>> q.log_prob(z).shape, q.event_shape
        (torch.Size([4]), torch.Size([8, 7, 7]))
        >>> kl_divergence(q, StandardNormal((8, 7, 7))).shape   # closed form, O(C H W)
        torch.Size([4])

    Args:
        loc (Tensor): mean, ``batch_shape + (C, H, W)``.
        rho_rows (Tensor): correlation of vertically adjacent positions, in (-1, 1), ``batch_shape + (C,)``.
        rho_cols (Tensor): correlation of horizontally adjacent positions, ``batch_shape + (C,)``.
        scale (Tensor): standard deviation, positive: ``batch_shape + (C,)`` (one per channel) or
            ``batch_shape + (C, H, W)`` (one per position). A scale whose last three sizes equal the
            event shape ``(C, H, W)`` is read as one per position: where a batched per-channel scale
            could have that shape too (its batch ending in ``(C, H)`` with ``W = C``), give it as
            ``scale[..., None, None].expand(loc.shape)``.

    Batch shapes broadcast. ``rsample`` is exact: ``z = loc + scale * (L_rows e L_cols^T)`` with the
    Cholesky factors of :func:`ar1_cholesky`, applied as the two 1-D AR(1) recurrences (along each row,
    then along each column) by a parallel scan.
    """

    arg_constraints = {
        "loc": constraints.independent(constraints.real, 3),
        "rho_rows": constraints.independent(open_unit_interval, 1),
        "rho_cols": constraints.independent(open_unit_interval, 1),
        "scale": constraints.positive,
    }
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        rho_rows: Tensor | float,
        rho_cols: Tensor | float,
        scale: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 3:
            raise ValueError("loc must be a tensor of shape (..., C, H, W) with at least three dimensions")
        event_shape = loc.shape[-3:]
        c = event_shape[0]
        if min(event_shape) < 1:
            raise ValueError(f"loc's event shape (C, H, W) must be non-empty, got {tuple(event_shape)}")
        rho_rows, rho_cols, scale = (
            t if isinstance(t, Tensor) else torch.full((c,), float(t), dtype=loc.dtype, device=loc.device)
            for t in (rho_rows, rho_cols, scale)
        )
        for name, rho in (("rho_rows", rho_rows), ("rho_cols", rho_cols)):
            if rho.dim() < 1 or rho.shape[-1] != c:
                raise ValueError(
                    f"{name} must have shape (..., {c}), one correlation per channel; got {tuple(rho.shape)}"
                )
        per_position = scale.dim() >= 3 and scale.shape[-3:] == event_shape
        if not per_position and (scale.dim() < 1 or scale.shape[-1] != c):
            raise ValueError(
                f"scale must have shape (..., {c}) or (..., {c}, {event_shape[1]}, {event_shape[2]}); "
                f"got {tuple(scale.shape)}"
            )
        scale_batch = scale.shape[:-3] if per_position else scale.shape[:-1]
        try:
            batch_shape = torch.broadcast_shapes(
                loc.shape[:-3], rho_rows.shape[:-1], rho_cols.shape[:-1], scale_batch
            )
        except RuntimeError as e:
            raise ValueError(
                f"incompatible batch shapes: loc {tuple(loc.shape)}, rho_rows {tuple(rho_rows.shape)}, "
                f"rho_cols {tuple(rho_cols.shape)}, scale {tuple(scale.shape)}"
            ) from e
        self.loc = loc.expand(batch_shape + event_shape)
        self.rho_rows = rho_rows.expand(batch_shape + (c,))
        self.rho_cols = rho_cols.expand(batch_shape + (c,))
        self.scale = scale.expand(batch_shape + (event_shape if per_position else (c,)))
        # decided once: an expanded per-channel scale can have the map's shape by coincidence
        self._per_position = per_position
        super().__init__(batch_shape, event_shape, validate_args=False)
        _keep_validate_args(self, validate_args)
        if self._validate_args:
            self._check_arguments()

    def _check_arguments(self) -> None:
        """One line naming the first bad argument and its fix (torch's own message prints the tensor).

        The common case, all valid, is one fused test and two host reads (NaN fails every comparison,
        so a NaN anywhere falls through to the itemised checks)."""
        if self.loc.numel() == 0:
            return
        with torch.no_grad():
            lowest = torch.stack(
                [_one_minus_sq(self.rho_rows).amin(), _one_minus_sq(self.rho_cols).amin(), self.scale.amin()]
            ).amin()
            if float(lowest) > 0 and not math.isnan(float(self.loc.sum())):
                return
        checks = (
            ("loc", ~self.loc.isnan(), "no NaN"),
            (
                "rho_rows",
                _one_minus_sq(self.rho_rows) > 0,
                "values in (-1, 1): squash a head's output with tanh",
            ),
            (
                "rho_cols",
                _one_minus_sq(self.rho_cols) > 0,
                "values in (-1, 1): squash a head's output with tanh",
            ),
            ("scale", self.scale > 0, "positive values: exponentiate a head's log-variance"),
        )
        _raise_first_invalid("SeparableAR1Normal", checks)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SeparableAR1Normal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.rho_rows = self.rho_rows.expand(batch_shape + self.rho_rows.shape[-1:])
        new.rho_cols = self.rho_cols.expand(batch_shape + self.rho_cols.shape[-1:])
        tail = self.event_shape if self.per_position_scale else self.scale.shape[-1:]
        new.scale = self.scale.expand(batch_shape + tail)
        new._per_position = self._per_position
        super(SeparableAR1Normal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def per_position_scale(self) -> bool:
        """True when each position has its own scale (``ar1-2d-diag``)."""
        return self._per_position

    @property
    def latent_dim(self) -> int:
        """The number of latent units ``C * H * W``."""
        return math.prod(self.event_shape)

    def _scale_map(self) -> Tensor:
        """The standard deviations broadcastable against ``(..., C, H, W)``."""
        return self.scale if self.per_position_scale else self.scale[..., None, None]

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:  # type: ignore[override]
        return self._scale_map().pow(2).expand(self.loc.shape)

    @property
    def stddev(self) -> Tensor:
        return self._scale_map().expand(self.loc.shape)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        _, h, w = self.event_shape
        # w = L_rows eps L_cols^T: along the columns of each row, then along the rows (eq. 13)
        correlated = _SeparableFilter.apply(
            eps, self.rho_rows[..., None, None], self.rho_cols[..., None, None]
        )
        return self.loc + self._scale_map() * correlated

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        std = self._scale_map()
        maha = separable_mahalanobis((value - self.loc) / std, self.rho_rows, self.rho_cols)
        n = self.latent_dim
        return -0.5 * (n * math.log(2 * math.pi) + self.log_det_covariance + maha)

    def entropy(self) -> Tensor:
        n = self.latent_dim
        return 0.5 * (n * (1 + math.log(2 * math.pi)) + self.log_det_covariance)

    @property
    def log_det_covariance(self) -> Tensor:
        """``log det`` of the whole covariance, ``batch_shape`` (docs/math.md eq. 15)."""
        return separable_logdet(
            self.rho_rows, self.rho_cols, 2 * self.scale.log(), self.event_shape, self._per_position
        )

    @lazy_property
    def channel_covariance(self) -> Tensor:
        """Dense per-channel covariances ``(..., C, H*W, H*W)`` (raster order): for checks only."""
        _, h, w = self.event_shape
        kron = _kron_last(_toeplitz(self.rho_rows, h), _toeplitz(self.rho_cols, w))
        std = self._scale_map().expand(self.loc.shape).flatten(-2)
        return std.unsqueeze(-1) * kron * std.unsqueeze(-2)

    @lazy_property
    def covariance_matrix(self) -> Tensor:
        """Dense covariance over the flattened map ``(..., C*H*W, C*H*W)``, block-diagonal over channels:
        for checks only."""
        blocks = self.channel_covariance
        c, m = blocks.shape[-3], blocks.shape[-1]
        dense = blocks.new_zeros(blocks.shape[:-3] + (c * m, c * m))
        for k in range(c):
            dense[..., k * m : (k + 1) * m, k * m : (k + 1) * m] = blocks[..., k, :, :]
        return dense


def _toeplitz(rho: Tensor, n: int) -> Tensor:
    """``T(rho)[j, k] = rho^|j - k|``, ``(..., n, n)`` (dense, for checks)."""
    index = torch.arange(n, device=rho.device)
    lag = (index.unsqueeze(-1) - index).abs().to(rho.dtype)
    return rho[..., None, None].pow(lag)


def _kron_last(a: Tensor, b: Tensor) -> Tensor:
    """Batched Kronecker product of the last two axes: ``(..., n, n) kron (..., m, m) -> (..., nm, nm)``."""
    n, m = a.shape[-1], b.shape[-1]
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], n * m, n * m)
