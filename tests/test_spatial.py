"""Spatial latent maps (--latent-shape C,H,W): the cnn's map encoder/decoder, every posterior family and
prior over a map inside the one VAE path, the run commands, and the one-line refusals."""

import json
import math

import pytest
import torch
from conftest import overfit, train_argv
from torch.distributions import MultivariateNormal, kl_divergence

import rhovae
from rhovae.cli import main
from rhovae.config import RunConfig
from rhovae.distributions import LatentMap, SeparableAR1Normal, StandardNormal
from rhovae.errors import RhovaeError
from rhovae.model import build_model
from rhovae.nets.conv import SpatialConvDecoder, SpatialConvEncoder, map_sizes
from rhovae.objectives import Objective
from rhovae.posteriors import posterior_statistics

MAP_FAMILIES = ["diagonal", "ar1-2d", "ar1-2d-diag", "ar1", "ar1-diag", "isotropic"]
#: which (posterior, prior) pairs have a closed-form KL (the rest use log q(z) - log p(z) at z)
CLOSED = {(f, "ar1-2d"): False for f in ("ar1", "ar1-diag", "isotropic", "full")}


def map_model(posterior="ar1-2d", prior="standard", shape="2,3,3", image=(1, 12, 12), **extra):
    cfg = RunConfig(
        model="cnn", latent_shape=shape, posterior=posterior, prior=prior, dataset="mnist", **extra
    ).validate()
    return build_model(cfg, image)


