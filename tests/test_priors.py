"""The priors: registry, the MADE autoregressive prior against dense Gaussians, and the Monte-Carlo KL."""

import math

import pytest
import torch
from dense_reference import dense_mvn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from rhovae.distributions import AR1Normal, StandardNormal
from rhovae.errors import RhovaeError
from rhovae.priors import MAP_PRIORS, PRIORS, MADENormal, MADEPrior, make_prior

D = 5


def linear_made(d: int, seed: int) -> tuple[MADEPrior, MultivariateNormal]:
    """A float64 MADE prior set to the linear-Gaussian autoregression z_t = b_t + sum_(s<t) A_ts z_s +
    sigma_t eps_t, and the same law written densely: z = (I - A)^-1 (b + diag(sigma) eps)."""
    g = torch.Generator().manual_seed(seed)
    a = (0.6 * torch.randn(d, d, generator=g, dtype=torch.float64)).tril(-1)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    log_sigma = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    prior = MADEPrior(d, hidden=16).double()
    with torch.no_grad():
        prior.direct.weight[:d] = a
        prior.out.bias[:d] = b
        prior.out.bias[d:] = log_sigma
    eye = torch.eye(d, dtype=torch.float64)
    inverse = torch.linalg.solve_triangular(eye - a, eye, upper=False).tril()  # exact zeros above
    dense = MultivariateNormal(inverse @ b, scale_tril=inverse * log_sigma.exp()[None, :])
    return prior, dense


@pytest.mark.parametrize("name", sorted(set(PRIORS) - {"ar1-2d"}))
def test_every_prior_has_the_protocol_shapes(name):
    p = make_prior(name, D)()
    assert p.event_shape == (D,) and p.batch_shape == ()
    assert p.sample((6,)).shape == (6, D)
    assert p.log_prob(torch.randn(3, D)).shape == (3,)
    assert p.log_prob(torch.randn(4, 3, D)).shape == (4, 3)


@pytest.mark.parametrize("name", MAP_PRIORS)
def test_every_map_prior_has_the_protocol_shapes(name):
    shape = (2, 3, 4)
    p = make_prior(name, 24, latent_shape=shape)()
    assert p.event_shape == shape and p.batch_shape == ()
    assert p.sample((6,)).shape == (6, *shape)
    assert p.log_prob(torch.randn(3, *shape)).shape == (3,)
    assert p.log_prob(torch.randn(4, 3, *shape)).shape == (4, 3)


def test_the_separable_prior_is_for_maps_only():
    with pytest.raises(RhovaeError, match="latent maps"):
        make_prior("ar1-2d", D)
    with pytest.raises(RhovaeError, match="no form over a latent map"):
        make_prior("made", 24, latent_shape=(2, 3, 4))


def test_unknown_prior_is_a_user_error():
    with pytest.raises(RhovaeError, match="made"):
        make_prior("nope", D)


def test_a_fresh_made_prior_is_exactly_the_standard_normal():
    torch.manual_seed(0)
    p = MADEPrior(D)()
    assert isinstance(p, MADENormal)
    z = 3 * torch.randn(7, D)
    torch.testing.assert_close(p.log_prob(z), StandardNormal(D).log_prob(z), rtol=0, atol=0)
    eps = torch.randn(7, D)
    torch.testing.assert_close(p.from_noise(eps), eps, rtol=0, atol=0)


def test_made_is_strictly_autoregressive():
    torch.manual_seed(1)
    prior = MADEPrior(D, hidden=12)
    for param in prior.parameters():
        torch.nn.init.normal_(param)
    jac = torch.autograd.functional.jacobian(lambda z: torch.cat(prior.conditionals(z)), torch.randn(D))
    for block in (jac[:D], jac[D:]):
        assert torch.count_nonzero(block.triu()) == 0  # output t sees z_<t only
        assert torch.count_nonzero(block.tril(-1)) > 0


