"""The frames model (--model frames): the masked likelihood against elementwise references, the per-frame
networks, every posterior x prior pair in the one VAE path, frame data (rotating: and npz: with masks),
imputation metrics against a direct computation, the run commands, and the one-line refusals."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import overfit, train_argv
from torch.distributions import Bernoulli, Independent, Normal

from rhovae.cli import main
from rhovae.config import RunConfig
from rhovae.data.frame_data import load_frames
from rhovae.errors import RhovaeError
from rhovae.evaluate import imputation_metrics
from rhovae.likelihoods import MaskedObservations, make_likelihood
from rhovae.model import build_model
from rhovae.nets.frames import FrameDecoder, FrameEncoder
from rhovae.posteriors import posterior_statistics

FAMILIES = ["diagonal", "ar1", "banded"]
PRIORS = ["standard", "ar1", "gp"]
SHAPE = (5, 1, 6, 6)  # T = 5 frames of 6x6


def frames_model(posterior="ar1", prior="standard", shape=SHAPE, **extra):
    cfg = RunConfig(
        model="frames", dataset="rotating:mnist", posterior=posterior, prior=prior, latent_dim=3,
        hidden=16, **extra,
    ).validate()  # fmt: skip
    return build_model(cfg, shape, meta={"frames": shape[0]})


def with_gaps(n=4, shape=SHAPE, rate=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.rand((n, *shape), generator=g)
    missing = torch.rand(full.shape, generator=g) < rate
    return full.masked_fill(missing, float("nan")), full, missing


# --- the masked likelihood ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_masked_log_prob_is_the_sum_over_observed_values(name):
    x, full, missing = with_gaps()
    params = torch.randn(x.shape)
    masked = make_likelihood(name, SHAPE, masked=True)(params)
    plain = make_likelihood(name, SHAPE)(params)
    elementwise = plain.base_dist.log_prob(full)  # an independent reference, value by value
    expected = (elementwise * ~missing).flatten(1).sum(1)
    torch.testing.assert_close(masked.log_prob(x), expected)
    # nothing missing: the masked likelihood is the plain one
    torch.testing.assert_close(masked.log_prob(full), plain.log_prob(full))
    assert masked.mean.shape == x.shape and masked.batch_shape == (4,) and masked.event_shape == SHAPE


def test_masked_log_prob_has_finite_gradients_through_nan_inputs():
    x, _, missing = with_gaps()
    params = torch.randn(x.shape, requires_grad=True)
    MaskedObservations(Independent(Bernoulli(logits=params, validate_args=False), 4)).log_prob(
        x
    ).sum().backward()
    assert torch.isfinite(params.grad).all()
    assert (params.grad[missing] == 0).all()  # a missing value teaches the decoder nothing


def test_masked_values_never_reach_the_score():
    x, _, missing = with_gaps()
    params = torch.randn(x.shape)
    p = MaskedObservations(Independent(Normal(params, torch.ones_like(params)), 4))
    other = x.clone()
    other[missing] = 0.5  # a finite value is an observed one: it is NaN that marks a gap
    extra = (Normal(params, 1.0).log_prob(torch.full_like(x, 0.5)) * missing).flatten(1).sum(1)
    torch.testing.assert_close(p.log_prob(other), p.log_prob(x) + extra)


# --- the networks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_frame_networks_shapes(net):
    shape = (4, 1, 12, 12)
    enc, dec = FrameEncoder(shape, 16, net), FrameDecoder(3, shape, 16, net)
    x, _, _ = with_gaps(2, shape)
    h = enc(x)
    assert h.shape == (2, 4, 16) and torch.isfinite(h).all()
    assert dec(torch.randn(7, 3, 4)).shape == (7, *shape)


def test_the_encoder_tells_missing_from_zero():
    enc = FrameEncoder(SHAPE, 16)
    zeros = torch.zeros((1, *SHAPE))
    assert not torch.allclose(enc(zeros), enc(torch.full_like(zeros, float("nan"))))


def test_the_decoder_is_independent_in_time():
    dec = FrameDecoder(3, SHAPE, 16)
    z = torch.randn(2, 3, 5)
    moved = z.clone()
    moved[:, :, 2] += 1.0
    same = [0, 1, 3, 4]
    torch.testing.assert_close(dec(z)[:, same], dec(moved)[:, same])
    assert not torch.allclose(dec(z)[:, 2], dec(moved)[:, 2])


def test_frame_encoder_refuses_conv_on_vectors():
    with pytest.raises(RhovaeError, match="image frames"):
        FrameEncoder((5, 8), 16, "conv")


# --- the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("posterior", FAMILIES)
def test_every_family_and_prior_runs_the_one_path(posterior, prior):
    torch.manual_seed(0)
    model = frames_model(posterior, prior)
    x, _, _ = with_gaps()
    q = model.encode(x)
    assert q.batch_shape == (4,) and q.event_shape == (3, 5)
    assert model.latent_shape == (3, 5) and model.latent_dim == 15
    out = model(x)
    assert out.kl_exact and out.z.shape == (4, 3, 5)
    assert torch.isfinite(out.recon).all() and torch.isfinite(out.kl).all()
    (out.recon.mean() + out.kl.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        assert model.sample(3).shape == (3, *SHAPE)
        assert model.reconstruct(x).shape == x.shape and not model.reconstruct(x).isnan().any()
        assert model.iwae_bound(x, 4).shape == (4,)


def test_the_elbo_is_that_of_the_observed_values():
    """recon = -sum over observed values of log p(x_i | z), checked at the model's own draw."""
    torch.manual_seed(1)
    model = frames_model("banded", "gp")
    x, _, missing = with_gaps()
    torch.manual_seed(2)
    out = model(x)
    logits = model.decoder(out.z)
    reference = (
        -(Bernoulli(logits=logits, validate_args=False).log_prob(x.nan_to_num(0.0)) * ~missing)
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(out.recon, reference)


def test_iwae_bound_of_observed_values_tightens_with_k():
    torch.manual_seed(3)
    model = frames_model("ar1", "ar1").eval()
    x, _, _ = with_gaps(2)
    torch.manual_seed(4)
    elbo = torch.stack([model.elbo(x) for _ in range(200)]).mean(0)
    bound = model.iwae_bound(x, 500)
    assert (bound >= elbo - 0.5).all()  # IWAE k = 500 >= the ELBO up to MC error (both sd < 0.2 here)


def test_ar1_trajectory_reports_rho_per_channel():
    model = frames_model("ar1", "standard")
    x, _, _ = with_gaps()
    stats = posterior_statistics(model.encode(x))
    assert stats["rho"].shape == (4, 3) and (stats["rho"].abs() < 1).all()


def test_training_lowers_the_loss_on_gappy_sequences():
    torch.manual_seed(5)
    model = frames_model("banded", "gp")
    x, _, _ = with_gaps(8)
    start, end = overfit(model, x, steps=60, lr=3e-3)
    assert end < start - 10


# --- imputation ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_imputation_metrics_match_a_direct_computation():
    torch.manual_seed(6)
    model = frames_model("diagonal", "standard").eval()
    x, full, missing = with_gaps(6)
    train, _, train_missing = with_gaps(10, seed=9)
    got = imputation_metrics(model, x, full, train, batch_size=4, seed=11)
    torch.manual_seed(11)
    nll = mse = 0.0
    for s in (slice(0, 4), slice(4, 6)):
        q = model.posterior(x[s])
        logits = model.decoder(q.sample())
        nll -= float((Bernoulli(logits=logits, validate_args=False).log_prob(full[s]) * missing[s]).sum())
        mean = torch.sigmoid(model.decoder(q.mean))
        mse += float(((mean - full[s]).square() * missing[s]).sum())
    n = int(missing.sum())
    fill = train.nan_to_num(0.0).sum(0) / (~train_missing).sum(0).clamp_min(1)
    assert got["missing_values"] == n
    assert got["imputation_nll"] == pytest.approx(nll / n, rel=1e-5)
    assert got["imputation_mse"] == pytest.approx(mse / n, rel=1e-5)
    assert got["imputation_mse_mean"] == pytest.approx(
        float(((fill - full).square() * missing).sum()) / n, rel=1e-5
    )


# --- data -------------------------------------------------------------------------------------------


def test_rotating_idx_data_has_gaps_and_truth(idx_dir):
    data = load_frames("rotating:mnist", idx_dir, limit=20, frames=4, missing_rate=0.5)
    assert data.data_shape == (4, 1, 12, 12) and len(data.train) == 20
    for key in ("train", "val", "test"):
        x, truth = getattr(data, key), data.truth[key]
        gaps = x.isnan()
        assert 0.4 < gaps.float().mean() < 0.6
        assert torch.equal(x[~gaps], truth[~gaps]) and not truth.isnan().any()
    again = load_frames("rotating:mnist", idx_dir, limit=20, frames=4, missing_rate=0.5)
    assert torch.equal(data.test.isnan(), again.test.isnan())  # fixed seeds: the same gaps every run
    static = load_frames("rotating:mnist", idx_dir, limit=5, pixels="static", frames=3)
    assert set(static.truth["test"].unique().tolist()) <= {0.0, 1.0}


def save(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_frames_with_per_split_masks_and_full_values(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.random((30, 4, 5)).astype(np.float32)
    mask = rng.random(full.shape) > 0.3
    test_full = rng.random((6, 4, 5)).astype(np.float32)
    test_mask = rng.random(test_full.shape) > 0.3
    name = save(tmp_path / "f.npz", train=np.where(mask, full, np.nan), train_mask=mask,
                test=np.where(test_mask, test_full, 0), test_mask=test_mask, test_full=test_full)  # fmt: skip
    data = load_frames(name)
    assert data.data_shape == (4, 5) and len(data.test) == 6 and len(data.train) + len(data.val) == 30
    assert torch.equal(data.test.isnan(), torch.from_numpy(~test_mask))
    torch.testing.assert_close(data.truth["test"], torch.from_numpy(test_full))
    assert "train" not in data.truth  # no train_full: nothing to score imputations of there


def test_npz_single_mask_and_uint8(tmp_path):
    x = np.full((12, 3, 2, 2), 255, np.uint8)
    mask = np.ones(x.shape, bool)
    mask[:, 0] = False
    data = load_frames(save(tmp_path / "u.npz", train=x, mask=mask))
    assert data.train[:, 0].isnan().all() and (data.train[:, 1:] == 1.0).all()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"train": np.zeros((4, 1, 3))}, "T = 1"),
        ({"train": np.zeros((4, 3, 2)), "mask": np.ones((4, 3), bool)}, "mask has shape"),
        ({"train": np.zeros((4, 3, 2)), "mask": np.ones((4, 3, 2), np.int64)}, "dtype bool"),
        ({"train": np.zeros((4, 3, 2)), "mask": np.zeros((4, 3, 2), bool)}, "no observed value"),
        ({"train": np.full((4, 3, 2), np.nan)}, "NaN/inf"),
        (
            {"train": np.zeros((4, 3, 2)), "test": np.zeros((2, 3, 2)), "mask": np.ones((4, 3, 2), bool)},
            "one per split",
        ),
        ({"val": np.zeros((4, 3, 2))}, "no array named 'train'"),
        ({"train": np.zeros((4, 3, 2)), "test_mask": np.ones((2, 3, 2), bool)}, "no test array"),
    ],
)
def test_bad_frame_files_get_one_line(tmp_path, arrays, message):
    with pytest.raises(RhovaeError, match=message) as e:
        load_frames(save(tmp_path / "bad.npz", **arrays))
    assert "\n" not in str(e.value)


