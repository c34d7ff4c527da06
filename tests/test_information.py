"""Mutual information I(x; z) of the aggregate posterior (He et al. 2019) and the sequence VAE's
interpolation validity."""

import json
import math

import pytest
import torch
from conftest import train_argv
from torch import nn

from rhovae.cli import main
from rhovae.data import load_data
from rhovae.data.sequences import NAS201_OPS, SequenceVocab
from rhovae.evaluate import mutual_information
from rhovae.likelihoods import make_likelihood
from rhovae.model import VAE, ModelConfig, build_model
from rhovae.nets import MLPDecoder
from rhovae.posteriors import DiagonalGaussianHead
from rhovae.priors import make_prior
from rhovae.sequence_metrics import interpolation_validity


def gaussian_encoder_vae(features: int, latent: int, loc_weight, loc_bias, log_var: float) -> VAE:
    """A VAE on vectors x (N, features) whose q(z|x) = N(W x + b, exp(log_var) I), the encoder the
    identity; the decoder is never used by the estimator."""
    head = DiagonalGaussianHead(features, latent)
    with torch.no_grad():
        head.loc.weight.copy_(torch.as_tensor(loc_weight, dtype=torch.float32))
        head.loc.bias.copy_(torch.as_tensor(loc_bias, dtype=torch.float32))
        head.log_var.weight.zero_()
        head.log_var.bias.fill_(log_var)
    decoder = MLPDecoder(latent, (features,), 4)
    return VAE(
        nn.Identity(), head, decoder, make_likelihood("gaussian", (features,)), make_prior("standard", latent)
    )


