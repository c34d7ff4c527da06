"""The AR(1) Gaussian: a normal distribution whose correlation matrix is an AR(1) Toeplitz matrix.

Every operation is O(d) per sample (the sample is an O(d log d) parallel scan, or for small problems
one O(d^2) product that costs fewer calls); the dense views exist for references and debugging and are
never touched by the fast paths. Equation numbers refer to docs/math.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.distribution import Distribution
from torch.distributions.utils import lazy_property

__all__ = ["AR1Normal", "ar1_filter", "open_unit_interval"]


class _OpenInterval(constraints.Constraint):
    """Constrain to the open interval ``(lower_bound, upper_bound)``; torch ships only closed ones."""

    def __init__(self, lower_bound: float, upper_bound: float) -> None:
        self.lower_bound = lower_bound
        self.upper_bound = upper_bound
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        return (self.lower_bound < value) & (value < self.upper_bound)

    def __repr__(self) -> str:
        return f"OpenInterval(lower_bound={self.lower_bound}, upper_bound={self.upper_bound})"


open_unit_interval = _OpenInterval(-1.0, 1.0)


def _args_valid(loc: Tensor, one_minus_rho_sq: Tensor, scale: Tensor) -> bool:
    """The test of ``AR1Normal.arg_constraints``: no NaN in ``loc``, ``|rho| < 1``, ``scale > 0``.

    ``|rho| < 1`` is ``1 - rho^2 > 0``, and ``1 - rho^2`` (detached) is needed by the sample and the KL
    anyway; so the test is two reductions, ``min(1 - rho^2, scale) > 0`` and ``sum(loc)`` not NaN.
    On the CPU both are read on the host (reading a CPU tensor waits for nothing); ``False`` may also
    mean a ``loc`` holding both ``+inf`` and ``-inf`` (their sum is NaN), which the caller's exact check
    then lets through. On an accelerator the test is queued with ``torch._assert_async`` instead, so
    that validation never makes the host wait for the device: a bad argument there fails as a
    device-side assertion, not as a ``ValueError``.
    """
    if loc.numel() == 0:  # an empty batch (all three share it): nothing to check, nothing to reduce
        return True
    loc, scale = loc.detach(), scale.detach()
    if loc.device.type != "cpu":
        valid = (one_minus_rho_sq > 0).all() & (scale > 0).all() & ~loc.isnan().any()
        torch._assert_async(valid, "AR1Normal: loc must have no NaN, |rho| < 1 and scale > 0")
        return True
    # NaN propagates through minimum, amin and sum and fails the comparison, so a NaN anywhere
    # makes the result False.
    return float(torch.minimum(one_minus_rho_sq, scale).amin()) > 0 and not math.isnan(float(loc.sum()))


def _keep_validate_args(dist: Distribution, validate_args: bool | None) -> None:
    """Record ``validate_args`` on ``dist`` as torch does: ``None`` follows the class default at use
    time (``Distribution.set_default_validate_args``), so a later change of the default still applies.
    The distributions here call ``Distribution.__init__`` with validation off and check their own
    arguments in one fused test, then record the caller's choice with this."""
    if validate_args is None:
        dist.__dict__.pop("_validate_args", None)
    else:
        dist._validate_args = validate_args


def _raise_first_invalid(family: str, checks) -> None:
    """Raise one line naming the first argument of ``family`` whose check fails, how many of its values
    are bad and what it needs: ``checks`` are ``(name, ok: bool Tensor, what it needs)``. Torch's own
    message prints the whole tensor; a user's head needs the name and the fix."""
    for name, ok, needs in checks:
        if not bool(ok.all()):
            raise ValueError(f"{family}: {name} has {int((~ok).sum())} invalid value(s); it needs {needs}")


def _reduce_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back onto the shape of the input it came from."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _scan_powers(rho: Tensor, d: int) -> list[Tensor]:
    """``[rho, rho^2, rho^4, ...]``: the coefficients of the ``ceil(log2 d)`` scan steps for length d.

    Computed once per sample and shared by the forward filter and its adjoint.
    """
    powers = [rho] if d > 1 else []
    for _ in range((d - 1).bit_length() - 1):
        powers.append(powers[-1] * powers[-1])
    return powers