def test_ragged_sequences_point_to_pad_ragged(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((3, 2)), np.zeros((4, 2))
    np.savez(tmp_path / "r.npz", train=ragged)
    with pytest.raises(RhovaeError, match="pad_ragged"):
        load_frames(f"npz:{tmp_path / 'r.npz'}")


def test_values_outside_the_unit_interval_need_a_gaussian(tmp_path):
    name = save(tmp_path / "wide.npz", train=np.linspace(-3, 3, 4 * 3 * 2).reshape(4, 3, 2))
    for options in ({"unit_interval": True}, {"pixels": "static"}):
        with pytest.raises(RhovaeError, match=r"outside the \[0, 1\].*--likelihood gaussian"):
            load_frames(name, **options)
    assert load_frames(name).train.min() == -3  # a Gaussian likelihood takes them as they are


def test_a_missing_rate_the_rule_cannot_give_is_one_line(idx_dir):
    with pytest.raises(RhovaeError, match="missing-rate 0.9 is too high.*use at most 0.") as e:
        load_frames("rotating:mnist", idx_dir, limit=5, frames=2, missing_rate=0.9)
    assert "\n" not in str(e.value)


def test_raw_inputs_keep_their_gaps_under_static_pixels(idx_dir, tmp_path):
    run = tmp_path / "static"
    flags = "--model frames --latent-dim 2 --hidden 8 --epochs 1 --limit 20 --frames 3 --pixels static"
    assert main(train_argv(run, flags, data=("--dataset", "rotating:mnist", "--data-dir", str(idx_dir)))) == 0
    import rhovae

    model = rhovae.load(run)
    raw = np.full((2, 3, 1, 12, 12), 0.7)
    raw[:, 1] = np.nan
    prepared = model.preprocessing(raw)
    assert prepared[:, 1].isnan().all() and set(prepared[:, 0].unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(model.log_likelihood(raw, k=3)).all()


@pytest.mark.parametrize("posterior", FAMILIES)
def test_free_bits_hold_each_channels_trajectory(posterior):
    from rhovae.objectives import Objective, per_dimension_kl

    torch.manual_seed(7)
    model = frames_model(posterior, "standard")
    x, _, _ = with_gaps()
    out = model(x)
    per_channel = per_dimension_kl(out.q, model.prior())
    assert per_channel.shape == (4, 3)  # one KL per channel's trajectory, summing to the whole KL
    torch.testing.assert_close(per_channel.sum(1), out.kl)
    kl_c = per_channel.mean(0)
    lam = float(kl_c.detach().median()) / 5  # the median channel sits at the floor lam * T, T = 5
    loss, _ = Objective(free_bits=lam)(out, model)
    torch.testing.assert_close(loss, out.recon.mean() + kl_c.clamp(min=lam * 5).sum())


def test_dynamic_pixels_are_refused_for_frames(idx_dir):
    with pytest.raises(RhovaeError, match="continuous or static"):
        load_frames("rotating:mnist", idx_dir, pixels="dynamic")


# --- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "mlp", "posterior": "banded"}, "--model frames"),
        ({"model": "mlp", "prior": "gp"}, "--model frames"),
        ({"model": "cnn", "dataset": "rotating:mnist-5k"}, "--model frames"),
        ({"model": "frames", "dataset": "mnist"}, "rotating:mnist-5k"),
        (
            {"model": "frames", "dataset": "rotating:mnist", "posterior": "iaf"},
            "no form over a latent trajectory",
        ),
        (
            {"model": "frames", "dataset": "rotating:mnist", "prior": "made"},
            "no form over a latent trajectory",
        ),
        ({"model": "frames", "dataset": "rotating:mnist", "frames": 1}, "T = 1"),
        ({"model": "frames", "dataset": "rotating:mnist", "missing_rate": 1.0}, "missing-rate"),
        ({"model": "frames", "dataset": "rotating:mnist", "pixels": "dynamic"}, "pixels dynamic"),
        ({"model": "frames", "dataset": "rotating:mnist", "latent_groups": 2}, "latent groups"),
        ({"model": "frames", "dataset": "rotating:mnist", "latent_shape": "2,2,2"}, "latent map"),
        ({"dataset": "rotating:cifar"}, "unknown dataset"),
        ({"model": "cnn", "dataset": "mnist", "missing_rate": 0.3}, "drop them"),
        ({"model": "mlp", "dataset": "mnist", "frame_net": "conv"}, "drop it"),
        ({"model": "frames", "dataset": "npz:x.npz", "frames": 20}, "drop them"),
    ],
)
def test_settings_without_a_form_are_refused_in_one_line(settings, message):
    with pytest.raises(RhovaeError, match=message) as e:
        RunConfig(**settings).validate()
    assert "\n" not in str(e.value)


