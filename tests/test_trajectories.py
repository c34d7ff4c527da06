"""Posteriors and priors over latent trajectories (C channels over T frames, event (C, T)): every
family against every prior in closed form where one exists, checked against dense Gaussians."""

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from rhovae.errors import RhovaeError
from rhovae.posteriors import TRAJECTORY_HEADS, TrajectoryHead
from rhovae.priors import TRAJECTORY_PRIORS, make_trajectory_prior

C, T, F = 3, 6, 8


def _dense(dist) -> MultivariateNormal:
    """The trajectory distribution as one dense Gaussian over its flattened (C, T) event, built from
    each channel's own dense covariance (channels independent)."""
    inner = dist.base_dist
    if hasattr(inner, "covariance_matrix"):
        cov = inner.covariance_matrix  # (..., C, T, T)
    else:  # Independent(Normal, 1) per channel
        cov = torch.diag_embed(inner.variance)
    blocks = cov.reshape(-1, *cov.shape[-3:])
    dense = torch.stack([torch.block_diag(*b) for b in blocks]).reshape(*cov.shape[:-3], C * T, C * T)
    return MultivariateNormal(dist.mean.flatten(-2), covariance_matrix=dense)


@pytest.mark.parametrize("prior", TRAJECTORY_PRIORS)
@pytest.mark.parametrize("family", TRAJECTORY_HEADS)
def test_every_family_against_every_prior_is_the_dense_kl(family, prior):
    torch.manual_seed(0)
    head = TrajectoryHead(family, F, C, T).double()
    p_module = make_trajectory_prior(prior, C, T).double()
    if prior == "ar1":
        with torch.no_grad():
            p_module.rho_pre.copy_(torch.tensor([[0.7], [-0.4], [1.2]]))
            p_module.log_var.copy_(torch.tensor([[0.3], [-0.2], [0.1]]))
    q, p = head(torch.randn(4, T, F, dtype=torch.float64)), p_module()
    assert q.event_shape == (C, T) and q.batch_shape == (4,) and p.event_shape == (C, T)
    z = q.rsample()
    assert z.shape == (4, C, T)
    kl = kl_divergence(q, p)  # closed form for every pair
    dense_p = (
        _dense(p)
        if prior != "standard"
        else MultivariateNormal(
            torch.zeros(C * T, dtype=torch.float64), torch.eye(C * T, dtype=torch.float64)
        )
    )
    torch.testing.assert_close(kl, kl_divergence(_dense(q), dense_p), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(q.log_prob(z), _dense(q).log_prob(z.flatten(-2)), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("family", TRAJECTORY_HEADS)
def test_gradients_reach_every_head_parameter(family):
    torch.manual_seed(1)
    head = TrajectoryHead(family, F, C, T)
    q = head(torch.randn(5, T, F))
    (q.rsample().pow(2).sum() + kl_divergence(q, make_trajectory_prior("gp", C, T)()).sum()).backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_unknown_trajectory_family_and_prior_are_one_line():
    with pytest.raises(RhovaeError, match="no form over a trajectory"):
        TrajectoryHead("ar1-2d", F, C, T)
    with pytest.raises(RhovaeError, match="no form over trajectories"):
        make_trajectory_prior("made", C, T)