def _scan_first_order(
    x: Tensor,
    rho: Tensor,
    reverse: bool = False,
    x_scale: Tensor | None = None,
    unscaled_first: bool = False,
    powers: list[Tensor] | None = None,
) -> Tensor:
    """Solve ``y_j = rho * y_(j-1) + x_j`` (``y_(j+1)`` when ``reverse``) by a Hillis–Steele scan.

    After the step with shift k, ``y_j`` holds ``sum_(m < 2k) rho^m x_(j-m)``: log2(d) vectorised
    steps replace the d-step Python loop of the reference code (docs/math.md §4). ``x`` carries the
    full shape; ``rho`` (and ``x_scale``, which multiplies ``x`` first, except element 0 when
    ``unscaled_first``) broadcast against it; ``powers`` is ``_scan_powers(rho, d)`` when the caller
    has it already. Not differentiable by itself: :class:`_AR1Reparameterisation` supplies the
    analytic adjoint.
    """
    shape = x.shape
    d = shape[-1]
    if powers is None:
        powers = _scan_powers(rho, d)
    # Two zero-padded buffers: a shifted view of one reads zeros where the shift runs off the end,
    # so each step is a single fused multiply-add into the other buffer, with no aliasing.
    bufs = x.new_zeros((2,) + shape[:-1] + (2 * d,))
    lo = 0 if reverse else d
    views = (bufs[0, ..., lo : lo + d], bufs[1, ..., lo : lo + d])
    if x_scale is None:
        views[0].copy_(x)
    else:
        torch.mul(x, x_scale, out=views[0])
        if unscaled_first:
            views[0][..., 0] = x[..., 0]
    src = 0
    for i, coef in enumerate(powers):
        k = 1 << i
        shifted = bufs[src, ..., lo + k : lo + k + d] if reverse else bufs[src, ..., lo - k : lo - k + d]
        torch.addcmul(views[src], coef, shifted, out=views[1 - src])
        src = 1 - src
    return views[src]


def ar1_filter(x: Tensor, rho: Tensor) -> Tensor:
    """Apply ``y_0 = x_0, y_j = rho * y_(j-1) + x_j`` along the last dimension (no autograd).

    Args:
        x: innovations, shape ``(..., d)``.
        rho: filter coefficient, shape ``(..., 1)``, broadcastable against ``x``.
    """
    with torch.no_grad():
        return _scan_first_order(x.expand(torch.broadcast_shapes(x.shape, rho.shape)), rho)


# The dense filter is O(d^2) per sample against the scan's O(d log d), but a handful of calls instead
# of 2 log2(d) + 6: while the (sample, d, d) product has at most this many entries, the calls cost
# more than the arithmetic (measured on CPU, whole training steps: 3-14% saved at d = 8-12 with batch
# 32-128, break-even near 2^15 entries, behind beyond).
_DENSE_FILTER_MAX_ENTRIES = 1 << 14


def _use_dense_filter(eps: Tensor) -> bool:
    return eps.numel() * eps.shape[-1] <= _DENSE_FILTER_MAX_ENTRIES


