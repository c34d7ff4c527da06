"""KL(diagonal Gaussian || AR(1) Gaussian) in closed form, and the delta-VAE committed rate it implies.

References are dense: covariances written from the definition ``s_j s_k rho^|j-k|`` and laws left to
torch's MultivariateNormal (docs/math.md eq. 11-12).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from rhovae.distributions import AR1Normal
from rhovae.errors import RhovaeError
from rhovae.model import ModelConfig, build_model
from rhovae.priors import FixedAR1Prior, committed_rate

F64 = torch.float64


def dense_ar1_covariance(rho: torch.Tensor, scale: torch.Tensor, d: int) -> torch.Tensor:
    """``rho (..., 1)``, ``scale (..., 1 or d)`` -> ``(..., d, d)`` with entries s_j s_k rho^|j-k|."""
    idx = torch.arange(d)
    lag = (idx[:, None] - idx[None, :]).abs().to(rho.dtype)
    sd = scale.expand(scale.shape[:-1] + (d,))
    return sd.unsqueeze(-1) * rho.unsqueeze(-1).pow(lag) * sd.unsqueeze(-2)


def dense_kl(mu, sigma, loc, rho, scale) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(loc, D T(rho) D)) by torch's dense MultivariateNormal pair."""
    d = mu.shape[-1]
    q = MultivariateNormal(mu, scale_tril=torch.diag_embed(sigma))
    p = MultivariateNormal(loc, covariance_matrix=dense_ar1_covariance(rho, scale, d))
    return kl_divergence(q, p)


def diagonal(mu: torch.Tensor, sigma: torch.Tensor) -> Independent:
    return Independent(Normal(mu, sigma), 1)


def optimum_sigma(alpha: float, d: int) -> torch.Tensor:
    """sigma_j = 1 / sqrt(P_jj), P = T(alpha)^-1 inverted densely."""
    t = dense_ar1_covariance(torch.tensor([alpha], dtype=F64), torch.ones(1, dtype=F64), d)
    return torch.linalg.inv(t).diagonal().rsqrt()


# --- the closed form against the dense KL ------------------------------------------------------------

SHAPES = [((), ()), ((3,), ()), ((), (3,)), ((3,), (3,)), ((2, 3), (3,))]


@pytest.mark.parametrize("d", [1, 2, 5, 17])
@pytest.mark.parametrize(("q_batch", "p_batch"), SHAPES)
@pytest.mark.parametrize("rho", [0.999, -0.999, 0.4])
@pytest.mark.parametrize("per_dim", [False, True])
def test_kl_matches_dense(d, q_batch, p_batch, rho, per_dim):
    g = torch.Generator().manual_seed(d * 100 + len(q_batch) * 10 + len(p_batch))
    mu = torch.randn(q_batch + (d,), generator=g, dtype=F64)
    sigma = 0.2 + torch.rand(q_batch + (d,), generator=g, dtype=F64)
    loc = torch.randn(p_batch + (d,), generator=g, dtype=F64)
    rho_t = torch.full(p_batch + (1,), rho, dtype=F64)
    scale = 0.5 + torch.rand(p_batch + ((d,) if per_dim else (1,)), generator=g, dtype=F64)
    kl = kl_divergence(diagonal(mu, sigma), AR1Normal(loc, rho_t, scale))
    assert kl.shape == torch.broadcast_shapes(q_batch, p_batch)
    batch = kl.shape
    ref = dense_kl(
        mu.expand(batch + (d,)),
        sigma.expand(batch + (d,)),
        loc.expand(batch + (d,)),
        rho_t.expand(batch + (1,)),
        scale.expand(batch + scale.shape[-1:]),
    )
    torch.testing.assert_close(kl, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("d", "per_dim"), [(1, False), (2, True), (5, False), (5, True)])
