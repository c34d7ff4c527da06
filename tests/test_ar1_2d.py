"""SeparableAR1Normal, ar1_cholesky, LatentMap and their KLs against independent dense references.

Nothing in the references calls rhovae: ``T(rho)[j, k] = rho^|j-k|`` comes from nested loops, the
covariance of channel c is ``D^(1/2) (T(rho_rows) kron T(rho_cols)) D^(1/2)`` through ``torch.kron``
(raster order ``i * W + j``), the channels are the blocks of ``torch.block_diag``, and every law and KL
is left to torch's MultivariateNormal in float64. Near ``|rho| = 1`` the reference is given its exact
Cholesky factor ``D^(1/2) (L_rows kron L_cols)`` instead, so that it stays accurate where the covariance
is nearly singular.
"""

import math

import pytest
import torch
from dense_reference import dense_cholesky_ar1
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from rhovae.distributions import AR1Normal, LatentMap, SeparableAR1Normal, StandardNormal
from rhovae.distributions.ar1_2d import ar1_cholesky

F64 = torch.float64
SIZES = [1, 2, 5]
REL = 1e-8


# --- the dense references -------------------------------------------------------------------------------


def toeplitz(rho: float, n: int) -> torch.Tensor:
    return torch.tensor([[rho ** abs(j - k) for k in range(n)] for j in range(n)], dtype=F64)


def _per_element(rho_rows, rho_cols, std, factor):
    """``(*batch, C)`` twice and ``std (*batch, C, H, W)`` -> the dense ``(*batch, CHW, CHW)`` matrix whose
    channel blocks are ``std[:, None] * factor(rho_r, rho_c, H, W) * std[None, :]``."""
    *batch, c, h, w = std.shape
    batch = torch.broadcast_shapes(tuple(batch), rho_rows.shape[:-1], rho_cols.shape[:-1])
    rr = rho_rows.detach().double().expand(batch + (c,)).reshape(-1, c)
    rc = rho_cols.detach().double().expand(batch + (c,)).reshape(-1, c)
    sd = std.detach().double().expand(batch + (c, h, w)).reshape(-1, c, h * w)
    mats = []
    for b in range(rr.shape[0]):
        blocks = [
            sd[b, k, :, None] * factor(float(rr[b, k]), float(rc[b, k]), h, w) * sd[b, k, None, :]
            for k in range(c)
        ]
        mats.append(torch.block_diag(*blocks))
    return torch.stack(mats).reshape(batch + (c * h * w, c * h * w))


def dense_covariance(rho_rows, rho_cols, std):
    return _per_element(
        rho_rows, rho_cols, std, lambda r, s, h, w: torch.kron(toeplitz(r, h), toeplitz(s, w))
    )


def dense_tril(rho_rows, rho_cols, std):
    """``D^(1/2) (L_rows kron L_cols)``: lower triangular (a Kronecker product of lower triangular
    factors), the exact Cholesky factor of :func:`dense_covariance`."""

    def factor(r, s, h, w):
        return torch.kron(dense_cholesky_ar1(r, h), dense_cholesky_ar1(s, w))

    # diag(s) L diag(s) is not diag(s) L; scale the rows only
    ones = torch.ones_like(std)
    return std.detach().double().flatten(-3).unsqueeze(-1) * _per_element(rho_rows, rho_cols, ones, factor)


def dense_mvn(loc, rho_rows, rho_cols, std, tril=False):
    """The law of ``vec(z)`` for ``SeparableAR1Normal(loc, rho_rows, rho_cols, std)`` (std as a map)."""
    flat = loc.detach().double().flatten(-3)
    if tril:
        return MultivariateNormal(flat, scale_tril=dense_tril(rho_rows, rho_cols, std))
    return MultivariateNormal(flat, covariance_matrix=dense_covariance(rho_rows, rho_cols, std))


def dense_ar1_map_mvn(loc, rho, scale):
    """``AR1Normal(loc (B, C, HW), rho (B, C, 1), scale (B, C, 1 or HW))`` over the flattened map."""
    b, c, d = loc.shape
    sd = scale.detach().double().expand(b, c, d)
    mats = [
        torch.block_diag(
            *[sd[i, k, :, None] * toeplitz(float(rho[i, k, 0]), d) * sd[i, k, None, :] for k in range(c)]
        )
        for i in range(b)
    ]
    return MultivariateNormal(loc.detach().double().reshape(b, c * d), covariance_matrix=torch.stack(mats))


def standard_mvn(n):
    return MultivariateNormal(torch.zeros(n, dtype=F64), torch.eye(n, dtype=F64))


def diagonal_mvn(loc, std):
    return MultivariateNormal(
        loc.detach().double().flatten(-3), torch.diag_embed(std.detach().double().flatten(-3) ** 2)
    )


def assert_rel(actual, expected, rel=REL):
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().clamp(min=1.0))


def params(batch, c, h, w, per_position, seed=0, scale_range=(0.3, 1.8), dtype=F64):
    """Random parameters; ``std`` is the scale laid out as a map (what the dense references take)."""
    g = torch.Generator().manual_seed(seed)
    batch = tuple(batch)
    loc = torch.randn(batch + (c, h, w), generator=g, dtype=F64)
    rho_rows = torch.rand(batch + (c,), generator=g, dtype=F64) * 1.9 - 0.95
    rho_cols = torch.rand(batch + (c,), generator=g, dtype=F64) * 1.9 - 0.95
    lo, hi = scale_range
    shape = (c, h, w) if per_position else (c,)
    scale = torch.rand(batch + shape, generator=g, dtype=F64) * (hi - lo) + lo
    std = scale if per_position else scale[..., None, None].expand(batch + (c, h, w))
    return tuple(t.to(dtype) for t in (loc, rho_rows, rho_cols, scale, std))


def as_map(z, c, h, w):
    return z.reshape(z.shape[:-1] + (c, h, w))