@functools.lru_cache(maxsize=64)
def _hankel_exponents(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[d-1, ..., 1, 0, inf, ..., inf]`` (2d - 1 entries); for |rho| < 1, ``rho^inf = 0``."""
    with torch.inference_mode(False):  # a constant reused under any mode, so an ordinary tensor
        exponents = torch.arange(d - 1, -d, -1, dtype=dtype, device=device)
        exponents[d:] = math.inf
    return exponents


def _hankel_filter(rho: Tensor, d: int) -> Tensor:
    """``H[..., i, k] = rho^(d-1-i-k)`` for ``i + k <= d - 1``, else 0: a view, ``(..., d, d)``.

    The lower-triangular filter ``F_rho`` (``F[j, k] = rho^(j-k)``, j >= k) with its rows reversed,
    ``H = J F_rho``; a Hankel matrix, so symmetric and one ``unfold`` of a vector of ``2d - 1``
    powers. Hence ``F_rho x = J (H x)`` and ``F_rho^T h = H (J h)``, with ``J`` the flip.
    """
    return rho.pow(_hankel_exponents(d, rho.dtype, rho.device)).unfold(-1, d, 1)


def _hankel_product(hankel: Tensor, x: Tensor) -> Tensor:
    """``hankel @ x`` over the last dimension; ``x`` is ``(..., d)`` and broadcasts against ``hankel``."""
    return _vecdot(hankel, x.unsqueeze(-2))


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    """``torch.linalg.vecdot`` in the inputs' dtype: autocast would run it in bfloat16/float16, and the
    posterior's sample and KL must not lose precision inside someone's mixed-precision forward."""
    device_type = a.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        autocast = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (e.g. meta): nothing to turn off
        autocast = False
    if autocast:
        with torch.autocast(device_type, enabled=False):
            return torch.linalg.vecdot(a, b)
    return torch.linalg.vecdot(a, b)


def _first_order_only(backward: Callable, ctx, *grads: Tensor):
    """Run an analytic ``backward`` that cannot be differentiated again.

    Same behaviour as ``@once_differentiable``, whose wrapper (a ``no_grad`` block on every call) costs
    more than some of the small backward passes here: the engine already runs backward with grad
    mode off unless ``create_graph=True``, and only then is the wrapper needed.
    """
    if torch.is_grad_enabled():
        return torch.autograd.function.once_differentiable(backward)(ctx, *grads)
    return backward(ctx, *grads)


class _AR1Reparameterisation(torch.autograd.Function):
    """``z = loc + scale * w``, ``w_0 = eps_0``, ``w_j = rho w_(j-1) + sqrt(1-rho^2) eps_j``, fused.

    One node in the autograd graph instead of a dozen keeps the AR(1) sample cheap. The filter
    ``w = F_rho x`` runs as a scan, or for small problems as one product with a Hankel view of the
    powers of rho (docs/math.md §4 names both). Backward is the adjoint filter: with
    ``a = F_rho^T (scale * g)``, ``dl/drho = sum_(j>=1) a_j (w_(j-1) - rho / sqrt(1-rho^2) * eps_j)``.
    ``one_minus_rho_sq`` is ``1 - rho^2`` computed outside autograd (its gradient is in that formula).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, loc: Tensor, rho: Tensor, scale: Tensor, eps: Tensor, one_minus_rho_sq: Tensor
    ) -> Tensor:
        # eps carries the full shape sample_shape + batch_shape + (d,); the others broadcast to it.
        d = eps.shape[-1]
        innovation_scale = one_minus_rho_sq.sqrt()
        # The reference code omits sqrt(1 - rho^2) and so samples another covariance.
        if d == 1:
            w, filter_ = eps, None
        elif _use_dense_filter(eps):
            filter_ = _hankel_filter(rho, d)
            x = eps * innovation_scale
            x[..., 0] = eps[..., 0]
            w = _hankel_product(filter_, x).flip(-1)
        else:
            filter_ = _scan_powers(rho, d)
            w = _scan_first_order(eps, rho, x_scale=innovation_scale, unscaled_first=True, powers=filter_)
        # Intermediates, not inputs or outputs, are kept on ctx (documented practice for
        # once-differentiable Functions), so backward rebuilds neither the filter nor the path.
        ctx.saved = (rho, scale, eps, w, innovation_scale, filter_)
        ctx.shapes = (loc.shape, rho.shape, scale.shape)
        return torch.addcmul(loc, scale, w)

    @staticmethod
    def backward(ctx, grad_z: Tensor):  # type: ignore[override]
        return _first_order_only(_ar1_reparameterisation_backward, ctx, grad_z)


def _ar1_reparameterisation_backward(ctx, grad_z: Tensor):
    rho, scale, eps, w, innovation_scale, filter_ = ctx.saved
    loc_shape, rho_shape, scale_shape = ctx.shapes
    needs_loc, needs_rho, needs_scale = ctx.needs_input_grad[:3]
    grad_loc = _reduce_to_shape(grad_z, loc_shape) if needs_loc else None
    grad_scale = _reduce_to_shape(grad_z * w, scale_shape) if needs_scale else None
    grad_rho = None
    if needs_rho:
        if filter_ is None:  # d = 1: rho enters nothing
            grad_rho = torch.zeros(rho_shape, dtype=rho.dtype, device=rho.device)
        else:
            if isinstance(filter_, Tensor):
                adjoint = _hankel_product(filter_, (grad_z * scale).flip(-1))
            else:
                adjoint = _scan_first_order(grad_z, rho, reverse=True, x_scale=scale, powers=filter_)
            terms = torch.addcmul(w[..., :-1], eps[..., 1:], rho / innovation_scale, value=-1)
            grad_rho = _reduce_to_shape((adjoint[..., 1:] * terms).sum(-1, keepdim=True), rho_shape)
    return grad_loc, grad_rho, grad_scale, None, None


