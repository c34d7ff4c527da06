"""BandedNormal and the GP prior over trajectories against independent dense references (float64).

The reference for BandedNormal is torch's MultivariateNormal with ``precision_matrix = B^T B``, ``B``
written entry by entry from its definition (B[i, i] = diagonal[i], B[i, i+1] = upper[i]); every KL is
checked against torch's dense MVN-MVN KL. Nothing in the references calls rhovae.
"""

import math
from fractions import Fraction

import pytest
import torch
from dense_reference import toeplitz_ar1
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence
from torch.distributions.kl import _dispatch_kl

from rhovae.distributions import AR1Normal, StandardNormal
from rhovae.distributions import banded as banded_module
from rhovae.distributions.banded import BandedNormal, reverse_affine_scan
from rhovae.distributions.gp import GaussianProcessPrior, cauchy_kernel
from rhovae.errors import RhovaeError

F64 = torch.float64
FRAMES = [1, 2, 5, 16]
BATCHES = [(), (3,)]
REL = 1e-9


def params(batch, t, seed=0):
    """loc ~ N(0, 1), diagonal in [0.5, 1.5), upper ~ N(0, 1): ``batch + (T,)``, ``batch + (T - 1,)``."""
    g = torch.Generator().manual_seed(seed * 1000 + t)
    loc = torch.randn(batch + (t,), generator=g, dtype=F64)
    diagonal = 0.5 + torch.rand(batch + (t,), generator=g, dtype=F64)
    upper = torch.randn(batch + (t - 1,), generator=g, dtype=F64)
    return loc, diagonal, upper


def dense_factor(diagonal, upper):
    """B, ``(..., T, T)`` float64, from nested loops over the flattened batch."""
    t = diagonal.shape[-1]
    n = math.prod(diagonal.shape[:-1])
    flat_d, flat_u = diagonal.double().reshape(n, t), upper.double().reshape(n, t - 1)
    mats = []
    for d, u in zip(flat_d.tolist(), flat_u.tolist(), strict=True):
        rows = [[d[i] if j == i else (u[i] if j == i + 1 else 0.0) for j in range(t)] for i in range(t)]
        mats.append(torch.tensor(rows, dtype=F64))
    return torch.stack(mats).reshape(diagonal.shape + (t,))


def dense(loc, diagonal, upper):
    b = dense_factor(diagonal, upper)
    return MultivariateNormal(loc.double(), precision_matrix=b.mT @ b)


def assert_rel(actual, expected, rel=REL):
    expected = expected.to(actual.dtype)
    if expected.numel() == 0:
        assert actual.shape == expected.shape
        return
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().clamp(min=1.0))


# --- the law itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t", FRAMES)
@pytest.mark.parametrize("batch", BATCHES)
def test_log_prob_entropy_moments_match_dense(t, batch):
    loc, diagonal, upper = params(batch, t)
    q, ref = BandedNormal(loc, diagonal, upper), dense(loc, diagonal, upper)
    assert q.batch_shape == batch and q.event_shape == (t,)
    z = ref.sample((4,)) + torch.randn((4,) + batch + (t,), dtype=F64)
    assert_rel(q.log_prob(z), ref.log_prob(z))
    assert q.log_prob(z).shape == (4,) + batch
    assert_rel(q.entropy(), ref.entropy())
    assert q.entropy().shape == batch
    assert_rel(q.mean, ref.mean)
    assert_rel(q.variance, ref.variance)
    assert_rel(q.stddev, ref.stddev)
    assert_rel(q.covariance_matrix, ref.covariance_matrix)
    assert_rel(q.precision_matrix, ref.precision_matrix)
    _, cross = q.covariance_band
    assert_rel(cross, ref.covariance_matrix.diagonal(offset=1, dim1=-2, dim2=-1))
    assert_rel(q.log_det_covariance, torch.logdet(ref.covariance_matrix))