def test_kl_gradcheck(d, per_dim):
    g = torch.Generator().manual_seed(d)
    mu = torch.randn(3, d, generator=g, dtype=F64, requires_grad=True)
    sigma = (0.5 + torch.rand(3, d, generator=g, dtype=F64)).requires_grad_()
    loc = torch.randn(d, generator=g, dtype=F64, requires_grad=True)
    rho = torch.tensor([0.6], dtype=F64, requires_grad=True)
    scale = (0.5 + torch.rand(d if per_dim else 1, generator=g, dtype=F64)).requires_grad_()

    def kl(mu, sigma, loc, rho, scale):
        return kl_divergence(diagonal(mu, sigma), AR1Normal(loc, rho, scale))

    assert torch.autograd.gradcheck(kl, (mu, sigma, loc, rho, scale))


def test_kl_rejects_mismatched_event_shapes_and_non_normal_bases():
    p = AR1Normal(torch.zeros(4), torch.tensor([0.5]), torch.ones(1))
    with pytest.raises(ValueError):
        kl_divergence(diagonal(torch.zeros(3), torch.ones(3)), p)
    with pytest.raises(NotImplementedError):
        kl_divergence(Independent(Normal(torch.zeros(2, 4), torch.ones(2, 4)), 2), p)


# --- the committed rate --------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 8, 16, 32])
@pytest.mark.parametrize("alpha", [0.95, -0.5, 0.999, 0.0])
def test_committed_rate_is_the_dense_kl_at_the_analytic_optimum(d, alpha):
    sigma = optimum_sigma(alpha, d)
    mu = torch.zeros(d, dtype=F64)
    rho, ones = torch.tensor([alpha], dtype=F64), torch.ones(1, dtype=F64)
    ref = float(dense_kl(mu, sigma, mu, rho, ones))
    delta = committed_rate(alpha, d)
    assert delta == pytest.approx(ref, rel=1e-9, abs=1e-12)
    prior = FixedAR1Prior(d, alpha).double()()
    assert float(kl_divergence(diagonal(mu, sigma), prior)) == pytest.approx(delta, rel=1e-9, abs=1e-12)
    # the same diagonal written as an AR(1) Gaussian at rho = 0 meets the same floor through eq. 9-10
    as_ar1 = AR1Normal(mu, torch.zeros(1, dtype=F64), sigma)
    assert float(kl_divergence(as_ar1, prior)) == pytest.approx(delta, rel=1e-9, abs=1e-12)


def test_committed_rate_values():
    # docs/math.md §14's table and closed form
    assert committed_rate(0.95, 8) == pytest.approx(3.0935, abs=5e-5)
    assert committed_rate(0.95, 16) == pytest.approx(5.6661, abs=5e-5)
    assert committed_rate(0.95, 32) == pytest.approx(10.8115, abs=5e-5)
    assert committed_rate(0.95, 1) == 0.0 and committed_rate(0.0, 20) == 0.0
    assert committed_rate(0.6, 2) == pytest.approx(-0.5 * math.log(1 - 0.36))  # mutual information
    assert committed_rate(-0.7, 9) == committed_rate(0.7, 9)
    with pytest.raises(RhovaeError):
        committed_rate(1.0, 4)
    with pytest.raises(RhovaeError):
        committed_rate(0.5, 0)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_prop_diagonal_posteriors_never_beat_the_committed_rate(data):
    d = data.draw(st.integers(1, 20))
    alpha = data.draw(st.floats(-0.99, 0.99, allow_nan=False))
    mu = data.draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=d, max_size=d))
    log_sigma = data.draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=d, max_size=d))
    q = diagonal(torch.tensor(mu, dtype=F64), torch.tensor(log_sigma, dtype=F64).exp())
    kl = float(kl_divergence(q, FixedAR1Prior(d, alpha).double()()))
    assert kl >= committed_rate(alpha, d) - 1e-9