def _one_minus_rho_sq(rho: Tensor) -> Tensor:
    """``1 - rho^2`` as ``(1 - rho)(1 + rho)``: no cancellation as ``|rho| -> 1`` (docs/math.md §5)."""
    return (1 - rho) * (1 + rho)


def _ar1_logdet(rho: Tensor, scale: Tensor, d: int) -> Tensor:
    """``log det(D T(rho) D) = 2 sum_i log sigma_i + (d - 1) log(1 - rho^2)`` (docs/math.md eq. 5).

    ``rho`` is ``(..., 1)``, ``scale`` is ``(..., 1)`` (shared) or ``(..., d)``; returns ``(...)``.
    """
    log_scale = scale.log()
    log_scale_sum = log_scale.sum(-1) * (d if scale.shape[-1] == 1 else 1)
    return 2 * log_scale_sum + (d - 1) * _one_minus_rho_sq(rho).log()[..., 0]


def _ar1_mahalanobis(w: Tensor, rho: Tensor) -> Tensor:
    """``w^T T(rho)^-1 w`` through the tridiagonal precision (docs/math.md eq. 6).

    Equals ``w_0^2 + sum_(j>=1) (w_j - rho w_(j-1))^2 / (1 - rho^2)``: the squared standardised
    innovations of the AR(1) recurrence. ``w`` is the deviation divided by the scale, ``(..., d)``.
    """
    first = w[..., 0].pow(2)
    if w.shape[-1] == 1:
        return first.expand(torch.broadcast_shapes(first.shape, rho.shape[:-1]))
    innovations = w[..., 1:] - rho * w[..., :-1]
    return first + innovations.pow(2).sum(-1) / _one_minus_rho_sq(rho)[..., 0]


def _ar1_precision_trace(rho_p: Tensor, rho_q: Tensor, ratio: Tensor, d: int) -> Tensor:
    """``tr(C_p^-1 C_q)`` for two AR(1) Gaussians, O(d) (docs/math.md eq. 9).

    With ``C = D T(rho) D`` and ``r_i = sigma_q,i / sigma_p,i`` (``ratio``, ``(..., 1)`` or
    ``(..., d)``), only the tridiagonal band of ``T(rho_p)^-1`` meets ``T(rho_q)``:
    ``[sum_i c_i r_i^2 - 2 rho_p rho_q sum_i r_i r_(i+1)] / (1 - rho_p^2)`` with
    ``c = (1, 1 + rho_p^2, ..., 1 + rho_p^2, 1)``. For d = 1 the precision is ``1 / s_p``.
    """
    r = ratio.expand(ratio.shape[:-1] + (d,))
    if d == 1:
        return r[..., 0].pow(2).expand(torch.broadcast_shapes(r.shape[:-1], rho_p.shape[:-1]))
    r_sq = r.pow(2)
    interior = r_sq[..., 1:-1].sum(-1, keepdim=True)
    diagonal = r_sq.sum(-1, keepdim=True) + rho_p.pow(2) * interior
    neighbours = (r[..., 1:] * r[..., :-1]).sum(-1, keepdim=True)
    band = diagonal - 2 * rho_p * rho_q * neighbours
    return (band / _one_minus_rho_sq(rho_p))[..., 0]