def test_reverse_affine_scan_matches_the_loop():
    g = torch.Generator().manual_seed(3)
    for t in (1, 2, 3, 7, 8, 9, 33, 64):
        a = torch.randn(2, 3, t, generator=g, dtype=F64)
        c = torch.randn(3, t - 1, generator=g, dtype=F64)
        expected = a.clone()
        for i in range(t - 2, -1, -1):
            expected[..., i] = a[..., i] + c[:, i] * expected[..., i + 1]
        assert_rel(reverse_affine_scan(a, c), expected, rel=1e-12)


def test_one_frame_is_a_normal_with_precision_d_squared():
    loc, diagonal = torch.tensor([[0.3], [-1.0]], dtype=F64), torch.tensor([[2.0], [0.5]], dtype=F64)
    q = BandedNormal(loc, diagonal, torch.zeros(2, 0, dtype=F64))
    ref = Normal(loc, 1 / diagonal)
    z = torch.tensor([[[0.1], [2.0]]], dtype=F64)
    assert_rel(q.log_prob(z), ref.log_prob(z).sum(-1))
    assert_rel(q.variance, ref.variance)
    assert q.rsample((5,)).shape == (5, 2, 1)
    assert_rel(kl_divergence(q, StandardNormal(1)), kl_divergence(ref, Normal(0.0, 1.0)).sum(-1))


@pytest.mark.parametrize("sample_shape", [(), (1,), (2,), (2, 3)])
@pytest.mark.parametrize("t", [1, 5])
def test_sample_shapes(sample_shape, t):
    q = BandedNormal(*params((3,), t))
    z = q.rsample(sample_shape)
    assert z.shape == torch.Size(sample_shape) + (3, t)
    assert q.sample(sample_shape).shape == z.shape
    assert q.log_prob(z).shape == torch.Size(sample_shape) + (3,)


def test_rsample_moments():
    """N = 40000 draws: each mean within 5 standard errors sqrt(S_ii / N), each covariance entry within
    5 standard errors sqrt((S_ii S_jj + S_ij^2) / N) (Gaussian fourth moments)."""
    n, t = 40_000, 5
    loc, diagonal, upper = params((2,), t, seed=1)
    q, ref = BandedNormal(loc, diagonal, upper), dense(loc, diagonal, upper)
    torch.manual_seed(0)
    z = q.rsample((n,))
    cov = ref.covariance_matrix
    var = cov.diagonal(dim1=-2, dim2=-1)
    assert ((z.mean(0) - loc).abs() <= 5 * (var / n).sqrt()).all()
    centred = z - loc
    empirical = torch.einsum("nbi,nbj->bij", centred, centred) / n
    se = ((var.unsqueeze(-1) * var.unsqueeze(-2) + cov.pow(2)) / n).sqrt()
    assert ((empirical - cov).abs() <= 5 * se).all()


# --- strong correlation: |upper| comparable to or far above the diagonal --------------------------------


def exact_reference(loc, diagonal, upper, z):
    """Exact rational arithmetic on the float64 inputs, one batch element: the variances (the row sums of
    the squares of B^-1, by back substitution on each unit vector) and log q(z) (B w by definition)."""
    t = loc.shape[-1]
    d = [Fraction(v) for v in diagonal.tolist()]
    u = [Fraction(v) for v in upper.tolist()]
    inverse = [[Fraction(0)] * t for _ in range(t)]  # inverse[i][j] = (B^-1)[i, j]
    for j in range(t):
        x = [Fraction(0)] * t
        for i in range(t - 1, -1, -1):
            x[i] = ((1 if i == j else 0) - (u[i] * x[i + 1] if i < t - 1 else 0)) / d[i]
        for i in range(t):
            inverse[i][j] = x[i]
    variance = [float(sum(v * v for v in row)) for row in inverse]
    log_probs = []
    for sample in z.tolist():
        w = [Fraction(a) - Fraction(b) for a, b in zip(sample, loc.tolist(), strict=True)]
        e = [d[i] * w[i] + (u[i] * w[i + 1] if i < t - 1 else 0) for i in range(t)]
        mahalanobis = float(sum(v * v for v in e))
        log_det = sum(math.log(v) for v in diagonal.tolist())
        log_probs.append(log_det - 0.5 * (t * math.log(2 * math.pi) + mahalanobis))
    return torch.tensor(variance, dtype=F64), torch.tensor(log_probs, dtype=F64)