def dense_estimate(model: VAE, x: torch.Tensor, seed: int) -> float:
    """The same estimator without chunking: one batch of posteriors, the N x N log-densities at once."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        q = model.posterior(x)
        z = q.sample()
        own = q.log_prob(z)
        cross = q.log_prob(z.unsqueeze(1).expand(len(x), len(x), z.shape[-1]))  # (i, n)
    return float((own - (cross.logsumexp(1) - math.log(len(x)))).mean())


def test_a_posterior_that_ignores_x_carries_no_information():
    # zero weights: q(z|x) = N(b, s^2 I) for every x, so log q(z) = log q(z|x) exactly
    model = gaussian_encoder_vae(5, 3, torch.zeros(3, 5), [0.3, -1.0, 2.0], 0.5)
    x = torch.randn(300, 5)
    mi = mutual_information(model, x, batch_size=64, max_pairs=2000)
    assert abs(mi) < 0.05
    assert abs(mi) < 1e-4  # in fact zero up to round-off


def test_a_posterior_that_tells_every_example_apart_reaches_log_n():
    # distinct means (min spacing ~1e-2) and sd exp(-10) ~ 5e-5: q(z_i|x_n) ~ 0 for n != i
    n = 200
    model = gaussian_encoder_vae(2, 2, torch.eye(2), torch.zeros(2), -20.0)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    mi = mutual_information(model, x, batch_size=64)
    assert mi == pytest.approx(math.log(n), rel=0.05)
    assert mi <= math.log(n) + 1e-6  # the estimator is bounded by log N
    assert mutual_information(model, x, max_examples=50) == pytest.approx(math.log(50), rel=0.05)


def test_matches_the_closed_form_on_a_gaussian_toy():
    # x ~ N(0, 1), q(z|x) = N(a x, s^2): z ~ N(0, a^2 + s^2), I(x; z) = 0.5 log(1 + a^2 / s^2) = 0.805.
    # With N = 4000 the aggregate (a mixture of 4000 Gaussians of width s = 0.5, spacing ~1e-3) is the
    # continuous one up to a bias of ~0.01 nats (measured over 10 seeds: mean 0.798), and the Monte-Carlo
    # spread of the mean of 4000 log-ratios is ~0.013 nats: 0.05 is about 3.5 standard errors.
    a, s = 1.0, 0.5
    model = gaussian_encoder_vae(1, 1, [[a]], [0.0], 2 * math.log(s))
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1))
    mi = mutual_information(model, x, seed=3)
    assert mi == pytest.approx(0.5 * math.log(1 + a**2 / s**2), abs=0.05)


@pytest.mark.parametrize(
    "posterior,groups",
    [("diagonal", 1), ("ar1", 1), ("ar1-diag", 1), ("isotropic", 1), ("full", 1), ("ar1", 2)],
)
def test_every_gaussian_family_and_hierarchies_match_the_dense_computation(posterior, groups):
    torch.manual_seed(0)
    cfg = ModelConfig(model="mlp", posterior=posterior, latent_dim=4, hidden=16, likelihood="gaussian")
    cfg.latent_groups = groups
    model = build_model(cfg, (6,)).eval()
    with torch.no_grad():  # spread the means so that the information is well above zero
        head = model.head.groups[0] if groups > 1 else model.head
        head.loc.weight.mul_(20)
    x = torch.randn(120, 6, generator=torch.Generator().manual_seed(2))
    state = torch.random.get_rng_state()
    chunked = mutual_information(model, x, batch_size=500, max_pairs=97, seed=5)  # one draw, many chunks
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    assert chunked == pytest.approx(dense_estimate(model, x, seed=5), abs=1e-4)
    assert 0.1 < chunked <= math.log(120) + 1e-6
    assert mutual_information(model, x, batch_size=500, max_pairs=97, seed=5) == chunked  # deterministic
    assert mutual_information(model, x, batch_size=500, seed=5) == pytest.approx(chunked, abs=1e-5)
    smaller_batches = mutual_information(model, x, batch_size=50, seed=5)  # other draws, same quantity
    assert math.isfinite(smaller_batches) and smaller_batches <= math.log(120) + 1e-6


@pytest.mark.parametrize("posterior", ["planar", "iaf", "ar1+iaf"])
def test_flow_posteriors_have_no_estimate(posterior):
    # a flow gives log q only at its own draws (the flows are not inverted): undefined, NaN
    cfg = ModelConfig(model="mlp", posterior=posterior, latent_dim=3, hidden=8, likelihood="gaussian")
    model = build_model(cfg, (4,))
    assert math.isnan(mutual_information(model, torch.randn(20, 4)))


def test_a_model_without_latent_has_zero_information():
    model = gaussian_encoder_vae(3, 0, torch.zeros(0, 3), torch.zeros(0), 0.0)
    assert model.latent_dim == 0
    assert mutual_information(model, torch.randn(10, 3)) == 0.0
    assert mutual_information(model, torch.randn(0, 3)) == 0.0


# --- interpolation validity ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nas201():
    data = load_data("nas201", limit=256)
    return data, SequenceVocab.from_dict(data.meta["vocab"])


def tiny_lstm(data, latent_dim=3):
    torch.manual_seed(0)
    cfg = ModelConfig(
        model="lstm", posterior="diagonal", latent_dim=latent_dim, hidden=16, likelihood="decoder"
    )
    return build_model(cfg, data.data_shape, meta=data.meta).eval()


def test_interpolation_validity_is_a_seeded_fraction(nas201):
    data, vocab = nas201
    model = tiny_lstm(data)
    value = interpolation_validity(model, data.test, vocab, pairs=20, points=5, seed=1)
    assert 0.0 <= value <= 1.0
    assert interpolation_validity(model, data.test, vocab, pairs=20, points=5, seed=1) == value
    calls = []
    interpolation_validity(
        model, data.test, vocab, pairs=7, points=3, is_valid=lambda tokens, features: calls.append(tokens)
    )
    assert len(calls) == 21 and all(len(tokens) == 6 for tokens in calls)  # pairs x interior points
    assert math.isnan(interpolation_validity(model, data.test[:1], vocab))  # no pair to draw


@pytest.mark.parametrize("op,expected", [("nor_conv_3x3", 1.0), ("none", 0.0)])
def test_interpolation_validity_uses_the_sets_rule(nas201, op, expected):
    # a decoder whose greedy decode is one op on every edge, whatever z: all six edges "nor_conv_3x3"
    # is a valid cell (node 3 reached from node 0), all "none" is not
    data, vocab = nas201
    model = tiny_lstm(data)
    with torch.no_grad():
        model.decoder.out.weight.zero_()
        model.decoder.out.bias.zero_()
        model.decoder.out.bias[NAS201_OPS.index(op)] = 5.0
    assert interpolation_validity(model, data.test, vocab, pairs=10, points=4) == expected


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("posterior", ["ar1", "planar"])
def test_evaluate_prints_and_records_the_mutual_information(idx_dir, tmp_path, capsys, posterior):
    run = tmp_path / "run"
    flags = f"--posterior {posterior} --latent-dim 3 --hidden 16 --epochs 1 --val-size 100 --no-pictures"
    assert main(train_argv(run, flags, data=("--dataset", "mnist", "--data-dir", str(idx_dir)))) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run), "--iwae-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "evaluation.json").read_text())
    assert record["mutual_information_examples"] == 100
    if posterior == "planar":
        assert "mutual information  n/a" in out and "mutual_information" not in record
    else:
        assert "nats (He et al. estimator, 100 test examples)" in out
        assert -0.1 < record["mutual_information"] <= math.log(100) + 1e-6
        assert f"mutual information  {record['mutual_information']:.3f} nats" in out


def test_evaluate_reports_interpolation_validity_of_sequence_runs(tmp_path, capsys):
    run = tmp_path / "run"
    flags = "--model lstm --latent-dim 2 --hidden 8 --epochs 1 --limit 64 --no-pictures"
    assert main(train_argv(run, flags, data=("--dataset", "nas201"))) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run), "--iwae-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "evaluation.json").read_text())
    assert 0.0 <= record["interpolation_validity"] <= 1.0
    assert "interpolation validity" in out and "mutual information" in out