class AR1Normal(Distribution):
    r"""A multivariate normal whose covariance is an AR(1) correlation scaled per dimension::

        covariance_matrix = diag(scale) @ T(rho) @ diag(scale),   T(rho)[j, k] = rho ** |j - k|

    With a shared ``scale`` of shape ``(..., 1)`` this is the ρ-VAE posterior of Ferdowsi et al.
    (2019), ``C = s T(rho)`` with ``scale = sqrt(s)``; with ``scale`` of shape ``(..., d)`` it is the
    "ρ + diagonal" generalisation, which contains the diagonal Gaussian at ``rho = 0``.

    Example:
        >>> q = AR1Normal(torch.zeros(4, 10), torch.full((4, 1), 0.5), torch.ones(4, 1))
        >>> z = q.rsample()                      # (4, 10), differentiable in loc, rho, scale
        >>> q.log_prob(z).shape
        torch.Size([4])
        >>> prior = Independent(Normal(torch.zeros(10), torch.ones(10)), 1)
        >>> kl_divergence(q, prior).shape        # closed form, O(d)
        torch.Size([4])

    Args:
        loc (Tensor): mean, shape ``batch_shape + (d,)``.
        rho (Tensor): lag-one correlation in (-1, 1), shape ``batch_shape + (1,)``.
        scale (Tensor): standard deviation per dimension, positive, shape ``batch_shape + (1,)``
            (one scale shared by all dimensions) or ``batch_shape + (d,)``.

    Batch shapes broadcast. Sampling runs the AR(1) recurrence
    ``w_0 = eps_0, w_j = rho w_(j-1) + sqrt(1 - rho^2) eps_j`` as a parallel scan, so
    ``rsample`` has no Python loop over ``d``; ``log_prob`` uses the tridiagonal precision.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "rho": constraints.independent(open_unit_interval, 1),
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        rho: Tensor | float,
        scale: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(loc, Tensor) or loc.dim() < 1:
            raise ValueError("loc must be a tensor of shape (..., d) with at least one dimension")
        if not isinstance(rho, Tensor):
            rho = torch.as_tensor(rho, dtype=loc.dtype, device=loc.device)
        if not isinstance(scale, Tensor):
            scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        d = loc.shape[-1]
        if d < 1:
            raise ValueError("loc must have a latent dimension d >= 1 in its last axis")
        if rho.dim() < 1 or rho.shape[-1] != 1:
            raise ValueError(
                f"rho must have shape (..., 1), one correlation per batch element; got "
                f"{tuple(rho.shape)} (use rho.unsqueeze(-1))"
            )
        if scale.dim() < 1 or scale.shape[-1] not in (1, d):
            raise ValueError(f"scale must have shape (..., 1) or (..., {d}); got {tuple(scale.shape)}")
        try:
            if loc.shape[:-1] == rho.shape[:-1] == scale.shape[:-1]:  # the common case, cheaply
                batch_shape = loc.shape[:-1]
            else:
                batch_shape = torch.broadcast_shapes(loc.shape[:-1], rho.shape[:-1], scale.shape[:-1])
        except RuntimeError as e:
            raise ValueError(
                f"incompatible batch shapes: loc {tuple(loc.shape)}, rho {tuple(rho.shape)}, "
                f"scale {tuple(scale.shape)}"
            ) from e
        self.loc = loc if loc.shape[:-1] == batch_shape else loc.expand(batch_shape + (d,))
        self.rho = rho if rho.shape[:-1] == batch_shape else rho.expand(batch_shape + (1,))
        self.scale = (
            scale if scale.shape[:-1] == batch_shape else scale.expand(batch_shape + scale.shape[-1:])
        )
        # Validation is on by default in torch. Its own check (three constraint evaluations, three
        # host reads) costs more than the sample itself at small d: _args_valid makes the same test
        # in two reductions, and only a failure runs torch's loop, for its message naming the argument.
        event_shape = torch.Size((d,))
        super().__init__(batch_shape, event_shape, validate_args=False)
        _keep_validate_args(self, validate_args)
        if self._validate_args and not _args_valid(self.loc, self._one_minus_rho_sq_detached(), self.scale):
            Distribution.__init__(self, batch_shape, event_shape, validate_args=True)
            _keep_validate_args(self, validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AR1Normal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.rho = self.rho.expand(batch_shape + (1,))
        new.scale = self.scale.expand(batch_shape + self.scale.shape[-1:])
        super(AR1Normal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def latent_dim(self) -> int:
        """The latent dimension d."""
        return self._event_shape[0]

    @property
    def per_dim_scale(self) -> bool:
        """True when each dimension has its own scale (the "ρ + diagonal" family)."""
        return self.scale.shape[-1] != 1 or self.latent_dim == 1

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @lazy_property
    def variance(self) -> Tensor:  # type: ignore[override]
        return self.scale.pow(2).expand(self._batch_shape + self._event_shape)

    @property
    def stddev(self) -> Tensor:
        return self.scale.expand(self._batch_shape + self._event_shape)

    @lazy_property
    def one_minus_rho_sq(self) -> Tensor:
        """``1 - rho^2``, shape ``batch_shape + (1,)``, computed without cancellation."""
        return _one_minus_rho_sq(self.rho)

    def _one_minus_rho_sq_detached(self) -> Tensor:
        """``1 - rho^2`` outside autograd, once per instance: shared by the argument check and the fused
        sample and KL, which differentiate through it analytically."""
        value = self.__dict__.get("_one_minus_rho_sq_value")
        if value is None:
            value = self._one_minus_rho_sq_value = _one_minus_rho_sq(self.rho.detach())
        return value

    @lazy_property
    def log_det_covariance(self) -> Tensor:
        """``log det C``, shape ``batch_shape`` (docs/math.md eq. 5)."""
        return _ar1_logdet(self.rho, self.scale, self.latent_dim)

    # Dense views: for references and debugging only; O(d^2) memory per batch element.
    def _lag_matrix(self) -> Tensor:
        idx = torch.arange(self.latent_dim, device=self.loc.device)
        return idx[:, None] - idx[None, :]

    @lazy_property
    def correlation_matrix(self) -> Tensor:
        """``T(rho)[j, k] = rho ** |j - k|``, shape ``batch_shape + (d, d)``."""
        lag = self._lag_matrix().abs().to(self.loc.dtype)
        return self.rho.unsqueeze(-1).pow(lag)

    @lazy_property
    def covariance_matrix(self) -> Tensor:
        sd = self.stddev
        return sd.unsqueeze(-1) * self.correlation_matrix * sd.unsqueeze(-2)

    @lazy_property
    def scale_tril(self) -> Tensor:
        """``diag(scale) L_rho`` with ``(L_rho)[j, 0] = rho^j`` and
        ``(L_rho)[j, k] = sqrt(1 - rho^2) rho^(j-k)`` for ``1 <= k <= j`` (docs/math.md eq. 2)."""
        lag = self._lag_matrix()
        rho = self.rho.unsqueeze(-1)
        powers = rho.pow(lag.clamp(min=0).to(self.loc.dtype))
        lower = torch.where(lag >= 0, powers, torch.zeros_like(powers))
        first_column = torch.arange(self.latent_dim, device=self.loc.device) == 0
        column_scale = torch.where(
            first_column, torch.ones_like(rho), self.one_minus_rho_sq.sqrt().unsqueeze(-1)
        )
        return self.stddev.unsqueeze(-1) * lower * column_scale

    @lazy_property
    def precision_matrix(self) -> Tensor:
        """``D^-1 T(rho)^-1 D^-1`` with the tridiagonal ``T^-1`` of docs/math.md eq. 4."""
        d = self.latent_dim
        shape = self._batch_shape + (d, d)
        if d == 1:
            return self.stddev.pow(-2).unsqueeze(-1).expand(shape)
        rho = self.rho
        inner = torch.ones(d, dtype=self.loc.dtype, device=self.loc.device)
        inner[0] = inner[-1] = 0
        diagonal = (1 + rho.pow(2) * inner) / self.one_minus_rho_sq
        off = (-rho / self.one_minus_rho_sq).expand(self._batch_shape + (d - 1,))
        t_inv = torch.diag_embed(diagonal.expand(self._batch_shape + (d,)))
        t_inv = t_inv + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        inv_sd = self.stddev.reciprocal()
        return inv_sd.unsqueeze(-1) * t_inv * inv_sd.unsqueeze(-2)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        loc = self.loc
        eps = torch.randn(self._extended_shape(sample_shape), dtype=loc.dtype, device=loc.device)
        return _AR1Reparameterisation.apply(loc, self.rho, self.scale, eps, self._one_minus_rho_sq_detached())

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        w = (value - self.loc) / self.scale
        mahalanobis = _ar1_mahalanobis(w, self.rho)
        d = self.latent_dim
        return -0.5 * (d * math.log(2 * math.pi) + self.log_det_covariance + mahalanobis)

    def entropy(self) -> Tensor:
        d = self.latent_dim
        h = 0.5 * (d * (1.0 + math.log(2 * math.pi)) + self.log_det_covariance)
        return h.expand(self._batch_shape)