@pytest.mark.parametrize("ratio", [-0.999, 1.0, 3.0])
def test_strong_correlation_is_finite_and_accurate(ratio):
    """upper = ratio * diagonal, T = 16: neighbours correlated near +-1 (a random walk at -0.999), or
    variances growing like ratio^(2 (T - i)) backwards in time (ratio 3: Var z_0 ~ 1e14, where the
    covariance is too ill-conditioned for a dense float64 reference, so the reference is exact rational
    arithmetic)."""
    t = 16
    loc, diagonal, _ = params((3,), t, seed=2)
    upper = ratio * diagonal[..., :-1]
    q = BandedNormal(loc, diagonal, upper)
    torch.manual_seed(1)
    z = q.rsample((2,))
    assert torch.isfinite(z).all()
    q32 = BandedNormal(loc.float(), diagonal.float(), upper.float())
    for b in range(3):
        variance, log_prob = exact_reference(loc[b], diagonal[b], upper[b], z[:, b])
        assert_rel(q.variance[b], variance, rel=1e-12)
        assert_rel(q.log_prob(z)[:, b], log_prob, rel=1e-8)
        kl_standard = 0.5 * (variance.sum() + loc[b].pow(2).sum() - t) + diagonal[b].log().sum()
        assert_rel(kl_divergence(q, StandardNormal(t))[b], kl_standard, rel=1e-12)
        # float32: the well-conditioned quantities stay accurate
        assert_rel(q32.variance[b], variance, rel=1e-5)
        assert_rel(kl_divergence(q32, StandardNormal(t))[b], kl_standard, rel=1e-5)
    assert_rel(q32.entropy(), q.entropy(), rel=1e-6)
    assert kl_divergence(q, q).abs().max() < 1e-12  # the sum-of-positive-terms trace (B5)
    assert kl_divergence(q32, q32).abs().max() < 1e-4
    assert torch.isfinite(q32.rsample((100,))).all()
    assert torch.isfinite(q32.log_prob(q32.rsample((10,)))).all()
    if abs(ratio) < 1.5:  # the dense reference is still well enough conditioned
        ref = dense(loc, diagonal, upper)
        assert_rel(q.log_prob(z), ref.log_prob(z), rel=1e-6)
        assert_rel(q.variance, ref.variance, rel=1e-6)


# --- closed-form KLs against the dense MVN KL ---------------------------------------------------------


def dense_standard(t):
    return MultivariateNormal(torch.zeros(t, dtype=F64), torch.eye(t, dtype=F64))


def random_spd(batch, t, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch + (t, t), generator=g, dtype=F64)
    return a @ a.mT / t + 0.5 * torch.eye(t, dtype=F64)


def kl_pairs(batch, t, seed=0):
    """(name, p, dense reference of p) for every registered prior family."""
    g = torch.Generator().manual_seed(seed + 17)
    m = torch.randn(batch + (t,), generator=g, dtype=F64)
    tau = 0.3 + torch.rand(batch + (t,), generator=g, dtype=F64)
    cov = random_spd(batch, t, seed)
    p_loc, p_diag, p_upper = params(batch, t, seed=seed + 5)
    rho = torch.full(batch + (1,), 0.7, dtype=F64)
    shared = torch.full(batch + (1,), 1.3, dtype=F64)
    per_frame = 0.5 + torch.rand(batch + (t,), generator=g, dtype=F64)

    def ar1_dense(scale):
        sd = scale.expand(batch + (t,))
        corr = toeplitz_ar1(0.7, t)
        return MultivariateNormal(m, sd.unsqueeze(-1) * corr * sd.unsqueeze(-2))

    return [
        ("standard", StandardNormal(t, dtype=F64), dense_standard(t)),
        ("diagonal", Independent(Normal(m, tau), 1), MultivariateNormal(m, torch.diag_embed(tau.pow(2)))),
        ("dense", MultivariateNormal(m, cov), MultivariateNormal(m, cov)),
        ("banded", BandedNormal(p_loc, p_diag, p_upper), dense(p_loc, p_diag, p_upper)),
        ("ar1-shared", AR1Normal(m, rho, shared), ar1_dense(shared)),
        ("ar1-per-frame", AR1Normal(m, rho, per_frame), ar1_dense(per_frame)),
    ]


