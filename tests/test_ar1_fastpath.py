"""The user's default path (validation on, ``Independent(Normal(0, 1), 1)`` prior) against the project's
fast path (``validate_args=False``, :class:`StandardNormal`) and a dense reference; the two filter
implementations (scan and Hankel product) against each other; argument validation."""

import math

import pytest
import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence

from rhovae.distributions import AR1Normal, StandardNormal
from rhovae.distributions import ar1 as ar1_module

B = 128


@pytest.fixture(autouse=True)
def torch_default_validation():
    """Every test here starts from torch's own default: argument validation on."""
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(True)
    yield
    Distribution.set_default_validate_args(previous)


@pytest.fixture(params=["dense", "scan"])
def filter_path(request, monkeypatch):
    """Run a test once with the Hankel product and once with the scan, whatever the problem size."""
    limit = 1 << 40 if request.param == "dense" else 0
    monkeypatch.setattr(ar1_module, "_DENSE_FILTER_MAX_ENTRIES", limit)
    return request.param


def leaves(d, per_dim=False, dtype=torch.float64, seed=0, batch=B):
    """Pre-activations as a VAE head produces them: rho = tanh(a), scale = exp(log_s / 2)."""
    g = torch.Generator().manual_seed(seed + d)
    loc = torch.randn(batch, d, generator=g, dtype=dtype).requires_grad_()
    rho_pre = (torch.randn(batch, 1, generator=g, dtype=dtype) * 1.5).requires_grad_()
    log_s = (torch.randn(batch, d if per_dim else 1, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return loc, rho_pre, log_s


def step(leaf, default_path, seed=3):
    """rsample + KL + backward as a user writes it; returns z, KL and the three leaf gradients."""
    loc, rho_pre, log_s = leaf
    d = loc.shape[-1]
    rho, scale = torch.tanh(rho_pre), torch.exp(0.5 * log_s)
    if default_path:
        q = AR1Normal(loc, rho, scale)
        prior = Independent(Normal(torch.zeros(d, dtype=loc.dtype), torch.ones(d, dtype=loc.dtype)), 1)
    else:
        q = AR1Normal(loc, rho, scale, validate_args=False)
        prior = StandardNormal(d, dtype=loc.dtype)
    torch.manual_seed(seed)
    z = q.rsample()
    kl = kl_divergence(q, prior)
    grads = torch.autograd.grad(z.pow(2).sum() + kl.sum(), leaf)
    return z.detach(), kl.detach(), grads


def dense_step(leaf, seed=3):
    """The same step through a dense MultivariateNormal built from C_jk = s_j s_k rho^|j-k|."""
    loc, rho_pre, log_s = leaf
    d = loc.shape[-1]
    rho, scale = torch.tanh(rho_pre), torch.exp(0.5 * log_s).expand(loc.shape)
    lag = (torch.arange(d)[:, None] - torch.arange(d)[None, :]).abs().to(loc.dtype)
    cov = scale.unsqueeze(-1) * rho.unsqueeze(-1).pow(lag) * scale.unsqueeze(-2)
    q = MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(cov))
    torch.manual_seed(seed)
    eps = torch.randn(loc.shape, dtype=loc.dtype)
    z = loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    std = MultivariateNormal(torch.zeros(d, dtype=loc.dtype), torch.eye(d, dtype=loc.dtype))
    kl = kl_divergence(q, std)
    grads = torch.autograd.grad(z.pow(2).sum() + kl.sum(), leaf)
    return z.detach(), kl.detach(), grads


@pytest.mark.parametrize("d", [1, 2, 10, 64, 256])
@pytest.mark.parametrize("per_dim", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_path_equals_fast_path_exactly(d, per_dim, dtype):
    leaf = leaves(d, per_dim, dtype)
    z, kl, grads = step(leaf, default_path=True)
    z_fast, kl_fast, grads_fast = step(leaf, default_path=False)
    assert torch.equal(z, z_fast) and torch.equal(kl, kl_fast)
    for g, g_fast in zip(grads, grads_fast, strict=True):
        assert torch.equal(g, g_fast)


@pytest.mark.parametrize("d", [1, 2, 3, 10, 33])
@pytest.mark.parametrize("per_dim", [False, True])
def test_default_path_matches_dense_reference(d, per_dim, filter_path):
    leaf = leaves(d, per_dim, batch=16)
    z, kl, grads = step(leaf, default_path=True)
    z_ref, kl_ref, grads_ref = dense_step(leaf)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("d", [2, 3, 10, 17, 64])
@pytest.mark.parametrize("per_dim", [False, True])
def test_dense_and_scan_filters_agree(d, per_dim, monkeypatch):
    leaf = leaves(d, per_dim, batch=8)
    monkeypatch.setattr(ar1_module, "_DENSE_FILTER_MAX_ENTRIES", 1 << 40)
    dense = step(leaf, default_path=True)
    monkeypatch.setattr(ar1_module, "_DENSE_FILTER_MAX_ENTRIES", 0)
    scan = step(leaf, default_path=True)
    for a, b in zip(dense[:2] + dense[2], scan[:2] + scan[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_small_problems_take_the_dense_filter_and_large_ones_the_scan():
    assert ar1_module._use_dense_filter(torch.empty(B, 10))
    assert not ar1_module._use_dense_filter(torch.empty(B, 64))


@pytest.mark.parametrize("d", [1, 2, 5, 33])
@pytest.mark.parametrize("per_dim", [False, True])
def test_rsample_gradcheck_on_both_filters(d, per_dim, filter_path):
    loc = torch.randn(1, d, dtype=torch.float64, requires_grad=True)  # broadcast over the batch
    rho = torch.tensor([[-0.99], [0.0], [0.6], [0.99]], dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(4, d if per_dim else 1, dtype=torch.float64) + 0.5).requires_grad_()

    def sample(loc, rho, scale):
        torch.manual_seed(9)
        return AR1Normal(loc, rho, scale).rsample((3,))

    assert torch.autograd.gradcheck(sample, (loc, rho, scale))


@pytest.mark.parametrize("pre_activation", [-8.0, 8.0])
def test_float32_near_unit_rho_is_finite_on_both_filters(pre_activation, filter_path):
    d = 64
    a = torch.full((4, 1), pre_activation, requires_grad=True)
    loc = torch.randn(4, d, requires_grad=True)
    q = AR1Normal(loc, torch.tanh(a), torch.ones(4, 1))
    z = q.rsample()
    prior = Independent(Normal(torch.zeros(d), torch.ones(d)), 1)
    (z.pow(2).sum() + kl_divergence(q, prior).sum()).backward()
    assert torch.isfinite(z).all() and torch.isfinite(a.grad).all() and torch.isfinite(loc.grad).all()


# --- the standard-normal prior recognised in the registered KL --------------------------------------


def dense_kl(q, prior_loc, prior_std):
    d = q.event_shape[0]
    ref = MultivariateNormal(q.loc, q.covariance_matrix)
    return kl_divergence(ref, MultivariateNormal(prior_loc.expand(d), torch.diag(prior_std.expand(d) ** 2)))


@pytest.mark.parametrize(
    "prior_loc, prior_std",
    [(0.0, 2.0), (0.5, 1.0), (0.0, 1.0 + 1e-12), ([0.0, 0.0, 0.0, 1e-3], 1.0), (0.0, [1.0, 1.0, 1.0, 0.5])],
)
def test_non_standard_independent_prior_keeps_the_general_formula(prior_loc, prior_std):
    d = 4
    p_loc = torch.as_tensor(prior_loc, dtype=torch.float64).expand(d).clone()
    p_std = torch.as_tensor(prior_std, dtype=torch.float64).expand(d).clone()
    q = AR1Normal(
        torch.randn(5, d, dtype=torch.float64),
        torch.full((5, 1), 0.7, dtype=torch.float64),
        torch.rand(5, d, dtype=torch.float64) + 0.5,
    )
    kl = kl_divergence(q, Independent(Normal(p_loc, p_std), 1))
    torch.testing.assert_close(kl, dense_kl(q, p_loc, p_std), rtol=1e-10, atol=1e-12)
    assert not torch.equal(kl, kl_divergence(q, StandardNormal(d, dtype=torch.float64)))


def test_mvn_prior_edited_in_place_is_looked_at_again():
    d = 4
    q = AR1Normal(
        torch.randn(3, d, dtype=torch.float64),
        torch.full((3, 1), 0.6, dtype=torch.float64),
        torch.full((3, 1), 1.4, dtype=torch.float64),
    )
    prior = MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    standard = kl_divergence(q, StandardNormal(d, dtype=torch.float64))
    assert torch.equal(kl_divergence(q, prior), standard)
    prior.loc[0] = -0.5
    expected = kl_divergence(MultivariateNormal(q.loc, q.covariance_matrix), prior)
    torch.testing.assert_close(kl_divergence(q, prior), expected, rtol=1e-10, atol=1e-12)


def test_prior_edited_in_place_is_looked_at_again():
    d = 6
    q = AR1Normal(
        torch.randn(3, d, dtype=torch.float64),
        torch.full((3, 1), -0.4, dtype=torch.float64),
        torch.full((3, 1), 0.8, dtype=torch.float64),
    )
    p_loc, p_std = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    prior = Independent(Normal(p_loc, p_std), 1)
    standard = kl_divergence(q, StandardNormal(d, dtype=torch.float64))
    assert torch.equal(kl_divergence(q, prior), standard)  # recognised (and remembered) as standard
    p_loc[2] = 0.25  # an in-place edit: the verdict must not outlive it
    torch.testing.assert_close(kl_divergence(q, prior), dense_kl(q, p_loc, p_std), rtol=1e-10, atol=1e-12)
    p_loc.zero_()
    assert torch.equal(kl_divergence(q, prior), standard)
    p_std.mul_(2)
    torch.testing.assert_close(kl_divergence(q, prior), dense_kl(q, p_loc, p_std), rtol=1e-10, atol=1e-12)


def test_learnable_independent_prior_keeps_its_gradients():
    d = 5
    q = AR1Normal(
        torch.randn(3, d, dtype=torch.float64),
        torch.full((3, 1), 0.3, dtype=torch.float64),
        torch.ones(3, 1, dtype=torch.float64),
    )
    p_loc = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    p_std = torch.ones(d, dtype=torch.float64, requires_grad=True)
    kl_divergence(q, Independent(Normal(p_loc, p_std), 1)).sum().backward()
    torch.testing.assert_close(p_loc.grad, -q.loc.sum(0))  # d KL / d mu_p = -(mu_q - mu_p)
    assert p_std.grad is not None and p_std.grad.abs().sum() > 0


def test_standard_prior_with_a_batch_shape_broadcasts():
    d = 4
    q = AR1Normal(torch.randn(5, d), torch.full((5, 1), 0.2), torch.ones(5, 1))
    batched = Independent(Normal(torch.zeros(3, 1, d), torch.ones(3, 1, d)), 1)
    kl = kl_divergence(q, batched)
    assert kl.shape == (3, 5)
    torch.testing.assert_close(kl, kl_divergence(q, StandardNormal(d)).expand(3, 5))


def test_prior_built_under_inference_mode():
    d = 3
    with torch.inference_mode():
        prior = Independent(Normal(torch.zeros(d), torch.ones(d)), 1)
        q = AR1Normal(torch.randn(2, d), torch.full((2, 1), 0.5), torch.ones(2, 1))
        torch.testing.assert_close(kl_divergence(q, prior), kl_divergence(q, StandardNormal(d)))


# --- validation, on by default ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "loc, rho, scale, name",
    [
        (0.0, 1.0, 1.0, "rho"),
        (0.0, -1.0, 1.0, "rho"),
        (0.0, 1.5, 1.0, "rho"),
        (0.0, float("nan"), 1.0, "rho"),
        (0.0, 0.0, 0.0, "scale"),
        (0.0, 0.0, -1.0, "scale"),
        (0.0, 0.0, float("nan"), "scale"),
        (float("nan"), 0.0, 1.0, "loc"),
    ],
)
def test_bad_arguments_raise_by_default(loc, rho, scale, name):
    locs = torch.zeros(4, 3)
    locs[2, 1] = loc  # one bad element among good ones
    rhos, scales = torch.zeros(4, 1), torch.ones(4, 1)
    rhos[1, 0], scales[3, 0] = rho, scale
    with pytest.raises(ValueError, match=f"parameter {name}"):
        AR1Normal(locs, rhos, scales)
    with pytest.raises(ValueError, match=f"parameter {name}"):  # a per-dimension scale, too
        AR1Normal(locs, rhos, scales.expand(4, 3).clone())
    AR1Normal(locs, rhos, scales, validate_args=False)  # and only when validating
    Distribution.set_default_validate_args(False)
    AR1Normal(locs, rhos, scales)


def test_infinite_loc_is_valid_as_in_torch():
    # torch's real constraint admits +-inf; a sum of +inf and -inf is NaN, which must not be mistaken for one
    AR1Normal(torch.tensor([[math.inf, -math.inf, 0.0]]), torch.zeros(1, 1), torch.ones(1, 1))


def test_empty_batch_is_valid():
    q = AR1Normal(torch.zeros(0, 3), torch.zeros(0, 1), torch.ones(0, 1))
    assert q.rsample().shape == (0, 3)


def test_validate_args_none_follows_the_default_at_use_time():
    q = AR1Normal(torch.zeros(1, 2), torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError):
        q.log_prob(torch.tensor([[math.nan, 0.0]]))
    Distribution.set_default_validate_args(False)
    assert torch.isnan(q.log_prob(torch.tensor([[math.nan, 0.0]]))).all()
    pinned = AR1Normal(torch.zeros(1, 2), torch.zeros(1, 1), torch.ones(1, 1), validate_args=True)
    with pytest.raises(ValueError):
        pinned.log_prob(torch.tensor([[math.nan, 0.0]]))


# --- the fused Functions stay once-differentiable -----------------------------------------------------


@pytest.mark.parametrize("which", ["rsample", "kl"])
def test_second_derivative_through_fused_functions_raises(which):
    loc, rho_pre, log_s = leaves(4, batch=3)
    q = AR1Normal(loc, torch.tanh(rho_pre), torch.exp(0.5 * log_s))
    out = q.rsample() if which == "rsample" else kl_divergence(q, StandardNormal(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.pow(2).sum(), rho_pre, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_validation_off_the_cpu_does_not_wait_for_values():
    # Meta tensors have no values: a host read (as in torch's own check) raises, a queued assertion does not.
    meta = {"device": "meta"}
    q = AR1Normal(torch.zeros(3, 4, **meta), torch.zeros(3, 1, **meta), torch.ones(3, 1, **meta))
    assert q.rsample().shape == (3, 4)
