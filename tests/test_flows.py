"""Flow posteriors: log-determinants against autograd Jacobians, MADE's autoregressive structure,
exact log-densities of own samples, and the zero-initialised limit."""

import pytest
import torch
from torch.autograd.functional import jacobian

from rhovae.config import RunConfig
from rhovae.distributions import AR1Normal
from rhovae.distributions.flows import FlowPosterior, IAFStep, PlanarStep, made_masks, reverse_order
from rhovae.errors import RhovaeError
from rhovae.model import ModelConfig, build_model
from rhovae.posteriors import FlowHead, make_head, posterior_statistics


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_planar_log_det_is_log_abs_det_jacobian_and_invertible(d):
    g = torch.Generator().manual_seed(d)
    for trial in range(20):
        u, w = torch.randn(d, generator=g) * 3, torch.randn(d, generator=g)
        if trial % 2:  # force w^T u < -1, where the raw map would not be invertible
            u = -3 * w / w.norm()
        step = PlanarStep(u, w, torch.randn(1, generator=g))
        assert float((step.w * step.u_hat).sum()) >= -1 - 1e-12
        z = torch.randn(d, generator=g) * 2
        jac = jacobian(lambda v, step=step: step(v)[0], z)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert float(sign) > 0  # orientation preserved: invertible everywhere
        torch.testing.assert_close(step(z)[1], logabsdet, rtol=1e-10, atol=1e-10)


def test_made_masks_are_strictly_autoregressive():
    for d in (1, 2, 5, 10):
        m_in, m_out = made_masks(d, 3 * d + 1)
        connectivity = m_out @ m_in  # (d, d): paths from input j to output i
        assert torch.all(connectivity.triu() == 0), d  # output i sees inputs j < i only
        if d > 1:
            assert connectivity[-1, :-1].min() > 0  # the last output sees every earlier input


@pytest.mark.parametrize("d", [1, 2, 4])
def test_iaf_step_jacobian_is_triangular_with_sigma_on_the_diagonal(d):
    torch.manual_seed(d)
    step = IAFStep(d, context_dim=3, hidden=8)
    for layer in (step.mean, step.gate):  # leave the zero initialisation so the test sees a real MADE
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    transform = step.bind(torch.randn(3))
    z = torch.randn(d)
    jac = jacobian(lambda v: transform(v)[0], z)
    assert torch.all(jac.triu(1) == 0)
    log_det = transform(z)[1]
    torch.testing.assert_close(log_det, torch.log(jac.diagonal()).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("flow", ["planar", "iaf"])
@pytest.mark.parametrize("base", ["diagonal", "ar1", "full"])
def test_log_prob_of_own_samples_is_change_of_variables(flow, base):
    torch.manual_seed(0)
    d, h_dim = 3, 6
    head = make_head(f"{base}+{flow}", h_dim, d, flow_steps=3)
    for p in head.parameters():  # move away from the initial values, IAF's zero layers included
        p.data.add_(0.3 * torch.randn_like(p))
    h = torch.randn(2, h_dim)
    q = head(h)
    torch.manual_seed(1)
    z = q.rsample((4,))
    log_q = q.log_prob(z)
    torch.manual_seed(1)
    z0 = q.base.rsample((4,))
    for b in range(2):
        transforms = head._transforms(h[b : b + 1])

        def push(v, transforms=transforms):
            v = v[None]
            for t in transforms:
                v = t(v)[0]
            return v[0]

        for s in range(4):
            torch.testing.assert_close(push(z0[s, b]), z[s, b])
            jac = jacobian(push, z0[s, b])
            expected = q.base.log_prob(z0)[s, b] - torch.linalg.slogdet(jac)[1]
            torch.testing.assert_close(log_q[s, b], expected, rtol=1e-9, atol=1e-9)


def test_log_prob_of_a_foreign_value_is_refused():
    q = make_head("planar", 4, 2)(torch.randn(3, 4))
    z = q.rsample()
    with pytest.raises(NotImplementedError, match="own samples"):
        q.log_prob(z.clone())


def test_zero_initialised_planar_flow_equals_its_base():
    head = make_head("ar1+planar", 5, 3, flow_steps=2)
    torch.nn.init.zeros_(head.planar.weight)
    torch.nn.init.zeros_(head.planar.bias)
    h = torch.randn(4, 5)
    q = head(h)
    torch.manual_seed(2)
    z = q.rsample()
    torch.manual_seed(2)
    base = head.base(h)
    z0 = base.rsample()
    torch.testing.assert_close(z, z0)
    torch.testing.assert_close(q.log_prob(z), base.log_prob(z0))
    assert isinstance(base, AR1Normal)
    # the family's statistics hook sees through the flow to its AR(1) base
    torch.testing.assert_close(posterior_statistics(q)["rho"], base.rho[..., 0])


def test_fresh_iaf_is_a_known_scaling_of_its_base():
    # zero last layers: each step is z -> sigmoid(1.5) z; with K = 3 there are two order reversals
    head = make_head("iaf", 5, 3, flow_steps=3)
    h = torch.randn(4, 5)
    q = head(h)
    torch.manual_seed(3)
    z = q.rsample()
    torch.manual_seed(3)
    z0 = head.base(h).rsample()
    sigma = torch.sigmoid(torch.tensor(1.5))
    torch.testing.assert_close(z, sigma**3 * z0)
    torch.testing.assert_close(q.log_prob(z), head.base(h).log_prob(z0) - 3 * 3 * torch.log(sigma))


def test_global_planar_steps_and_reverse_order():
    base = make_head("diagonal", 4, 3)
    head = FlowHead(base, "planar", steps=2, amortised=False)
    q = head(torch.randn(5, 4))
    z = q.rsample((2,))
    assert z.shape == (2, 5, 3) and q.log_prob(z).shape == (2, 5)
    v = torch.randn(2, 3)
    assert torch.equal(reverse_order(v)[0], v.flip(-1)) and torch.equal(reverse_order(v)[1], torch.zeros(2))


@pytest.mark.parametrize("name", ["planar", "iaf", "ar1+iaf", "diagonal+planar"])
def test_flow_posteriors_train_through_the_monte_carlo_kl(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(posterior=name, latent_dim=3, hidden=16, flow_steps=2), (1, 6, 6))
    x = torch.rand(8, 1, 6, 6)
    out = model(x)
    loss = out.recon + out.kl
    assert not out.kl_exact and torch.isfinite(loss).all()
    loss.mean().backward()
    flow_params = [p for n, p in model.head.named_parameters() if not n.startswith("base.")]
    assert flow_params and all(p.grad is not None for p in flow_params)
    # at initialisation IAF's gradient reaches its (zero) output layers first; planar's reaches everything
    assert sum(float(p.grad.abs().sum()) for p in flow_params) > 0
    assert model.iwae_bound(x, 20).shape == (8,)
    assert isinstance(model.posterior(x), FlowPosterior)


def test_unknown_flow_names():
    with pytest.raises(RhovaeError, match="unknown posterior 'ar1\\+nice'"):
        make_head("ar1+nice", 4, 2)
    with pytest.raises(RhovaeError, match="flow-steps must be positive"):
        RunConfig(posterior="iaf", flow_steps=0).validate()  # sizes are validated where settings enter