@pytest.mark.parametrize("t", FRAMES)
@pytest.mark.parametrize("batch", BATCHES)
def test_kls_match_dense(t, batch):
    loc, diagonal, upper = params(batch, t, seed=3)
    q, ref = BandedNormal(loc, diagonal, upper), dense(loc, diagonal, upper)
    for name, p, p_ref in kl_pairs(batch, t):
        kl = kl_divergence(q, p)
        assert kl.shape == batch, name
        assert_rel(kl, kl_divergence(ref, p_ref), rel=1e-8)


def test_kl_broadcasts_batch_shapes():
    """q batched (3,), p unbatched and the reverse: the KL has the broadcast batch shape."""
    t = 5
    q = BandedNormal(*params((3,), t))
    for name, p, p_ref in kl_pairs((), t):
        assert_rel(kl_divergence(q, p), kl_divergence(dense(*params((3,), t)), p_ref), rel=1e-8)
        assert kl_divergence(q, p).shape == (3,), name
    q1 = BandedNormal(*params((), t))
    for name, p, p_ref in kl_pairs((3,), t):
        assert_rel(kl_divergence(q1, p), kl_divergence(dense(*params((), t)), p_ref), rel=1e-8)
        assert kl_divergence(q1, p).shape == p.batch_shape, name


def test_kl_dispatch_picks_the_specific_pairs():
    assert _dispatch_kl(BandedNormal, StandardNormal) is banded_module._kl_banded_standard
    assert _dispatch_kl(BandedNormal, Independent) is banded_module._kl_banded_independent
    assert _dispatch_kl(BandedNormal, MultivariateNormal) is banded_module._kl_banded_mvn
    assert _dispatch_kl(BandedNormal, BandedNormal) is banded_module._kl_banded_banded
    assert _dispatch_kl(BandedNormal, AR1Normal) is banded_module._kl_banded_ar1


def test_kl_refusals():
    q = BandedNormal(*params((), 5))
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(q, StandardNormal(4))
    with pytest.raises(NotImplementedError, match="Independent\\(Normal, 1\\)"):
        kl_divergence(q, Independent(torch.distributions.Laplace(torch.zeros(5), torch.ones(5)), 1))


# --- gradients ----------------------------------------------------------------------------------------


def leaves(batch, t, seed=0):
    return tuple(x.requires_grad_() for x in params(batch, t, seed=seed))


def fixed_noise_sample(loc, diagonal, upper):
    torch.manual_seed(0)  # the same noise on every call
    return BandedNormal(loc, diagonal, upper).rsample((3,))


@pytest.mark.parametrize("t", [1, 2, 5, 17])
def test_gradcheck_rsample_log_prob_moments(t):
    """T = 17 is past the loop limit: the fused sample's adjoint through the scan."""
    args = leaves((2,), t)

    def log_prob(loc, diagonal, upper):
        return BandedNormal(loc, diagonal, upper).log_prob(torch.linspace(-1, 1, t, dtype=F64))

    def moments(loc, diagonal, upper):
        q = BandedNormal(loc, diagonal, upper)
        return q.entropy(), q.variance, q.covariance_band[1]

    for fn in (fixed_noise_sample, log_prob, moments):
        assert torch.autograd.gradcheck(fn, args), fn.__name__
    if t <= 5:
        assert torch.autograd.gradgradcheck(moments, args)  # the scan is plain autograd: twice differentiable