@pytest.mark.parametrize("prior", ["standard", "ar1-2d"])
@pytest.mark.parametrize("posterior", MAP_FAMILIES + ["full"])
def test_every_family_and_prior_runs_the_one_path(posterior, prior):
    torch.manual_seed(0)
    model = map_model(posterior, prior)
    x = torch.rand(5, 1, 12, 12)
    q = model.encode(x)
    assert q.event_shape == (2, 3, 3) and q.batch_shape == (5,)
    assert model.latent_shape == (2, 3, 3) and model.latent_dim == 18
    out = model(x)
    assert out.z.shape == (5, 2, 3, 3) and out.kl.shape == (5,) and out.recon.shape == (5,)
    assert out.kl_exact == CLOSED.get((posterior, prior), True)
    (out.recon.mean() + out.kl.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if prior == "ar1-2d":  # the learned prior trains with the model
        assert model.prior.rho_rows_pre.grad is not None
    with torch.no_grad():
        assert model.sample(3).shape == (3, 1, 12, 12)
        assert model.reconstruct(x).shape == x.shape
        assert model.iwae_bound(x, 4).shape == (5,)


@pytest.mark.parametrize("posterior", MAP_FAMILIES)
def test_closed_form_kl_is_the_dense_gaussian_kl(posterior):
    """The model's KL to each prior against a dense MultivariateNormal over the flattened map."""
    torch.manual_seed(1)
    for prior in ("standard", "ar1-2d"):
        model = map_model(posterior, prior).double()
        if prior == "ar1-2d":
            with torch.no_grad():  # a prior away from N(0, I)
                model.prior.rho_rows_pre.copy_(torch.tensor([0.8, -0.4]))
                model.prior.rho_cols_pre.copy_(torch.tensor([-0.3, 1.1]))
                model.prior.log_var.copy_(torch.tensor([0.3, -0.5]))
        q, p = model.encode(torch.rand(3, 1, 12, 12, dtype=torch.float64)), model.prior()
        dense_q = MultivariateNormal(q.mean.flatten(1), _dense_covariance(q))
        p_cov = (
            torch.eye(18, dtype=torch.float64)
            if isinstance(p, StandardNormal)
            else _dense_covariance(p.expand((1,)))[0]
        )
        dense_p = MultivariateNormal(torch.zeros(18, dtype=torch.float64), p_cov)
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            assert (posterior, prior) in CLOSED
            continue
        torch.testing.assert_close(kl, kl_divergence(dense_q, dense_p), rtol=1e-9, atol=1e-9)


def _dense_covariance(q) -> torch.Tensor:
    """The dense covariance of a map posterior over its flattened event, built from its parts."""
    if isinstance(q, SeparableAR1Normal):
        return q.covariance_matrix
    if isinstance(q, LatentMap):
        inner = q.base.base_dist  # Independent(AR1Normal) per channel
        blocks = inner.covariance_matrix  # (B, C, HW, HW)
        return torch.stack([torch.block_diag(*b) for b in blocks])
    return torch.diag_embed(q.variance.flatten(1))  # the diagonal map


def test_monte_carlo_kl_is_unbiased_where_no_closed_form_exists():
    """Raster-order AR(1) against the separable prior: log q(z) - log p(z) averages to the dense KL."""
    torch.manual_seed(2)
    model = map_model("ar1", "ar1-2d").double()
    with torch.no_grad():
        model.prior.rho_rows_pre.fill_(0.6)
        model.prior.rho_cols_pre.fill_(-0.4)
    q, p = model.encode(torch.rand(2, 1, 12, 12, dtype=torch.float64)), model.prior()
    z = q.sample((40_000,))
    estimate = (q.log_prob(z) - p.log_prob(z)).mean(0)
    dense = kl_divergence(
        MultivariateNormal(q.mean.flatten(1), _dense_covariance(q)),
        MultivariateNormal(torch.zeros(18, dtype=torch.float64), _dense_covariance(p.expand((1,)))[0]),
    )
    spread = (q.log_prob(z) - p.log_prob(z)).std(0) / math.sqrt(len(z))
    assert ((estimate - dense).abs() < 5 * spread).all(), (estimate, dense, spread)


def test_iwae_bound_is_at_least_the_elbo_and_grows_with_k():
    torch.manual_seed(3)
    model = map_model("ar1-2d", "ar1-2d").eval()
    x = torch.rand(4, 1, 12, 12).round()
    torch.manual_seed(4)
    elbo = torch.stack([model.elbo(x) for _ in range(200)]).mean(0)
    torch.manual_seed(4)
    k1 = model.iwae_bound(x, 1, max_decoded=64)
    bound = model.iwae_bound(x, 200, max_decoded=64)
    assert (bound > elbo).all()
    assert torch.isfinite(k1).all()


def test_map_model_learns():
    torch.manual_seed(5)
    x = (torch.rand(64, 1, 12, 12) > 0.7).float()
    model = map_model("ar1-2d", "ar1-2d")
    start, end = overfit(model, x, steps=60, lr=3e-3)
    assert end < start * 0.75


def test_free_bits_count_every_unit_of_the_map():
    torch.manual_seed(6)
    model = map_model("diagonal")
    out = model(torch.rand(8, 1, 12, 12))
    loss, _ = Objective(free_bits=5.0)(out, model)
    # each of the 18 units is clamped at 5 nats at the start (their KLs are far below): 90 nats
    assert float((loss - out.recon.mean()).detach()) == pytest.approx(5.0 * 18, rel=1e-6)
    model_ar = map_model("ar1-2d")
    out = model_ar(torch.rand(8, 1, 12, 12))
    loss, _ = Objective(free_bits=5.0)(out, model_ar)  # no per-unit split: the whole map's floor
    floor = max(5.0 * 18, float(out.kl.mean().detach()))
    assert float((loss - out.recon.mean()).detach()) == pytest.approx(floor, rel=1e-6)


def test_statistics_report_each_family_parameters():
    torch.manual_seed(7)
    x = torch.rand(3, 1, 12, 12)
    stats = posterior_statistics(map_model("ar1-2d").encode(x))
    assert set(stats) == {"rho_rows", "rho_cols", "s"} and stats["rho_rows"].shape == (3, 2)
    assert stats["s"].shape == (3, 2)
    assert posterior_statistics(map_model("ar1-2d-diag").encode(x))["s"].shape == (3, 2, 3, 3)
    raster = posterior_statistics(map_model("ar1").encode(x))
    assert set(raster) == {"rho", "s"} and raster["rho"].shape == (3, 2)


@pytest.mark.parametrize("size", [(28, 28), (12, 12), (13, 9), (64, 40), (8, 8)])
def test_every_offered_map_size_round_trips(size):
    image = (1, *size)
    for h, w in map_sizes(*size):
        encoder, decoder = SpatialConvEncoder(image, (3, h, w)), SpatialConvDecoder((3, h, w), image)
        assert encoder(torch.zeros(2, *image)).shape == (2, 128, h, w)
        assert decoder(torch.zeros(4, 2, 3, h, w)).shape == (4, 2, *image)


def test_map_sizes_of_mnist():
    assert map_sizes(28, 28) == [(28, 28), (14, 14), (7, 7), (4, 4), (2, 2), (1, 1)]


# --- one line for each bad input (issue: bad input) ----------------------------------------------------


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"model": "cnn", "latent_shape": "8,5,5"}, ["cannot produce a latent map of 5x5", "C,7,7", "C,4,4"]),
        ({"model": "mlp", "latent_shape": "8,7,7"}, ["needs a convolutional model", "not mlp"]),
        ({"model": "lstm", "latent_shape": "8,7,7"}, ["needs a convolutional model", "not lstm"]),
        ({"model": "cnn", "posterior": "ar1-2d"}, ["family over latent maps", "--latent-shape"]),
        ({"model": "cnn", "posterior": "ar1-2d-diag"}, ["family over latent maps"]),
        ({"model": "cnn", "prior": "ar1-2d"}, ["prior ar1-2d is over latent maps"]),
        ({"model": "cnn", "latent_shape": "8,7,7", "posterior": "iaf"}, ["no form over a latent map"]),
        (
            {"model": "cnn", "latent_shape": "8,7,7", "posterior": "full"},
            ["no form over a latent map", "256"],
        ),
        ({"model": "cnn", "latent_shape": "8,7,7", "prior": "made"}, ["prior made has no form"]),
        ({"model": "cnn", "latent_shape": "8,7,7", "latent_groups": 2}, ["latent groups", "flat latents"]),
        ({"model": "cnn", "latent_shape": "8,7"}, ["three positive integers"]),
        ({"model": "cnn", "latent_shape": "8,0,7"}, ["three positive integers"]),
    ],
)
def test_bad_map_settings_are_one_line(settings, words):
    with pytest.raises(RhovaeError) as err:
        cfg = RunConfig(dataset="mnist-5k", **settings).validate()
        build_model(cfg, (1, 28, 28))
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_rho_outside_the_interval_from_a_users_head_is_one_line(monkeypatch):
    # under torch's own default (validation on), whatever an earlier test in the process set
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    loc = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="rho_cols has 1 invalid value.*tanh") as err:
        SeparableAR1Normal(
            loc, torch.zeros(2, 3), torch.tensor([[0.1, 1.3, 0.0], [0.0, 0.0, 0.0]]), torch.ones(2, 3)
        )
    assert "\n" not in str(err.value)