@pytest.mark.parametrize(("d", "alpha"), [(8, 0.95), (16, -0.9), (5, 0.5)])
def test_adam_converges_to_the_committed_rate_and_never_below(d, alpha):
    g = torch.Generator().manual_seed(d)
    starts = 16
    mu = (2 * torch.randn(starts, d, generator=g, dtype=F64)).requires_grad_()
    log_sigma = torch.randn(starts, d, generator=g, dtype=F64).requires_grad_()
    prior = FixedAR1Prior(d, alpha).double()()
    delta = committed_rate(alpha, d)
    steps = 2000
    # the mean's Hessian P has condition number ~ ((1 + |alpha|) / (1 - |alpha|))^2: a large step,
    # decayed geometrically, and a short second-moment memory reach the floor from every start
    opt = torch.optim.Adam([mu, log_sigma], lr=0.3, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1e-3 ** (t / steps))
    lowest = math.inf
    for _ in range(steps):
        kl = kl_divergence(diagonal(mu, log_sigma.exp()), prior)
        lowest = min(lowest, float(kl.detach().min()))
        opt.zero_grad()
        kl.sum().backward()
        opt.step()
        schedule.step()
    final = kl_divergence(diagonal(mu, log_sigma.exp()), prior).detach()
    assert lowest >= delta - 1e-9 and float(final.min()) >= delta - 1e-9
    assert (final - delta).abs().max() < 1e-3
    torch.testing.assert_close(
        log_sigma.exp().detach(), optimum_sigma(alpha, d).expand(starts, d), atol=1e-2, rtol=0
    )


@pytest.mark.parametrize("d", [1, 2, 8, 32])
@pytest.mark.parametrize("alpha", [0.95, -0.7])
def test_an_ar1_posterior_reaches_zero(d, alpha):
    """The floor binds factorised posteriors only: the AR(1) family contains the prior itself."""
    prior = FixedAR1Prior(d, alpha).double()()
    q = AR1Normal(torch.zeros(d, dtype=F64), torch.tensor([alpha], dtype=F64), torch.ones(1, dtype=F64))
    assert abs(float(kl_divergence(q, prior))) < 1e-12
    if d > 1:
        assert committed_rate(alpha, d) > 0.1


# --- through the model ------------------------------------------------------------------------------

CFG = ModelConfig(model="mlp", posterior="diagonal", prior="ar1", prior_rho=0.95, latent_dim=8, hidden=16)
SHAPE = (1, 6, 6)


def test_the_vae_uses_the_closed_form_and_pays_the_committed_rate():
    torch.manual_seed(0)
    model = build_model(CFG, SHAPE)
    assert isinstance(model.prior, FixedAR1Prior)
    x = (torch.rand(32, *SHAPE) > 0.5).float()
    out = model(x)
    assert out.kl_exact and out.kl.shape == (32,)
    assert float(out.kl.detach().min()) >= committed_rate(0.95, 8)
    # the per-sample closed form, against the dense law
    q, p = out.q, model.prior()
    ref = dense_kl(q.mean.double(), q.stddev.double(), p.loc.double(), p.rho.double(), p.scale.double())
    torch.testing.assert_close(out.kl.detach().double(), ref, rtol=1e-4, atol=1e-4)


def test_training_the_encoder_on_the_kl_alone_stops_at_the_committed_rate():
    torch.manual_seed(1)
    model = build_model(CFG, SHAPE).double()
    x = (torch.rand(16, *SHAPE) > 0.5).double()
    delta = committed_rate(0.95, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        kl = model(x).kl
        assert float(kl.detach().min()) >= delta - 1e-9
        opt.zero_grad()
        kl.mean().backward()
        opt.step()
    kl = model(x).kl.detach()
    assert float(kl.min()) >= delta - 1e-9
    # the encoder drives every sample towards the floor (53-63 nats above it at the start)
    assert float(kl.min()) < delta + 0.05 and float(kl.max()) < delta + 0.5
