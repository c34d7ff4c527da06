"""The posterior heads: one template for every registered family, plus family-specific laws."""

import pytest
import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence

from rhovae.config import RunConfig
from rhovae.distributions import AR1Normal
from rhovae.errors import RhovaeError
from rhovae.posteriors import HEADS, AR1GaussianHead, DiagonalGaussianHead, FullCovGaussianHead, make_head

H, D, B = 16, 5, 7
EXPECTED_OUTPUTS = {
    "diagonal": 2 * D,
    "ar1": D + 2,
    "ar1-diag": 2 * D + 1,
    "isotropic": D + 1,
    "full": 2 * D + D * (D - 1) // 2,
}


def std_normal(d):
    return Independent(Normal(torch.zeros(d), torch.ones(d)), 1)


def kl_or_monte_carlo(q, z):
    try:
        return kl_divergence(q, std_normal(q.event_shape[0]))
    except NotImplementedError:
        return q.log_prob(z) - std_normal(q.event_shape[0]).log_prob(z)


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("d", [1, D])
def test_every_head_yields_a_distribution_with_gradients(name, d):
    torch.manual_seed(0)
    head = make_head(name, H, d)
    q = head(torch.randn(B, H))
    assert isinstance(q, Distribution)
    assert q.batch_shape == (B,) and q.event_shape == (d,)
    z = q.rsample()
    assert z.shape == (B, d)
    loss = (z.pow(2).sum(-1) + kl_or_monte_carlo(q, z) - q.log_prob(z)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if d > 1 or not pname.startswith(("off_diagonal", "rho")):  # at d = 1, rho enters nothing
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(HEADS))
def test_parameter_counts(name):
    head = make_head(name, H, D)
    n = sum(p.numel() for p in head.parameters())
    assert n == (H + 1) * EXPECTED_OUTPUTS[name]


def test_ar1_head_has_the_two_scalar_heads():
    head = AR1GaussianHead(H, D)
    q = head(torch.randn(B, H))
    assert isinstance(q, AR1Normal) and q.rho.shape == (B, 1) and q.scale.shape == (B, 1)
    q2 = make_head("ar1-diag", H, D)(torch.randn(B, H))
    assert q2.scale.shape == (B, D)


@pytest.mark.parametrize("bias", [-1e4, -20.0, 20.0, 1e4])
def test_ar1_head_stays_finite_when_tanh_saturates(bias):
    head = AR1GaussianHead(H, 64)
    with torch.no_grad():
        head.rho.bias.fill_(bias)
    q = head(torch.randn(B, H))
    assert (q.rho.abs() < 1).all()
    z = q.rsample()
    loss = (kl_divergence(q, std_normal(64)) + q.log_prob(z) + z.pow(2).sum(-1)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_full_head_with_zero_off_diagonal_equals_diagonal_head():
    torch.manual_seed(1)
    full, diag = FullCovGaussianHead(H, D), DiagonalGaussianHead(H, D)
    with torch.no_grad():
        full.off_diagonal.weight.zero_()
        full.off_diagonal.bias.zero_()
        diag.loc.load_state_dict(full.loc.state_dict())
        diag.log_var.load_state_dict(full.log_var.state_dict())
    h = torch.randn(B, H)
    qf, qd = full(h), diag(h)
    z = torch.randn(3, B, D)
    torch.testing.assert_close(qf.log_prob(z), qd.log_prob(z))
    torch.testing.assert_close(kl_divergence(qf, std_normal(D)), kl_divergence(qd, std_normal(D)))


def test_isotropic_head_is_a_dense_gaussian_with_covariance_s_times_identity():
    torch.manual_seed(2)
    q = make_head("isotropic", H, D)(torch.randn(B, H))
    assert torch.equal(q.rho, torch.zeros(B, 1))
    s = q.scale.pow(2)  # (B, 1)
    dense = MultivariateNormal(q.loc, covariance_matrix=s[..., None] * torch.eye(D))
    z = torch.randn(3, B, D)
    torch.testing.assert_close(q.log_prob(z), dense.log_prob(z))
    torch.testing.assert_close(kl_divergence(q, std_normal(D)), kl_divergence(dense, std_normal(D)))


def test_full_head_covariance_is_lower_cholesky():
    q = FullCovGaussianHead(H, D)(torch.randn(B, H))
    tril = q.scale_tril
    assert torch.equal(tril, tril.tril()) and (tril.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_unknown_name_and_bad_sizes_raise_project_error():
    with pytest.raises(RhovaeError, match="unknown posterior 'ar2'.*ar1"):
        make_head("ar2", H, D)
    with pytest.raises(RhovaeError, match="latent-dim must be positive .*, got -3"):
        RunConfig(latent_dim=-3).validate()  # sizes are validated once, where settings enter