@pytest.mark.parametrize("t", [16, 17, 40])
def test_sample_solves_b_z_equals_eps_on_both_sides_of_the_loop_limit(t):
    """Up to 16 frames the fused sample loops, beyond it scans: ``B (z - loc)`` is the noise drawn."""
    loc, diagonal, upper = params((2,), t, seed=8)
    torch.manual_seed(2)
    z = BandedNormal(loc, diagonal, upper).rsample((3,))
    torch.manual_seed(2)
    eps = torch.randn(3, 2, t, dtype=F64)
    b = dense_factor(diagonal, upper)
    assert_rel((b @ (z - loc).unsqueeze(-1)).squeeze(-1), eps, rel=1e-10)


def test_gradcheck_kls():
    t = 4
    args = leaves((2,), t, seed=4)
    p_args = leaves((2,), t, seed=5)
    m = torch.randn(2, t, dtype=F64, requires_grad=True)
    tau = (0.5 + torch.rand(2, t, dtype=F64)).requires_grad_()
    rho = torch.tensor([[0.6], [-0.4]], dtype=F64, requires_grad=True)
    scale = (0.5 + torch.rand(2, t, dtype=F64)).requires_grad_()
    tril = torch.linalg.cholesky(random_spd((2,), t, 6)).requires_grad_()
    priors = {
        "standard": ((), lambda: StandardNormal(t, dtype=F64)),
        "diagonal": ((m, tau), lambda m, tau: Independent(Normal(m, tau), 1)),
        "dense": ((m, tril), lambda m, tril: MultivariateNormal(m, scale_tril=tril.tril())),
        "banded": (p_args, lambda *a: BandedNormal(*a)),
        "ar1": ((m, rho, scale), lambda m, rho, scale: AR1Normal(m, rho, scale)),
    }
    for name, (p_leaves, make_p) in priors.items():

        def kl(*xs, make_p=make_p):
            return kl_divergence(BandedNormal(*xs[:3]), make_p(*xs[3:]))

        assert torch.autograd.gradcheck(kl, args + tuple(p_leaves)), name


# --- expand and validation ----------------------------------------------------------------------------


def test_expand():
    loc, diagonal, upper = params((), 5)
    q = BandedNormal(loc, diagonal, upper, validate_args=True)
    wide = q.expand((3,))
    assert wide.batch_shape == (3,) and wide.event_shape == (5,)
    assert wide._validate_args
    z = torch.randn(2, 3, 5, dtype=F64)
    assert_rel(wide.log_prob(z), q.log_prob(z))
    assert_rel(wide.variance, q.variance.expand(3, 5))
    assert wide.rsample((2,)).shape == (2, 3, 5)
    one = BandedNormal(*params((1,), 5))
    assert one.expand((4,)).log_prob(z[:, :1].expand(2, 4, 5)).shape == (2, 4)
    assert_rel(kl_divergence(wide, StandardNormal(5)), kl_divergence(q, StandardNormal(5)).expand(3))


def test_broadcast_batch_shapes_and_scalar_arguments():
    loc = torch.zeros(2, 1, 4, dtype=F64)
    q = BandedNormal(loc, torch.ones(3, 4, dtype=F64), torch.zeros(4, 3, dtype=F64)[:1])
    assert q.batch_shape == (2, 3)
    r = BandedNormal(torch.zeros(4, dtype=F64), 2.0, -1.0)
    assert_rel(
        r.precision_matrix,
        dense(torch.zeros(4), torch.full((4,), 2.0), torch.full((3,), -1.0)).precision_matrix,
    )