def test_made_sample_is_the_sequential_ancestral_sample():
    torch.manual_seed(2)
    prior = MADEPrior(D, hidden=12)
    for param in prior.parameters():
        torch.nn.init.normal_(param, std=0.5)
    eps = torch.randn(4, D)
    z = torch.zeros(4, D)
    for t in range(D):  # one coordinate at a time, from the definition
        mu, log_sigma = prior.conditionals(z)
        z[:, t] = mu[:, t] + log_sigma[:, t].exp() * eps[:, t]
    torch.testing.assert_close(prior().from_noise(eps), z)


def test_made_rsample_carries_gradients_to_the_network():
    torch.manual_seed(3)
    prior = MADEPrior(D, hidden=12)
    for param in prior.parameters():
        torch.nn.init.normal_(param, std=0.3)
    prior().rsample((5,)).pow(2).sum().backward()
    for name, param in prior.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_linear_made_log_prob_equals_the_dense_gaussian():
    prior, dense = linear_made(D, seed=4)
    z = 2 * torch.randn(3, 6, D, dtype=torch.float64)
    torch.testing.assert_close(prior().log_prob(z), dense.log_prob(z))


def test_linear_made_samples_have_the_dense_moments():
    prior, dense = linear_made(D, seed=5)
    torch.manual_seed(5)
    n = 20000
    z = prior().sample((n,))
    assert z.shape == (n, D)
    cov = dense.covariance_matrix
    mean_se = (cov.diagonal() / n).sqrt()
    assert ((z.mean(0) - dense.mean).abs() < 5 * mean_se).all()
    # var(z_i z_j) for a Gaussian = C_ij^2 + C_ii C_jj (centred at the true mean)
    centred = z - dense.mean
    cov_se = ((cov.pow(2) + cov.diagonal()[:, None] * cov.diagonal()[None, :]) / n).sqrt()
    assert ((centred.T @ centred / n - cov).abs() < 5 * cov_se).all()


def test_no_closed_form_kl_is_registered_against_the_made_prior():
    q = Independent(Normal(torch.zeros(2, D), torch.ones(2, D)), 1)
    with pytest.raises(NotImplementedError):
        kl_divergence(q, MADEPrior(D)())


def _diagonal_posterior(b: int, d: int) -> tuple[Independent, MultivariateNormal]:
    g = torch.Generator().manual_seed(6)
    loc = torch.randn(b, d, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(b, d, generator=g, dtype=torch.float64)
    return Independent(Normal(loc, std), 1), MultivariateNormal(loc, scale_tril=torch.diag_embed(std))


def _ar1_posterior(b: int, d: int) -> tuple[AR1Normal, MultivariateNormal]:
    g = torch.Generator().manual_seed(7)
    loc = torch.randn(b, d, generator=g, dtype=torch.float64)
    rho = torch.tensor([[0.7], [-0.4], [0.2]], dtype=torch.float64)[:b]
    scale = 0.5 + torch.rand(b, 1, generator=g, dtype=torch.float64)
    return AR1Normal(loc, rho, scale), dense_mvn(loc, rho, scale)


@pytest.mark.parametrize("posterior", [_diagonal_posterior, _ar1_posterior])
def test_monte_carlo_kl_to_a_made_prior_is_unbiased(posterior):
    """The VAE's fallback log q(z) - log p(z), z ~ q, averaged, against the exact KL to the dense law."""
    b, n = 3, 20000
    q, q_dense = posterior(b, D)
    prior, p_dense = linear_made(D, seed=8)
    p = prior()
    with pytest.raises(NotImplementedError):
        kl_divergence(q, p)
    torch.manual_seed(9)
    z = q.sample((n,))
    estimates = q.log_prob(z) - p.log_prob(z)  # (n, b)
    exact = kl_divergence(q_dense, p_dense)  # torch's dense MVN || MVN
    se = estimates.std(0) / math.sqrt(n)
    assert ((estimates.mean(0) - exact).abs() < 5 * se).all()
    assert (exact > 1).all()  # a real divergence, not a trivial zero