def test_bad_latent_shape_on_the_command_line_is_one_line(idx_dir, tmp_path, capsys):
    argv = train_argv(tmp_path / "r", "--model cnn --latent-shape 4,5,5 --epochs 1")
    code = main([*argv, "--dataset", "mnist", "--data-dir", str(idx_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "C,6,6, C,3,3" in err[0], err
    assert not (tmp_path / "r").exists()


# --- the commands, end to end --------------------------------------------------------------------------


def test_train_evaluate_explore_load_on_a_map(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    flags = "--model cnn --latent-shape 3,3,3 --posterior ar1-2d --prior ar1-2d --epochs 2 --val-size 100"
    assert main([*train_argv(run, flags), "--dataset", "mnist", "--data-dir", str(idx_dir)]) == 0
    config = (run / "config.toml").read_text()
    assert 'latent_shape = "3,3,3"' in config and "latent_dim = 27" in config
    assert main(["-q", "evaluate", str(run), "--iwae-k", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "per channel" in out and "rho_rows" in out
    record = json.loads((run / "evaluation.json").read_text())
    assert len(record["active_units_per_channel"]) == 3
    assert (
        len(record["active_channels_per_position"]) == 3
        and len(record["active_channels_per_position"][0]) == 3
    )
    assert sum(record["active_units_per_channel"]) == record["active_units"]
    assert math.isfinite(record["mutual_information"])
    assert main(["-q", "explore", str(run), "--device", "cpu"]) == 0
    assert {p.name for p in (run / "explore").iterdir()} >= {"channel_means.png", "traversals.png"}
    model = rhovae.load(run)
    q = model.encode(torch.rand(2, 1, 12, 12))
    assert isinstance(q, SeparableAR1Normal) and q.event_shape == (3, 3, 3)
    # resume continues the map run
    resume = [*train_argv(run, flags.replace("--epochs 2", "--epochs 3")), "--resume"]
    assert main([*resume, "--dataset", "mnist", "--data-dir", str(idx_dir)]) == 0
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 4  # header + 3 epochs


def test_infovae_objective_on_a_map_measures_the_mmd_on_flattened_codes():
    torch.manual_seed(8)
    model = map_model("ar1-2d", objective="infovae")
    out = model(torch.rand(6, 1, 12, 12))
    loss, extras = Objective(kind="infovae")(out, model)
    assert torch.isfinite(loss) and extras["mmd"].shape == ()


def test_latent_map_of_a_univariate_family_has_its_closed_form_kl():
    from torch.distributions import Independent, Normal

    loc, std = torch.randn(2, 18, dtype=torch.float64), torch.rand(2, 18, dtype=torch.float64) + 0.5
    q = LatentMap(Independent(Normal(loc, std), 1), (2, 3, 3))
    expected = kl_divergence(Independent(Normal(loc, std), 1), StandardNormal(18, dtype=torch.float64))
    torch.testing.assert_close(kl_divergence(q, StandardNormal((2, 3, 3), dtype=torch.float64)), expected)


def test_a_grid_option_that_sets_the_posterior_names_the_run_after_what_ran():
    from rhovae.experiments import Experiment

    exp = Experiment(
        name="t",
        grid={
            "model": ["cnn"],
            "dataset": ["mnist"],
            "latent": ["map", "flat"],
            "posterior": ["ar1-2d", "diagonal"],
        },
        options={
            "latent": {
                "map": {"latent_shape": "2,3,3"},
                "flat": {"latent_shape": "", "posterior": "diagonal"},
            }
        },
    )
    points = exp.points()
    assert [r for r, _, _ in points] == [
        "cnn-mnist-latentmap-ar1-2d",
        "cnn-mnist-latentmap-diagonal",
        "cnn-mnist-latentflat-diagonal",
    ]
    assert points[-1][1].posterior == "diagonal" and points[-1][2]["posterior"] == "diagonal"


def test_latent_shape_sets_latent_dim_whatever_was_given():
    assert (
        RunConfig(model="cnn", latent_shape="2,3,3", latent_dim=0, dataset="mnist").validate().latent_dim
        == 18
    )
