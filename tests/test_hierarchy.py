"""Hierarchies of latent groups: the flat model at one group, the chain rule, the KL estimator, shapes."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

from rhovae.distributions import StandardNormal
from rhovae.errors import RhovaeError
from rhovae.hierarchy import (
    HierarchicalPosterior,
    HierarchicalPrior,
    active_units_per_group,
    build_hierarchy,
    group_free_bits_kl,
    group_sizes,
    per_group_kl,
)
from rhovae.likelihoods import make_likelihood
from rhovae.model import VAE, kl_term
from rhovae.posteriors import make_head, posterior_statistics
from rhovae.priors import StandardNormalPrior

F_IN, D, B, HIDDEN = 6, 8, 3, 16
FAMILIES = ["diagonal", "ar1", "ar1-diag", "full"]


def perturbed(*modules: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every parameter off its initialisation (zero-initialised prior layers included), so that no
    law below holds only because a fresh hierarchy's prior is N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(std * torch.randn(param.shape, generator=g))


def hierarchy(posterior="diagonal", groups=2, prior="standard", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head, prior_module = build_hierarchy(posterior, F_IN, D, groups, HIDDEN, flow_steps=2, prior=prior)
    head, prior_module = head.to(dtype), prior_module.to(dtype)
    perturbed(head, prior_module, seed=seed)
    h = torch.randn(B, F_IN, dtype=dtype)
    return head, prior_module, h


def test_group_sizes_split_evenly_or_as_given():
    assert group_sizes(8, 2) == [4, 4] and group_sizes(10, 4) == [3, 3, 2, 2]
    assert group_sizes(8, [3, 5]) == [3, 5]
    for bad in (0, 9, [3, 4], [0, 8]):
        with pytest.raises(RhovaeError):
            group_sizes(8, bad)


def test_head_and_prior_share_one_top_down_path():
    head, prior_module = build_hierarchy("ar1", F_IN, D, 4, HIDDEN)
    assert head.top_down is prior_module.top_down
    assert head.in_features == F_IN and head.latent_dim == prior_module.latent_dim == D
    # the state dict lists the shared weights under both owners and loads back
    vae_like = nn.ModuleDict({"head": head, "prior": prior_module})
    state = vae_like.state_dict()
    assert any(k.startswith("head.top_down.") for k in state)
    assert any(k.startswith("prior.top_down.") for k in state)
    vae_like.load_state_dict(state)


def test_a_fresh_hierarchical_prior_is_the_standard_normal():
    _, prior_module = build_hierarchy("diagonal", F_IN, D, 4, HIDDEN)
    z = torch.randn(5, 2, D)
    torch.testing.assert_close(prior_module().log_prob(z), StandardNormal(D).log_prob(z))


@pytest.mark.parametrize("posterior", ["diagonal", "ar1", "full", "planar"])
def test_one_group_is_exactly_the_flat_model(posterior):
    """One group: head_0(h) and p(z_0) = N(0, I); with the flat head's weights the terms are equal."""
    torch.manual_seed(0)
    head, prior_module = build_hierarchy(posterior, F_IN, D, 1, HIDDEN, flow_steps=2)
    flat = make_head(posterior, F_IN, D, flow_steps=2)
    head.groups[0].load_state_dict(flat.state_dict())
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in flat.parameters())
    encoder, decoder = nn.Linear(4, F_IN), nn.Linear(D, 4)
    likelihood = make_likelihood("bernoulli", (4,))
    hier_vae = VAE(encoder, head, decoder, likelihood, prior_module)
    flat_vae = VAE(encoder, flat, decoder, likelihood, StandardNormalPrior(D))
    x = torch.rand(B, 4)
    torch.manual_seed(1)
    out_h = hier_vae(x)
    torch.manual_seed(1)
    out_f = flat_vae(x)
    torch.testing.assert_close(out_h.z, out_f.z)
    torch.testing.assert_close(out_h.recon, out_f.recon)
    torch.testing.assert_close(out_h.kl, out_f.kl)
    q_h, q_f = out_h.q, out_f.q
    if posterior != "planar":
        z = torch.randn(4, B, D)
        torch.testing.assert_close(q_h.log_prob(z), q_f.log_prob(z))
    torch.testing.assert_close(q_h.log_prob(out_h.z), q_f.log_prob(out_f.z))
    torch.manual_seed(2)
    iwae_h = hier_vae.iwae_bound(x, 7)
    torch.manual_seed(2)
    iwae_f = flat_vae.iwae_bound(x, 7)
    torch.testing.assert_close(iwae_h, iwae_f)
    torch.testing.assert_close(q_h.mean, q_f.mean)


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_both_laws_integrate_to_one_and_sample_their_own_density(posterior):
    """Two groups of one dimension on a grid: the chain-rule densities are normalised, and the ancestral
    samples have the mean the density says (sampling and log_prob describe one law)."""
    torch.manual_seed(3)
    head, prior_module = build_hierarchy(posterior, F_IN, 2, 2, HIDDEN)
    head, prior_module = head.double(), prior_module.double()
    perturbed(head, prior_module, seed=3, std=0.15)
    h = torch.randn(1, F_IN, dtype=torch.float64)
    step = 0.04
    axis = torch.arange(-9, 9 + step / 2, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # (G, 2)
    n = 20000
    with torch.no_grad():
        for law, grid_z in ((head(h), grid[:, None, :]), (prior_module(), grid)):
            density = law.log_prob(grid_z).exp().reshape(len(grid), -1)[:, 0]
            mass = float(density.sum() * step**2)
            assert abs(mass - 1) < 2e-3, mass
            grid_mean = (density[:, None] * grid).sum(0) * step**2
            samples = law.sample((n,)).reshape(n, 2)
            se = samples.std(0) / math.sqrt(n)
            assert ((samples.mean(0) - grid_mean).abs() < 5 * se).all()


@pytest.mark.parametrize(
    ("posterior", "groups", "prior"),
    [
        ("diagonal", 2, "standard"),
        ("ar1", 2, "standard"),
        ("ar1", 4, "ar1"),
        ("diagonal", [3, 5], "made"),
        ("ar1-diag", 4, "standard"),
        ("full", 2, "standard"),
    ],
)
def test_the_per_group_kl_estimates_the_whole_kl(posterior, groups, prior):
    """E[sum_t KL(q_t || p_t)] over fresh draws = E[log q(z) - log p(z)] over independent fresh draws."""
    head, prior_module, h = hierarchy(posterior, groups, prior, seed=4)
    n = 4000
    with torch.no_grad():
        q, p = head(h), prior_module()
        q.rsample((n,))
        analytic = kl_divergence(q, p)  # (n, B)
        assert analytic.shape == (n, B) and q.group_kl.shape == (n, B, len(q.group_sizes))
        torch.testing.assert_close(q.group_kl.sum(-1), analytic)
        z = q.sample((n,))
        monte_carlo = q.log_prob(z) - p.log_prob(z)
    se = (analytic.var(0) / n + monte_carlo.var(0) / n).sqrt()
    assert ((analytic.mean(0) - monte_carlo.mean(0)).abs() < 5 * se).all()
    assert (analytic.mean(0) > 0.5).all()  # a real divergence, not a trivial zero


@pytest.mark.parametrize("posterior", FAMILIES)
@pytest.mark.parametrize("groups", [2, 4, [2, 6]])
def test_log_prob_recomputes_the_draw_for_any_sample_shape(posterior, groups):
    head, prior_module, h = hierarchy(posterior, groups)
    q, p = head(h), prior_module()
    m = 5
    z = q.sample((m,))
    assert z.shape == (m, B, D)
    from_draw = sum(d.residual_law.log_prob(d.residual) for d in q.last_draw)
    log_q = q.log_prob(z.clone())  # a new tensor: recomputed from z_<t, not read back
    assert log_q.shape == (m, B)
    torch.testing.assert_close(log_q, from_draw)
    for i in range(m):
        torch.testing.assert_close(q.log_prob(z[i]), log_q[i])
    assert q.rsample().shape == (B, D) and q.mean.shape == (B, D)
    assert p.sample((7,)).shape == (7, D) and p.rsample((2, 3)).shape == (2, 3, D)
    assert p.log_prob(z).shape == (m, B) and p.log_prob(z[0]).shape == (B,)


@pytest.mark.parametrize(("posterior", "groups", "prior"), [("diagonal", 2, "ar1"), ("ar1", 4, "standard")])
def test_gradients_reach_every_parameter(posterior, groups, prior):
    head, prior_module, h = hierarchy(posterior, groups, prior, dtype=torch.float32)
    q, p = head(h), prior_module()
    z = q.rsample()
    loss = (z.pow(2).sum(-1) + kl_divergence(q, p) + p.log_prob(q.sample((2,))).mean(0)).mean()
    loss.backward()
    for module in (head, prior_module):
        for name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


def small_vae(head, prior_module):
    encoder = nn.Sequential(nn.Linear(4, F_IN), nn.Tanh())
    return VAE(encoder, head, nn.Linear(D, 4), make_likelihood("bernoulli", (4,)), prior_module)


@pytest.mark.parametrize("posterior", ["diagonal", "ar1"])
def test_the_vae_runs_a_hierarchy_unchanged(posterior):
    head, prior_module = build_hierarchy(posterior, F_IN, D, 4, HIDDEN)
    vae = small_vae(head, prior_module)
    x = torch.rand(B, 4)
    out = vae(x)
    assert out.kl_exact and out.kl.shape == out.recon.shape == (B,) and out.z.shape == (B, D)
    (out.recon + out.kl).mean().backward()
    bound = vae.iwae_bound(x, 11, max_decoded=12)  # chunks of 4 samples
    assert bound.shape == (B,) and torch.isfinite(bound).all()
    assert vae.sample(5, seed=0).shape == (5, 4)
    torch.testing.assert_close(vae.sample(5, seed=0), vae.sample(5, seed=0))
    assert vae.reconstruct(x).shape == (B, 4)


@pytest.mark.parametrize("posterior", ["planar", "ar1+iaf"])
def test_flow_groups_use_their_own_samples_only(posterior):
    head, prior_module, h = hierarchy(posterior, 2, dtype=torch.float32)
    q, p = head(h), prior_module()
    z = q.rsample()
    kl = kl_divergence(q, p)
    assert kl.shape == (B,) and torch.isfinite(kl).all()
    assert q.log_prob(z).shape == (B,)
    with pytest.raises(NotImplementedError, match="own last sample"):
        q.log_prob(z.clone())
    vae = small_vae(head, prior_module)
    assert torch.isfinite(vae.iwae_bound(torch.rand(B, 4), 6)).all()
    (vae(torch.rand(B, 4)).kl.sum()).backward()


def test_the_kl_needs_a_draw_and_the_matching_prior():
    head, prior_module, h = hierarchy("ar1", 2)
    q = head(h)
    with pytest.raises(RhovaeError, match="rsample"):
        kl_divergence(q, prior_module())
    q.rsample()
    _, other_prior = build_hierarchy("ar1", F_IN, D, 2, HIDDEN)
    with pytest.raises(RhovaeError, match="top-down"):
        kl_divergence(q, other_prior.double()())
    assert kl_term(q, prior_module(), q.rsample())[1]  # registered: the VAE takes it as its KL


def test_per_group_statistics_and_free_bits():
    head, prior_module, h = hierarchy("ar1", [2, 2, 4])
    q, p = head(h), prior_module()
    stats = posterior_statistics(q)  # no draw yet: family statistics along the mean path, no KL
    assert set(stats) == {f"{k}_group_{t}" for k in ("rho", "s") for t in range(3)}
    assert per_group_kl(q) is None and group_free_bits_kl(q, 1.0) is None
    q.rsample()
    kl = kl_divergence(q, p)
    stats = posterior_statistics(q)
    per_group = torch.stack([stats[f"kl_group_{t}"] for t in range(3)], -1)
    assert per_group.shape == (B, 3)
    torch.testing.assert_close(per_group.sum(-1), kl)
    assert stats["rho_group_1"].shape == (B,)
    found, sizes = per_group_kl(q)
    assert found.shape == (B, 3) and sizes == [2, 2, 4]
    torch.testing.assert_close(group_free_bits_kl(q, 0.0), kl.mean())
    floor = 1e3 * torch.tensor([2.0, 2.0, 4.0], dtype=kl.dtype)
    torch.testing.assert_close(group_free_bits_kl(q, 1e3), floor.sum())
    assert isinstance(q, HierarchicalPosterior) and isinstance(p, HierarchicalPrior)


def test_active_units_per_group():
    variances = torch.tensor([0.5, 0.0, 0.02, 0.001, 0.3, 0.3])
    assert active_units_per_group(variances, [2, 4]) == [1, 3]