# --- the commands -------------------------------------------------------------------------------------


def test_train_evaluate_explore_on_rotating_frames(tmp_path, idx_dir, capsys):
    run = tmp_path / "run"
    flags = "--model frames --posterior banded --prior gp --latent-dim 2 --hidden 16 --epochs 2 --limit 40"
    flags += " --frames 4"
    data = ("--dataset", "rotating:mnist", "--data-dir", str(idx_dir))
    assert main(train_argv(run, flags, data=data)) == 0
    assert {"imputation.png", "trajectories.png", "samples.png"} <= {p.name for p in run.iterdir()}
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iwae-k", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "of the observed values" in printed and "imputation" in printed and "of 8" in printed
    record = json.loads((run / "evaluation.json").read_text())
    assert record["missing_values"] > 0 and math.isfinite(record["imputation_mse"])
    assert record["imputation_mse"] < 1 and record["imputation_nll"] > 0
    assert main(["-q", "explore", str(run), "--device", "cpu"]) == 0
    assert (run / "explore" / "imputation.png").is_file()
    assert (
        main(["-q", "sample", str(run), "-n", "3", "--device", "cpu", "--out", str(tmp_path / "s.png")]) == 0
    )
    assert (
        main(["-q", "reconstruct", str(run), "-n", "2", "--device", "cpu", "--out", str(tmp_path / "r.png")])
        == 0
    )
    from PIL import Image

    # 12x12 frames with 2-pixel gaps: T = 4 columns; 3 sampled sequences, 2 sequences x (input, imputation)
    assert Image.open(tmp_path / "s.png").size == (4 * 14 + 2, 3 * 14 + 2)
    assert Image.open(tmp_path / "r.png").size == (4 * 14 + 2, 4 * 14 + 2)


def test_the_banded_head_starts_as_the_diagonal_one():
    """Zero coupling at initialisation: with the diagonal head's weights, the same posterior exactly."""
    from rhovae.posteriors import TrajectoryHead

    torch.manual_seed(8)
    diagonal, banded = TrajectoryHead("diagonal", 6, 3, 5), TrajectoryHead("banded", 6, 3, 5)
    banded.loc.load_state_dict(diagonal.loc.state_dict())
    banded.diagonal.load_state_dict(diagonal.log_var.state_dict())
    h = torch.randn(4, 5, 6)
    q_d, q_b = diagonal(h), banded(h)
    z = q_d.sample()
    torch.testing.assert_close(q_b.log_prob(z), q_d.log_prob(z))
    torch.testing.assert_close(q_b.variance, q_d.variance)