# --- 1. log_prob, entropy and the dense views -----------------------------------------------------------


@pytest.mark.parametrize("h", SIZES)
@pytest.mark.parametrize("w", SIZES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("batch", [(), (4,)])
def test_log_prob_and_entropy_match_dense(h, w, c, per_position, batch):
    loc, rho_rows, rho_cols, scale, std = params(batch, c, h, w, per_position, seed=h + 7 * w + 31 * c)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    ref = dense_mvn(loc, rho_rows, rho_cols, std)
    assert q.batch_shape == batch and q.event_shape == (c, h, w)
    g = torch.Generator().manual_seed(1)
    for sample_shape in [(), (3,)]:
        z = ref.sample(sample_shape) + 0.5 * torch.randn(
            sample_shape + batch + (c * h * w,), generator=g, dtype=F64
        )
        lp = q.log_prob(as_map(z, c, h, w))
        assert lp.shape == sample_shape + batch
        assert_rel(lp, ref.log_prob(z))
    assert q.entropy().shape == batch
    assert_rel(q.entropy(), ref.entropy())
    assert_rel(q.log_det_covariance, torch.logdet(ref.covariance_matrix))


@pytest.mark.parametrize("h, w", [(1, 1), (1, 4), (3, 1), (2, 5), (4, 3)])
@pytest.mark.parametrize("per_position", [False, True])
def test_lazy_dense_views_equal_kron_reference(h, w, per_position):
    c, batch = 3, (2,)
    loc, rho_rows, rho_cols, scale, std = params(batch, c, h, w, per_position, seed=5)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    full = dense_covariance(rho_rows, rho_cols, std)
    m = h * w
    assert q.channel_covariance.shape == batch + (c, m, m)
    assert q.covariance_matrix.shape == batch + (c * m, c * m)
    for k in range(c):
        block = full[..., k * m : (k + 1) * m, k * m : (k + 1) * m]
        torch.testing.assert_close(q.channel_covariance[..., k, :, :], block, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(q.covariance_matrix, full, rtol=1e-13, atol=1e-13)


# --- 2. the KL divergences ------------------------------------------------------------------------------

KL_SHAPES = [(1, 1), (1, 5), (5, 1), (2, 2), (5, 5), (3, 4)]


@pytest.mark.parametrize("h, w", KL_SHAPES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("per_position", [False, True])
def test_kl_to_standard_normal_matches_dense(h, w, c, per_position):
    loc, rho_rows, rho_cols, scale, std = params((4,), c, h, w, per_position, seed=h * w + c)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    expected = kl_divergence(dense_mvn(loc, rho_rows, rho_cols, std), standard_mvn(c * h * w))
    actual = kl_divergence(q, StandardNormal((c, h, w)))
    assert actual.shape == (4,)
    assert_rel(actual, expected)
    # the same through a float64 prior
    assert_rel(kl_divergence(q, StandardNormal((c, h, w), dtype=F64)), expected)


@pytest.mark.parametrize("h, w", KL_SHAPES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("per_position_q", [False, True])
@pytest.mark.parametrize("per_position_p", [False, True])
def test_kl_separable_separable_matches_dense(h, w, c, per_position_q, per_position_p):
    loc_q, rr_q, rc_q, scale_q, std_q = params((4,), c, h, w, per_position_q, seed=1)
    loc_p, rr_p, rc_p, scale_p, std_p = params((4,), c, h, w, per_position_p, seed=2)
    loc_p = loc_p + 0.7  # a nonzero prior mean
    q = SeparableAR1Normal(loc_q, rr_q, rc_q, scale_q)
    p = SeparableAR1Normal(loc_p, rr_p, rc_p, scale_p)
    ref_q, ref_p = dense_mvn(loc_q, rr_q, rc_q, std_q), dense_mvn(loc_p, rr_p, rc_p, std_p)
    assert_rel(kl_divergence(q, p), kl_divergence(ref_q, ref_p), rel=1e-7)
    assert_rel(kl_divergence(p, q), kl_divergence(ref_p, ref_q), rel=1e-7)
    # a prior without batch dimensions broadcasts against the posterior's batch
    p0 = SeparableAR1Normal(loc_p[0], rr_p[0], rc_p[0], scale_p[0])
    ref_p0 = dense_mvn(loc_p[0], rr_p[0], rc_p[0], std_p[0])
    kl = kl_divergence(q, p0)
    assert kl.shape == (4,)
    assert_rel(kl, kl_divergence(ref_q, ref_p0), rel=1e-7)
    # KL(q || q) = 0
    torch.testing.assert_close(kl_divergence(q, q), torch.zeros(4, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("h, w", KL_SHAPES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("per_position_p", [False, True])
def test_kl_independent_to_separable_matches_dense(h, w, c, per_position_p):
    g = torch.Generator().manual_seed(h + w + c)
    loc_q = torch.randn(4, c, h, w, generator=g, dtype=F64)
    std_q = torch.rand(4, c, h, w, generator=g, dtype=F64) + 0.2
    loc_p, rr_p, rc_p, scale_p, std_p = params((4,), c, h, w, per_position_p, seed=3)
    q = Independent(Normal(loc_q, std_q), 3)
    p = SeparableAR1Normal(loc_p + 0.3, rr_p, rc_p, scale_p)
    expected = kl_divergence(diagonal_mvn(loc_q, std_q), dense_mvn(loc_p + 0.3, rr_p, rc_p, std_p))
    assert_rel(kl_divergence(q, p), expected, rel=1e-7)
    # an unbatched prior
    p0 = SeparableAR1Normal(loc_p[1], rr_p[1], rc_p[1], scale_p[1])
    expected0 = kl_divergence(diagonal_mvn(loc_q, std_q), dense_mvn(loc_p[1], rr_p[1], rc_p[1], std_p[1]))
    assert_rel(kl_divergence(q, p0), expected0, rel=1e-7)


def test_kl_independent_to_separable_rejects_other_layouts():
    p = SeparableAR1Normal(torch.zeros(2, 3, 3, dtype=F64), 0.5, 0.5, 1.0)
    flat = Independent(Normal(torch.zeros(2, 3, 3, dtype=F64), torch.ones(2, 3, 3, dtype=F64)), 2)
    with pytest.raises(NotImplementedError):
        kl_divergence(flat, p)
    wrong = Independent(Normal(torch.zeros(2, 3, 4, dtype=F64), torch.ones(2, 3, 4, dtype=F64)), 3)
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(wrong, p)
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(p, StandardNormal((2, 3, 4)))
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(p, SeparableAR1Normal(torch.zeros(3, 2, 3, dtype=F64), 0.5, 0.5, 1.0))


@pytest.mark.parametrize("h, w", [(1, 1), (1, 4), (3, 3), (2, 5)])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("per_dim", [False, True])
def test_latent_map_of_ar1_matches_dense(h, w, c, per_dim):
    g = torch.Generator().manual_seed(11 * h + w + c)
    d = h * w
    loc = torch.randn(4, c, d, generator=g, dtype=F64)
    rho = torch.rand(4, c, 1, generator=g, dtype=F64) * 1.9 - 0.95
    scale = torch.rand(4, c, d if per_dim else 1, generator=g, dtype=F64) + 0.3
    q = LatentMap(Independent(AR1Normal(loc, rho, scale), 1), (c, h, w))
    ref = dense_ar1_map_mvn(loc, rho, scale)
    assert q.batch_shape == (4,) and q.event_shape == (c, h, w)
    kl = kl_divergence(q, StandardNormal((c, h, w)))
    assert kl.shape == (4,)
    assert_rel(kl, kl_divergence(ref, standard_mvn(c * d)))
    z = ref.sample((3,))
    assert_rel(q.log_prob(as_map(z, c, h, w)), ref.log_prob(z))
    assert_rel(q.entropy(), ref.entropy())
    torch.testing.assert_close(q.mean, as_map(ref.mean, c, h, w))
    torch.testing.assert_close(q.mode, as_map(ref.mean, c, h, w))
    torch.testing.assert_close(q.variance, as_map(ref.variance, c, h, w))
    assert q.rsample((2,)).shape == (2, 4, c, h, w) and q.sample().shape == (4, c, h, w)
    assert q.latent_dim == c * d
    e = q.expand((3, 4))
    assert e.batch_shape == (3, 4) and e.event_shape == (c, h, w)
    assert_rel(e.log_prob(as_map(z[0], c, h, w)), ref.log_prob(z[0]).expand(3, 4))
    with pytest.raises(ValueError, match="cannot be laid out"):
        LatentMap(Independent(AR1Normal(loc, rho, scale), 1), (c, h, w + 1))


def test_latent_map_kl_with_a_bare_base():
    # no Independent wrapper: the base's own KL, nothing summed
    loc = torch.randn(3, 6, dtype=F64)
    rho = torch.tensor([[0.4], [-0.8], [0.0]], dtype=F64)
    scale = torch.tensor([[0.5], [1.5], [1.0]], dtype=F64)
    q = LatentMap(AR1Normal(loc, rho, scale), (1, 2, 3))
    expected = kl_divergence(dense_ar1_map_mvn(loc[:, None], rho[:, None], scale[:, None]), standard_mvn(6))
    assert_rel(kl_divergence(q, StandardNormal((1, 2, 3))), expected)


# --- 3. the sample --------------------------------------------------------------------------------------

CHOLESKY_RHOS = [-0.999, -0.6, 0.0, 0.3, 0.95, 0.999]


@pytest.mark.parametrize("n", [1, 2, 3, 6, 11])
def test_ar1_cholesky_is_the_factor_of_the_toeplitz_matrix(n):
    rho = torch.tensor(CHOLESKY_RHOS, dtype=F64).reshape(2, 3)
    lower = ar1_cholesky(rho, n)
    assert lower.shape == (2, 3, n, n)
    assert torch.equal(lower, lower.tril())
    for i in range(2):
        for k in range(3):
            r = float(rho[i, k])
            t = toeplitz(r, n)
            torch.testing.assert_close(lower[i, k] @ lower[i, k].T, t, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.linalg.cholesky(t), lower[i, k], rtol=1e-7, atol=1e-7)
            torch.testing.assert_close(lower[i, k], dense_cholesky_ar1(r, n), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("per_position", [False, True])
def test_rsample_is_the_kron_cholesky_product(per_position):
    c, h, w = 2, 3, 4
    loc, rho_rows, rho_cols, scale, std = params((3,), c, h, w, per_position, seed=4)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    torch.manual_seed(3)
    z = q.rsample((2,))
    torch.manual_seed(3)
    eps = torch.randn(2, 3, c, h, w, dtype=F64)
    tril = dense_tril(rho_rows, rho_cols, std)  # (3, CHW, CHW)
    expected = loc.flatten(-3) + (tril @ eps.flatten(-3).unsqueeze(-1)).squeeze(-1)
    assert z.shape == (2, 3, c, h, w)
    torch.testing.assert_close(z.flatten(-3), expected, rtol=1e-12, atol=1e-12)
    torch.manual_seed(3)
    torch.testing.assert_close(q.sample((2,)), z)


@pytest.mark.parametrize("per_position", [False, True])
def test_sample_moments_match_dense_covariance(per_position):
    # n samples; entry (j, k) of the sample covariance has standard error
    # sqrt((C_jj C_kk + C_jk^2) / n) <= sqrt(2 / n) max_j C_jj, a mean sqrt(C_jj / n): 5 standard errors
    # for each, with every pair of positions across the channels (whose covariance must be 0) included.
    c, h, w, n = 2, 3, 3, 100_000
    loc, rho_rows, rho_cols, scale, std = params((2,), c, h, w, per_position, seed=8)
    rho_rows = torch.tensor([[0.9, -0.5], [0.0, 0.7]], dtype=F64)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    torch.manual_seed(11)
    z = q.sample((n,)).flatten(-3)  # (n, 2, CHW)
    cov = dense_covariance(rho_rows, rho_cols, std)
    max_var = float(cov.diagonal(dim1=-2, dim2=-1).max())
    mean_tol = 5 * math.sqrt(max_var / n)
    cov_tol = 5 * math.sqrt(2 * max_var**2 / n)
    mean = z.mean(0)
    assert (mean - loc.flatten(-3)).abs().max() < mean_tol
    centred = z - mean
    emp = torch.einsum("nbi,nbj->bij", centred, centred) / (n - 1)
    assert (emp - cov).abs().max() < cov_tol


# --- 4. gradients ---------------------------------------------------------------------------------------


def grad_params(per_position, c=2, h=3, w=2, seed=0):
    loc, rho_rows, rho_cols, scale, _ = params((2,), c, h, w, per_position, seed=seed)
    return tuple(t.clone().requires_grad_() for t in (loc, rho_rows, rho_cols, scale))


@pytest.mark.parametrize("per_position", [False, True])
def test_rsample_gradcheck(per_position):
    def sample(loc, rho_rows, rho_cols, scale):
        torch.manual_seed(5)
        return SeparableAR1Normal(loc, rho_rows, rho_cols, scale).rsample((2,))

    assert torch.autograd.gradcheck(sample, grad_params(per_position))


@pytest.mark.parametrize("per_position", [False, True])
def test_log_prob_and_entropy_gradcheck(per_position):
    z = torch.randn(3, 2, 2, 3, 2, dtype=F64, requires_grad=True)

    def log_prob(value, loc, rho_rows, rho_cols, scale):
        return SeparableAR1Normal(loc, rho_rows, rho_cols, scale).log_prob(value)

    def entropy(loc, rho_rows, rho_cols, scale):
        return SeparableAR1Normal(loc, rho_rows, rho_cols, scale).entropy()

    args = grad_params(per_position)
    assert torch.autograd.gradcheck(log_prob, (z,) + args)
    assert torch.autograd.gradcheck(lambda r, s, sc: entropy(args[0], r, s, sc), args[1:])


@pytest.mark.parametrize("per_position_q", [False, True])
@pytest.mark.parametrize("per_position_p", [False, True])
def test_kl_gradcheck(per_position_q, per_position_p):
    q_args = grad_params(per_position_q, seed=1)
    p_args = grad_params(per_position_p, seed=2)

    def kl_standard(*a):
        return kl_divergence(SeparableAR1Normal(*a), StandardNormal((2, 3, 2)))

    def kl_separable(*a):
        return kl_divergence(SeparableAR1Normal(*a[:4]), SeparableAR1Normal(*a[4:]))

    assert torch.autograd.gradcheck(kl_standard, q_args)
    assert torch.autograd.gradcheck(kl_separable, q_args + p_args)


@pytest.mark.parametrize("per_position_p", [False, True])
def test_kl_independent_to_separable_gradcheck(per_position_p):
    loc_q = torch.randn(2, 2, 3, 2, dtype=F64, requires_grad=True)
    std_q = (torch.rand(2, 2, 3, 2, dtype=F64) + 0.3).requires_grad_()
    p_args = grad_params(per_position_p, seed=3)

    def kl(loc, std, *a):
        return kl_divergence(Independent(Normal(loc, std), 3), SeparableAR1Normal(*a))

    assert torch.autograd.gradcheck(kl, (loc_q, std_q) + p_args)


@pytest.mark.parametrize("per_dim", [False, True])
def test_latent_map_kl_gradcheck(per_dim):
    loc = torch.randn(2, 2, 6, dtype=F64, requires_grad=True)
    rho = torch.tensor([[[0.3], [-0.9]], [[0.0], [0.97]]], dtype=F64, requires_grad=True)
    scale = (torch.rand(2, 2, 6 if per_dim else 1, dtype=F64) + 0.4).requires_grad_()

    def kl(loc, rho, scale):
        q = LatentMap(Independent(AR1Normal(loc, rho, scale), 1), (2, 2, 3))
        return kl_divergence(q, StandardNormal((2, 2, 3)))

    assert torch.autograd.gradcheck(kl, (loc, rho, scale))


# --- 5. edges -------------------------------------------------------------------------------------------

NEAR_ONE = 1 - 1e-6


@pytest.mark.parametrize("per_position", [False, True])
def test_near_unit_rho_is_finite_and_matches_exact_dense_factor(per_position):
    c, h, w = 2, 3, 4
    loc, _, _, scale, std = params((2,), c, h, w, per_position, seed=6)
    rho_rows = torch.tensor([[NEAR_ONE, 0.3], [-NEAR_ONE, NEAR_ONE]], dtype=F64, requires_grad=True)
    rho_cols = torch.tensor([[-0.5, -NEAR_ONE], [NEAR_ONE, 0.0]], dtype=F64, requires_grad=True)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    ref = dense_mvn(loc, rho_rows, rho_cols, std, tril=True)
    # the factor reproduces the kron covariance (the check that it is the right reference)
    torch.testing.assert_close(
        ref.scale_tril @ ref.scale_tril.mT, dense_covariance(rho_rows, rho_cols, std), rtol=1e-12, atol=1e-12
    )
    torch.manual_seed(2)
    z = ref.sample((3,))
    lp = q.log_prob(as_map(z, c, h, w))
    assert torch.isfinite(lp).all()
    assert_rel(lp, ref.log_prob(z), rel=1e-7)
    assert_rel(q.entropy(), ref.entropy(), rel=1e-9)
    kl_std = kl_divergence(q, StandardNormal((c, h, w)))
    assert_rel(kl_std, kl_divergence(ref, standard_mvn(c * h * w)), rel=1e-9)
    # against a moderate prior, and a moderate posterior against the near-singular one
    loc_p, rr_p, rc_p, scale_p, std_p = params((2,), c, h, w, not per_position, seed=7)
    p = SeparableAR1Normal(loc_p, rr_p, rc_p, scale_p)
    ref_p = dense_mvn(loc_p, rr_p, rc_p, std_p, tril=True)
    kl_qp, kl_pq = kl_divergence(q, p), kl_divergence(p, q)
    assert_rel(kl_qp, kl_divergence(ref, ref_p), rel=1e-8)
    assert_rel(kl_pq, kl_divergence(ref_p, ref), rel=1e-7)
    assert float(kl_pq.detach().min()) > 1e4  # the near-singular prior makes this one huge
    # a near-singular posterior against itself, shifted: the large trace terms cancel
    shifted = SeparableAR1Normal(loc + 0.1, rho_rows.detach(), rho_cols.detach(), scale)
    ref_shifted = dense_mvn(loc + 0.1, rho_rows, rho_cols, std, tril=True)
    torch.testing.assert_close(
        kl_divergence(q, shifted), kl_divergence(ref, ref_shifted), rtol=1e-6, atol=1e-4
    )
    (lp.sum() + kl_std.sum() + kl_qp.sum() + kl_pq.sum() + q.rsample().sum()).backward()
    assert torch.isfinite(rho_rows.grad).all() and torch.isfinite(rho_cols.grad).all()


def test_float32_near_unit_rho_is_finite():
    a = torch.tensor([[8.0, -8.0]], requires_grad=True)  # tanh(8): 1 - rho^2 ~ 5e-7 in float32
    loc = torch.randn(1, 2, 4, 5, requires_grad=True)
    q = SeparableAR1Normal(loc, torch.tanh(a), torch.tanh(-a), torch.ones(1, 2))
    z = q.rsample()
    loss = q.log_prob(z) + kl_divergence(q, StandardNormal((2, 4, 5))) + z.pow(2).sum()
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(loc.grad).all()


def test_zero_rho_gradient_of_rsample_is_finite_and_exact():
    # At rho = 0, d L / d rho is the unit subdiagonal (L[j, 0] = rho^j, L[j, k] = rho^(j-k) sqrt(1-rho^2)),
    # so d sum(z) / d rho_rows = sum(scale * S eps) and d sum(z) / d rho_cols = sum(scale * eps S^T).
    c, h, w = 2, 4, 3
    loc = torch.zeros(2, c, h, w, dtype=F64)
    rho_rows = torch.zeros(2, c, dtype=F64, requires_grad=True)
    rho_cols = torch.zeros(2, c, dtype=F64, requires_grad=True)
    scale = torch.tensor([[0.5, 2.0], [1.0, 3.0]], dtype=F64)
    torch.manual_seed(4)
    z = SeparableAR1Normal(loc, rho_rows, rho_cols, scale).rsample()
    z.sum().backward()
    torch.manual_seed(4)
    eps = torch.randn(2, c, h, w, dtype=F64)
    s_h, s_w = torch.diag(torch.ones(h - 1, dtype=F64), -1), torch.diag(torch.ones(w - 1, dtype=F64), -1)
    torch.testing.assert_close(rho_rows.grad, (scale[..., None, None] * (s_h @ eps)).sum((-2, -1)))
    torch.testing.assert_close(rho_cols.grad, (scale[..., None, None] * (eps @ s_w.T)).sum((-2, -1)))
    # the factor on its own: d sum(L) / d rho = n - 1 at 0
    rho = torch.zeros(3, dtype=F64, requires_grad=True)
    ar1_cholesky(rho, 5).sum().backward()
    torch.testing.assert_close(rho.grad, torch.full((3,), 4.0, dtype=F64))
    # and gradcheck straddling 0 (a small map: torch's cumprod backward through exact zeros costs ~10 ms
    # a call, and gradcheck makes one per output)
    rr = torch.zeros(1, c, dtype=F64, requires_grad=True)

    def sample(r):
        torch.manual_seed(6)
        return SeparableAR1Normal(loc[:1, :, :3, :2], r, r, scale[:1]).rsample()

    assert torch.autograd.gradcheck(sample, (rr,))


@pytest.mark.parametrize("size", [1e-4, 1e4])
@pytest.mark.parametrize("per_position", [False, True])
def test_extreme_scales_match_dense(size, per_position):
    c, h, w = 2, 3, 4
    loc, rho_rows, rho_cols, scale, std = params((2,), c, h, w, per_position, seed=9)
    loc, scale, std = loc * size, scale * size, std * size
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    ref = dense_mvn(loc, rho_rows, rho_cols, std)
    z = ref.sample((3,))
    assert_rel(q.log_prob(as_map(z, c, h, w)), ref.log_prob(z), rel=1e-8)
    assert_rel(q.entropy(), ref.entropy())
    assert_rel(kl_divergence(q, StandardNormal((c, h, w))), kl_divergence(ref, standard_mvn(c * h * w)))
    loc_p, rr_p, rc_p, scale_p, std_p = params((2,), c, h, w, not per_position, seed=10)
    p = SeparableAR1Normal(loc_p, rr_p, rc_p, scale_p)
    ref_p = dense_mvn(loc_p, rr_p, rc_p, std_p)
    assert_rel(kl_divergence(q, p), kl_divergence(ref, ref_p), rel=1e-8)
    assert_rel(kl_divergence(p, q), kl_divergence(ref_p, ref), rel=1e-8)
    diag = Independent(Normal(loc_p, std_p), 3)
    assert_rel(kl_divergence(diag, q), kl_divergence(diagonal_mvn(loc_p, std_p), ref), rel=1e-8)


def test_single_unit_map_is_a_univariate_normal():
    loc = torch.tensor([0.3, -1.0], dtype=F64).reshape(2, 1, 1, 1)
    scale = torch.tensor([[2.0], [0.5]], dtype=F64)
    uni = Independent(Normal(loc, scale[..., None, None]), 3)
    z = torch.randn(4, 2, 1, 1, 1, dtype=F64)
    for rho in (0.9, -0.4, 0.0):
        q = SeparableAR1Normal(
            loc, torch.full((2, 1), rho, dtype=F64), torch.full((2, 1), -rho, dtype=F64), scale
        )
        assert q.event_shape == (1, 1, 1) and q.latent_dim == 1
        torch.testing.assert_close(q.log_prob(z), uni.log_prob(z))
        torch.testing.assert_close(q.entropy(), uni.entropy())
        std = Independent(Normal(torch.zeros(1, 1, 1, dtype=F64), torch.ones(1, 1, 1, dtype=F64)), 3)
        torch.testing.assert_close(kl_divergence(q, StandardNormal((1, 1, 1))), kl_divergence(uni, std))
        torch.manual_seed(0)
        zq = q.rsample((3,))
        torch.manual_seed(0)
        torch.testing.assert_close(zq, uni.rsample((3,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_position", [False, True])
def test_dtype_is_preserved(dtype, per_position):
    c, h, w = 2, 3, 4
    loc, rho_rows, rho_cols, scale, std = params((2,), c, h, w, per_position, seed=12, dtype=dtype)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    p = SeparableAR1Normal(loc.flip(0), rho_rows.flip(0), rho_cols, scale.flip(0))
    z = q.rsample((3,))
    diag = Independent(Normal(loc, std), 3)
    outputs = [
        z,
        q.sample(),
        q.log_prob(z),
        q.entropy(),
        q.mean,
        q.mode,
        q.variance,
        q.stddev,
        q.log_det_covariance,
        q.covariance_matrix,
        kl_divergence(q, StandardNormal((c, h, w), dtype=dtype)),
        kl_divergence(q, p),
        kl_divergence(diag, p),
        ar1_cholesky(rho_rows, h),
    ]
    assert all(t.dtype == dtype for t in outputs)
    # float arguments take loc's dtype
    scalar = SeparableAR1Normal(loc, 0.5, -0.25, 1.5)
    assert scalar.rho_rows.dtype == scalar.rho_cols.dtype == scalar.scale.dtype == dtype
    assert scalar.rho_rows.shape == (2, c) and scalar.scale.shape == (2, c)
    assert scalar.log_prob(z).dtype == dtype
    # float32 agrees with the float64 reference to float32 accuracy
    if dtype == torch.float32:
        ref = dense_mvn(loc, rho_rows, rho_cols, std)
        zz = z.double().flatten(-3)
        torch.testing.assert_close(q.log_prob(z).double(), ref.log_prob(zz), rtol=1e-4, atol=1e-3)
        kl = kl_divergence(q, StandardNormal((c, h, w))).double()
        torch.testing.assert_close(kl, kl_divergence(ref, standard_mvn(c * h * w)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "rho_rows, rho_cols, scale, name",
    [
        (1.0, 0.0, 1.0, "rho_rows"),
        (-1.0, 0.0, 1.0, "rho_rows"),
        (1.5, 0.0, 1.0, "rho_rows"),
        (float("nan"), 0.0, 1.0, "rho_rows"),
        (0.0, 1.0, 1.0, "rho_cols"),
        (0.0, -1.2, 1.0, "rho_cols"),
        (0.0, 0.0, 0.0, "scale"),
        (0.0, 0.0, -1.0, "scale"),
        (0.0, 0.0, float("nan"), "scale"),
    ],
)
@pytest.mark.parametrize("per_position", [False, True])
def test_invalid_values_raise_when_validating(rho_rows, rho_cols, scale, name, per_position):
    loc = torch.zeros(2, 3, 2, 2)
    good_rows, good_cols = torch.full((2, 3), 0.2), torch.full((2, 3), -0.2)
    good_scale = torch.ones(2, 3, 2, 2) if per_position else torch.ones(2, 3)
    # one bad entry among good ones
    args = {"rho_rows": good_rows.clone(), "rho_cols": good_cols.clone(), "scale": good_scale.clone()}
    value = {"rho_rows": rho_rows, "rho_cols": rho_cols, "scale": scale}[name]
    args[name].view(-1)[-1] = value
    with pytest.raises(ValueError, match=f"SeparableAR1Normal: {name} has 1 invalid value"):
        SeparableAR1Normal(loc, validate_args=True, **args)
    SeparableAR1Normal(loc, validate_args=False, **args)  # not checked when told not to


def test_validation_checks_the_value():
    q = SeparableAR1Normal(torch.zeros(2, 3, 2, 2), 0.5, 0.5, 1.0, validate_args=True)
    q.log_prob(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError):
        q.log_prob(torch.zeros(3, 2, 3))
    with pytest.raises(ValueError):
        q.log_prob(torch.full((3, 2, 2), float("nan")))


@pytest.mark.parametrize(
    "loc, rho_rows, rho_cols, scale, name",
    [
        (torch.zeros(2, 3, 2, 2), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3), "rho_rows"),
        (torch.zeros(2, 3, 2, 2), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), "rho_cols"),
        (torch.zeros(2, 3, 2, 2), torch.tensor(0.5), torch.zeros(3), torch.ones(3), "rho_rows"),
        (torch.zeros(2, 3, 2, 2), torch.zeros(3), torch.zeros(3), torch.ones(2, 4), "scale"),
        (torch.zeros(2, 3, 2, 2), torch.zeros(3), torch.zeros(3), torch.ones(3, 2, 4), "scale"),
        (torch.zeros(2, 3, 2, 2), torch.zeros(3), torch.zeros(3), torch.tensor(1.0), "scale"),
        (torch.zeros(2, 3, 2, 2), torch.zeros(5, 3), torch.zeros(3), torch.ones(3), "incompatible batch"),
        (torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), torch.ones(3), "loc"),
        (torch.zeros(4), torch.zeros(1), torch.zeros(1), torch.ones(1), "loc"),
        (torch.zeros(2, 0, 2, 2), torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2, 0), "non-empty"),
    ],
)
def test_bad_shapes_raise_value_error_naming_argument(loc, rho_rows, rho_cols, scale, name):
    with pytest.raises(ValueError, match=name):
        SeparableAR1Normal(loc, rho_rows, rho_cols, scale)


def test_loc_must_be_a_tensor():
    with pytest.raises(ValueError, match="loc"):
        SeparableAR1Normal([[[0.0]]], 0.0, 0.0, 1.0)


@pytest.mark.parametrize("per_position", [False, True])
def test_broadcasting_and_expand(per_position):
    c, h, w = 2, 3, 2
    loc, rho_rows, rho_cols, scale, std = params((4,), c, h, w, per_position, seed=13)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    z = torch.randn(c, h, w, dtype=F64)
    assert q.log_prob(z).shape == (4,)  # an unbatched value broadcasts
    e = q.expand((3, 4))
    assert e.batch_shape == (3, 4) and e.event_shape == (c, h, w)
    assert e.per_position_scale == per_position
    assert e.rsample((2,)).shape == (2, 3, 4, c, h, w)
    torch.testing.assert_close(e.log_prob(z), q.log_prob(z).expand(3, 4))
    torch.testing.assert_close(e.entropy(), q.entropy().expand(3, 4))
    torch.testing.assert_close(e.variance, q.variance.expand(3, 4, c, h, w))
    kl = kl_divergence(e, StandardNormal((c, h, w)))
    torch.testing.assert_close(kl, kl_divergence(q, StandardNormal((c, h, w))).expand(3, 4))
    # broadcasting among the arguments: loc (1, C, H, W) against rho (4, C)
    b = SeparableAR1Normal(loc[:1], rho_rows, rho_cols[:1], scale[:1])
    assert b.batch_shape == (4,)
    ref = dense_mvn(loc[:1].expand(4, c, h, w), rho_rows, rho_cols[:1], std[:1])
    assert_rel(b.log_prob(z), ref.log_prob(z.flatten()))
    # expanding an unbatched distribution
    u = SeparableAR1Normal(loc[0], rho_rows[0], rho_cols[0], scale[0]).expand((5,))
    assert u.batch_shape == (5,) and u.sample().shape == (5, c, h, w)
    torch.testing.assert_close(u.log_prob(z), q.log_prob(z)[0].expand(5))


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_variance_stddev(per_position):
    c, h, w = 3, 2, 4
    loc, rho_rows, rho_cols, scale, std = params((2,), c, h, w, per_position, seed=14)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    cov = dense_covariance(rho_rows, rho_cols, std)
    assert q.per_position_scale == per_position and q.latent_dim == c * h * w
    assert q.mean.shape == q.mode.shape == q.variance.shape == q.stddev.shape == (2, c, h, w)
    torch.testing.assert_close(q.mean, loc)
    torch.testing.assert_close(q.mode, loc)
    torch.testing.assert_close(q.variance, as_map(cov.diagonal(dim1=-2, dim2=-1), c, h, w))
    torch.testing.assert_close(q.stddev, std)


# --- 6. the 2-D structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (3,)])
def test_zero_rho_with_per_position_scale_is_the_diagonal_gaussian(batch):
    c, h, w = 2, 3, 4
    g = torch.Generator().manual_seed(15)
    loc = torch.randn(batch + (c, h, w), generator=g, dtype=F64)
    scale = torch.rand(batch + (c, h, w), generator=g, dtype=F64) + 0.1
    zeros = torch.zeros(batch + (c,), dtype=F64)
    q = SeparableAR1Normal(loc, zeros, zeros, scale)
    diag = Independent(Normal(loc, scale), 3)
    z = torch.randn((5,) + batch + (c, h, w), generator=g, dtype=F64)
    torch.testing.assert_close(q.log_prob(z), diag.log_prob(z))
    torch.testing.assert_close(q.entropy(), diag.entropy())
    std = Independent(Normal(torch.zeros(c, h, w, dtype=F64), torch.ones(c, h, w, dtype=F64)), 3)
    torch.testing.assert_close(kl_divergence(q, StandardNormal((c, h, w))), kl_divergence(diag, std))
    other = Independent(Normal(loc.flip(-1) + 1, scale.flip(-2)), 3)
    torch.testing.assert_close(kl_divergence(other, q), kl_divergence(other, diag))
    torch.manual_seed(0)
    zq = q.rsample()
    torch.manual_seed(0)
    torch.testing.assert_close(zq, diag.rsample())


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("axis", ["row", "column"])
def test_single_row_or_column_is_a_1d_ar1(per_position, axis):
    # H = 1: an AR(1) along the columns of each channel, rho_rows irrelevant; W = 1: along the rows.
    c, n = 3, 6
    h, w = (1, n) if axis == "row" else (n, 1)
    loc, rho_rows, rho_cols, scale, _ = params((4,), c, h, w, per_position, seed=16)
    q = SeparableAR1Normal(loc, rho_rows, rho_cols, scale)
    rho = rho_cols if axis == "row" else rho_rows
    flat_scale = scale.reshape(4, c, n) if per_position else scale[..., None]
    ar1 = Independent(AR1Normal(loc.reshape(4, c, n), rho[..., None], flat_scale), 1)
    z = torch.randn(2, 4, c, h, w, dtype=F64)
    assert_rel(q.log_prob(z), ar1.log_prob(z.reshape(2, 4, c, n)))
    assert_rel(q.entropy(), ar1.entropy())
    kl_1d = kl_divergence(ar1.base_dist, StandardNormal(n)).sum(-1)
    assert_rel(kl_divergence(q, StandardNormal((c, h, w))), kl_1d)
    # the irrelevant correlation changes nothing
    other = -0.3 * torch.ones(4, c, dtype=F64)
    q2 = (
        SeparableAR1Normal(loc, other, rho_cols, scale)
        if axis == "row"
        else SeparableAR1Normal(loc, rho_rows, other, scale)
    )
    assert_rel(q2.log_prob(z), q.log_prob(z))
    # and the same noise gives the same sample
    torch.manual_seed(1)
    zq = q.rsample((2,))
    torch.manual_seed(1)
    torch.testing.assert_close(zq.reshape(2, 4, c, n), ar1.rsample((2,)), rtol=1e-12, atol=1e-12)


def test_per_channel_scale_is_not_mistaken_for_per_position():
    c, h, w = 2, 3, 2
    loc = torch.zeros(c, h, c, h, w, dtype=F64)  # batch shape (C, H) = (2, 3), event (2, 3, 2)
    scale = torch.tensor([1.0, 3.0], dtype=F64)
    q = SeparableAR1Normal(loc, torch.zeros(c, dtype=F64), torch.zeros(c, dtype=F64), scale)
    assert q.batch_shape == (c, h)
    ref = Independent(Normal(loc, scale[:, None, None].expand(c, h, w)), 3)
    z = torch.randn(c, h, c, h, w, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(q.variance[0, 0], ref.variance[0, 0])
    torch.testing.assert_close(q.log_prob(z), ref.log_prob(z))
    assert not q.per_position_scale


# --- hypothesis: laws that hold for every valid input ---------------------------------------------------

rhos = st.floats(-0.99, 0.99, allow_nan=False)
log_scales = st.floats(-2, 2, allow_nan=False)
locs = st.floats(-3, 3, allow_nan=False)


def _tensor(draw, elements, shape):
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=F64).reshape(shape)


@st.composite
def separable_params(draw, shape=None):
    c, h, w = shape or (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    per_position = draw(st.booleans())
    loc = _tensor(draw, locs, (c, h, w))
    rho_rows, rho_cols = _tensor(draw, rhos, (c,)), _tensor(draw, rhos, (c,))
    scale = _tensor(draw, log_scales, (c, h, w) if per_position else (c,)).exp()
    std = scale if per_position else scale[:, None, None].expand(c, h, w)
    return loc, rho_rows, rho_cols, scale, std


@settings(max_examples=30, deadline=None)
@given(separable_params(), st.data())
def test_prop_log_prob_and_kl_to_standard_match_dense(p, data):
    loc, rho_rows, rho_cols, scale, std = p
    c, h, w = loc.shape
    q, ref = SeparableAR1Normal(loc, rho_rows, rho_cols, scale), dense_mvn(loc, rho_rows, rho_cols, std)
    z = _tensor(data.draw, locs, (c, h, w))
    assert_rel(q.log_prob(z), ref.log_prob(z.flatten()), rel=1e-7)
    kl = kl_divergence(q, StandardNormal((c, h, w)))
    assert float(kl) >= -1e-10
    assert_rel(kl, kl_divergence(ref, standard_mvn(c * h * w)), rel=1e-7)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_prop_kl_separable_nonnegative_zero_on_self_and_matches_dense(data):
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    lq, rrq, rcq, sq, stdq = data.draw(separable_params(shape))
    lp, rrp, rcp, sp, stdp = data.draw(separable_params(shape))
    q, p = SeparableAR1Normal(lq, rrq, rcq, sq), SeparableAR1Normal(lp, rrp, rcp, sp)
    kl = kl_divergence(q, p)
    assert float(kl) >= -1e-9
    assert abs(float(kl_divergence(q, q))) < 1e-9
    assert_rel(kl, kl_divergence(dense_mvn(lq, rrq, rcq, stdq), dense_mvn(lp, rrp, rcp, stdp)), rel=1e-6)
    diag = Independent(Normal(lq, stdq), 3)
    assert_rel(
        kl_divergence(diag, p), kl_divergence(diagonal_mvn(lq, stdq), dense_mvn(lp, rrp, rcp, stdp)), rel=1e-6
    )


@pytest.mark.parametrize("shape", [(2, 3, 40), (1, 35, 3), (1, 33, 34)])
def test_long_sides_take_the_scan_and_stay_exact(shape):
    """Sides beyond 32 are filtered by the parallel scan instead of the matrix of powers: the same
    sample as the dense Cholesky factors, and gradcheck through the scan's adjoint."""
    c, h, w = shape
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(2, c, h, w, generator=g, dtype=F64)
    rr, rc = (
        torch.rand(2, c, generator=g, dtype=F64) * 1.8 - 0.9,
        torch.rand(2, c, generator=g, dtype=F64) * 1.8 - 0.9,
    )
    scale = torch.rand(2, c, generator=g, dtype=F64) + 0.5
    q = SeparableAR1Normal(loc, rr, rc, scale)
    torch.manual_seed(4)
    z = q.rsample()
    torch.manual_seed(4)
    eps = torch.randn(2, c, h, w, dtype=F64)
    expected = loc + scale[..., None, None] * (
        ar1_cholesky(rr, h) @ eps @ ar1_cholesky(rc, w).transpose(-1, -2)
    )
    torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)

    def sample(rho_rows, rho_cols):
        torch.manual_seed(5)
        return SeparableAR1Normal(loc[:1, :1], rho_rows, rho_cols, scale[:1, :1]).rsample()

    args = (rr[:1, :1].clone().requires_grad_(), rc[:1, :1].clone().requires_grad_())
    assert torch.autograd.gradcheck(sample, args)