def _one_line_error(exc_type, match, *args, **kwargs):
    with pytest.raises(exc_type, match=match) as info:
        BandedNormal(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_validation_errors_are_one_line(monkeypatch):
    # under torch's own default (validation on), whatever an earlier test in the process set
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    loc, diagonal, upper = params((3,), 5)
    bad_diagonal = diagonal.clone()
    bad_diagonal[1, 2] = 0.0
    _one_line_error(
        ValueError, "diagonal has 1 invalid.*softplus", loc, bad_diagonal, upper, validate_args=True
    )
    nan_loc = loc.clone()
    nan_loc[0, 0] = math.nan
    _one_line_error(ValueError, "loc has 1 invalid", nan_loc, diagonal, upper, validate_args=True)
    nan_upper = upper.clone()
    nan_upper[2, 1] = math.nan
    _one_line_error(ValueError, "upper has 1 invalid", loc, diagonal, nan_upper, validate_args=True)
    # torch's default (validation on, as under pytest) applies when validate_args is not given
    _one_line_error(ValueError, "diagonal", loc, bad_diagonal, upper)
    BandedNormal(loc, bad_diagonal, upper, validate_args=False)  # refused only when validating
    _one_line_error(ValueError, "upper must have shape \\(\\.\\.\\., 4\\)", loc, diagonal, upper[..., :-1])
    _one_line_error(ValueError, "diagonal must have shape", loc, diagonal[..., :-1], upper)
    _one_line_error(ValueError, "loc must be a tensor", torch.tensor(1.0), diagonal, upper)
    _one_line_error(ValueError, "incompatible batch shapes", loc, diagonal[:2], upper)
    q = BandedNormal(loc, diagonal, upper, validate_args=True)
    with pytest.raises(ValueError):
        q.log_prob(torch.zeros(3, 4, dtype=F64))


# --- hypothesis: laws that hold for every valid input -------------------------------------------------


@st.composite
def banded(draw, t=None, max_upper=2.0):
    """T in 1..8, |loc| <= 3, diagonal in [0.3, 3], |upper| <= max_upper (2: variances up to ~1e11)."""
    t = draw(st.integers(1, 8)) if t is None else t

    def vector(low, high, n):
        return torch.tensor(draw(st.lists(st.floats(low, high), min_size=n, max_size=n)), dtype=F64)

    return BandedNormal(
        vector(-3, 3, t), vector(0.3, 3, t), vector(-max_upper, max_upper, t - 1).reshape(t - 1)
    )


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_kl_laws(data):
    """KL(q || q) = 0, KL(q || p) >= 0, KL(q || N(0, I)) >= 0, KL(q || AR(1)) >= 0."""
    q = data.draw(banded())
    t = q.num_frames
    p = data.draw(banded(t))
    assert abs(float(kl_divergence(q, q))) <= 1e-12 * t
    assert float(kl_divergence(q, p)) >= 0
    assert float(kl_divergence(q, StandardNormal(t, dtype=F64))) >= 0
    rho = torch.tensor([data.draw(st.floats(-0.99, 0.99))], dtype=F64)
    assert float(kl_divergence(q, AR1Normal(p.loc, rho, p.diagonal))) >= 0


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_kl_closed_form_equals_dense(data):
    """Where the dense float64 reference is well conditioned (|upper| <= 1: variances up to ~1e4)."""
    q = data.draw(banded(max_upper=1.0))
    p = data.draw(banded(q.num_frames, max_upper=1.0))
    reference = kl_divergence(dense(q.loc, q.diagonal, q.upper), dense(p.loc, p.diagonal, p.upper))
    assert_rel(kl_divergence(q, p), reference, rel=1e-8)


@settings(max_examples=30, deadline=None)
@given(banded())
def test_entropy_and_density_at_the_mean(q):
    """log q(loc) + H(q) = T / 2: both are -1/2 log det(2 pi Sigma) up to the constant."""
    assert_rel(q.log_prob(q.loc) + q.entropy(), torch.tensor(q.num_frames / 2, dtype=F64))
    assert (q.variance >= q.diagonal.pow(-2) * (1 - 1e-12)).all()  # (B4): S_i >= 1 / d_i^2


# --- the GP prior --------------------------------------------------------------------------------------


def test_cauchy_kernel_values_and_symmetry():
    times = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=F64)
    k = cauchy_kernel(times, length_scale=2.0, variance=1.5)
    expected = torch.tensor(
        [[1.5 / (1 + (a - b) ** 2 / 4.0) for b in times.tolist()] for a in times.tolist()], dtype=F64
    )
    assert_rel(k, expected, rel=1e-14)
    assert torch.equal(k, k.mT)
    assert_rel(k.diagonal(), torch.full((4,), 1.5, dtype=F64))
    assert float(cauchy_kernel(torch.tensor([0.0, 2.0]), 2.0, 1.0)[0, 1]) == pytest.approx(0.5)  # halves at l
    for bad in ({"length_scale": 0.0, "variance": 1.0}, {"length_scale": 1.0, "variance": -1.0}):
        with pytest.raises(RhovaeError, match=next(iter(k for k, v in bad.items() if v <= 0))):
            cauchy_kernel(times, **bad)


@pytest.mark.parametrize("t", [1, 10, 32, 64])
@pytest.mark.parametrize("length_scale", [2.0, 7.0, 20.0])
def test_kernel_plus_jitter_is_positive_definite(t, length_scale):
    """Every eigenvalue of K + jitter I is at least jitter (the kernel is PSD); float32 Cholesky succeeds."""
    prior = GaussianProcessPrior(t, 2, length_scale=length_scale)
    eigenvalues = torch.linalg.eigvalsh(prior.double().covariance)
    assert float(eigenvalues.min()) >= 1e-3 * (1 - 1e-6)
    assert int(torch.linalg.cholesky_ex(prior.float().covariance)[1]) == 0


def test_gp_prior_defaults_layout_and_log_det():
    prior = GaussianProcessPrior(10, 3).double()
    assert (prior.length_scale, prior.variance, prior.jitter) == (2.0, 1.0, 1e-3)  # GP-VAE, HMNIST
    p = prior()
    assert p.event_shape == (3, 10) and p.batch_shape == ()
    expected = cauchy_kernel(torch.arange(10, dtype=F64), 2.0, 1.0) + 1e-3 * torch.eye(10, dtype=F64)
    assert_rel(prior.covariance, expected, rel=1e-14)
    assert_rel(p.base_dist.covariance_matrix, expected.expand(3, 10, 10), rel=1e-12)
    assert_rel(p.mean, torch.zeros(3, 10, dtype=F64))
    assert_rel(prior.log_det(), 3 * torch.logdet(expected), rel=1e-12)
    assert p.log_prob(torch.zeros(5, 3, 10, dtype=F64)).shape == (5,)
    assert prior.float()().mean.dtype == torch.float32
    assert prior.state_dict() == {}


def test_gp_prior_kl_with_banded_posterior_matches_dense():
    batch, channels, t = 2, 3, 10
    prior = GaussianProcessPrior(t, channels).double()
    loc, diagonal, upper = params((batch, channels), t, seed=7)
    q = Independent(BandedNormal(loc, diagonal, upper), 1)
    kl = kl_divergence(q, prior())
    assert kl.shape == (batch,)
    k = cauchy_kernel(torch.arange(t, dtype=F64), 2.0, 1.0) + 1e-3 * torch.eye(t, dtype=F64)
    reference = kl_divergence(dense(loc, diagonal, upper), MultivariateNormal(torch.zeros(t, dtype=F64), k))
    assert_rel(kl, reference.sum(-1), rel=1e-9)


def test_gp_prior_refusals():
    for kwargs, match in (
        ({"num_frames": 0, "channels": 2}, "num_frames"),
        ({"num_frames": 4, "channels": 0}, "channels"),
        ({"num_frames": 4, "channels": 2, "length_scale": -1.0}, "length_scale"),
        ({"num_frames": 4, "channels": 2, "variance": 0.0}, "variance"),
        ({"num_frames": 4, "channels": 2, "jitter": -1e-3}, "jitter"),
    ):
        with pytest.raises(ValueError, match=match) as info:
            GaussianProcessPrior(**kwargs)
        assert "\n" not in str(info.value)
