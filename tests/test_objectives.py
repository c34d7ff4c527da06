"""Objectives: the MMD estimator against a direct double loop, InfoVAE's loss, model defaults in runs."""

import csv
import math

import pytest
import torch

from rhovae.config import RunConfig
from rhovae.errors import RhovaeError
from rhovae.model import ModelConfig, build_model
from rhovae.objectives import Objective, mmd
from rhovae.runs import load_checkpoint
from rhovae.train import train


def mmd_reference(x, y, kernel, unbiased):
    """Straight from the definition, one pair at a time, in float64."""
    d = x.shape[1]

    def k(a, b):
        sq = float(((a - b) ** 2).sum())
        return (2 * d) / (2 * d + sq) if kernel == "imq" else math.exp(-sq / (2 * d))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if not unbiased or i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if not unbiased or i != j)
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    nx = n * (n - 1) if unbiased else n * n
    ny = m * (m - 1) if unbiased else m * m
    return xx / nx + yy / ny - 2 * xy / (n * m)


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_the_double_loop(kernel, unbiased):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 5, generator=g, dtype=torch.float64)
    y = torch.randn(13, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert abs(float(mmd(x, y, kernel, unbiased)) - mmd_reference(x, y, kernel, unbiased)) < 1e-12


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
def test_mmd_known_values(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    assert abs(float(mmd(x, x.clone(), kernel, unbiased=False))) < 1e-12  # identical samples: exactly 0
    # same distribution: the unbiased estimate is 0 in expectation; average 50 independent pairs
    same = torch.stack(
        [mmd(torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g), kernel) for _ in range(50)]
    )
    assert abs(float(same.mean())) < 3 * float(same.std()) / 50**0.5
    shifted = mmd(torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g) + 1.0, kernel)
    assert float(shifted) > 10 * float(same.std())


def test_mmd_bad_input():
    with pytest.raises(RhovaeError, match="unknown MMD kernel"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 2), "rbf")
    with pytest.raises(RhovaeError, match="at least two samples"):
        mmd(torch.zeros(1, 2), torch.zeros(3, 2))
    with pytest.raises(RhovaeError, match="unknown objective"):
        RunConfig(objective="wae").validate()  # settings are validated where they enter


def test_infovae_objective_is_the_stated_combination():
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="mlp", posterior="ar1", latent_dim=3, hidden=16), (1, 6, 6))
    x = torch.rand(32, 1, 6, 6)
    out = model(x)
    objective = Objective("infovae", alpha=0.25, lam=10.0, kernel="imq")
    torch.manual_seed(5)
    loss, extras = objective(out, model)
    torch.manual_seed(5)
    prior_z = model.prior().sample((32,))
    expected = (out.recon + 0.75 * out.kl).mean() + (0.25 + 10.0 - 1) * mmd(out.z, prior_z, "imq")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(extras["mmd"], mmd(out.z, prior_z, "imq"))
    loss.backward()
    assert model.head.rho.weight.grad.abs().sum() > 0
    elbo_loss, extras = Objective("elbo", beta=3.0)(out, model)
    torch.testing.assert_close(elbo_loss, (out.recon + 3.0 * out.kl).mean())
    assert extras == {}


def test_model_defaults_resolve_and_are_recorded(idx_dir, tmp_path):
    cfg = RunConfig(model="betavae").validate()
    assert cfg.beta == 4.0 and cfg.objective == "elbo"
    assert RunConfig(model="infovae").validate().objective == "infovae"
    assert RunConfig(model="mlp", beta=0.5).validate().beta == 0.5
    run = tmp_path / "beta"
    common = dict(
        dataset="mnist",
        data_dir=str(idx_dir),
        val_size=100,
        latent_dim=3,
        epochs=1,
        batch_size=100,
        device="cpu",
        pictures=False,
        limit=200,
    )
    train(RunConfig(model="betavae", **common), run, progress=False)
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["beta"] == 4.0 and ckpt["data_shape"] == [1, 64, 64]  # resized on loading
    run = tmp_path / "info"
    train(RunConfig(model="infovae", info_lambda=100.0, **common), run, progress=False)
    with open(run / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train_mmd"]) == float(row["train_mmd"]) and row["val_mmd"] != ""
    assert float(row["val_loss"]) > float(row["val_recon"])  # the objective, not just the reconstruction


def test_kl_warmup_schedule():
    o = Objective(beta=2.0, warmup=10, warmup_start=0.5)
    assert [o.kl_weight(t) for t in (0, 5, 10, 30)] == [0.5, 1.25, 2.0, 2.0]
    assert Objective(beta=3.0).kl_weight(0) == 3.0  # no warm-up: constant beta


def _model_and_output(posterior, d=4, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(posterior=posterior, latent_dim=d, hidden=8), (1, 4, 4))
    return model, model(torch.rand(6, 1, 4, 4))


def test_free_bits_per_dimension_value_and_gradient():
    model, out = _model_and_output("diagonal")
    q = out.q
    per_dim = torch.distributions.kl_divergence(q.base_dist, model.prior().base_dist).mean(0)  # (d,)
    lam = float(per_dim.median().detach())
    loss, _ = Objective(free_bits=lam)(out, model)
    expected = out.recon.mean() + torch.clamp(per_dim, min=lam).sum()
    torch.testing.assert_close(loss, expected)
    # the objective's KL part sends no gradient to the mean rows of dimensions under the floor
    w = model.head.loc.weight
    g_total = torch.autograd.grad(loss, w, retain_graph=True)[0]
    g_recon = torch.autograd.grad(out.recon.mean(), w, retain_graph=True)[0]
    g_kl = g_total - g_recon
    below = per_dim.detach() < lam
    assert below.any() and (~below).any()
    assert torch.allclose(g_kl[below], torch.zeros_like(g_kl[below]), atol=1e-7)
    assert torch.any(g_kl[~below].abs() > 1e-4)


def test_free_bits_groups():
    model, out = _model_and_output("diagonal")
    per_dim = torch.distributions.kl_divergence(out.q.base_dist, model.prior().base_dist).mean(0)
    loss, _ = Objective(free_bits=0.3, free_bits_groups=2)(out, model)
    groups = per_dim.view(2, 2).sum(-1)
    torch.testing.assert_close(loss, out.recon.mean() + torch.clamp(groups, min=0.3 * 2).sum())


@pytest.mark.parametrize("posterior", ["ar1", "full", "iaf"])
def test_free_bits_whole_vector_form_for_non_factorised_posteriors(posterior):
    model, out = _model_and_output(posterior)
    kl = out.kl.mean()
    for lam in (0.0001, 100.0):  # below and above the floor
        loss, _ = Objective(free_bits=lam)(out, model)
        torch.testing.assert_close(loss, out.recon.mean() + torch.clamp(kl, min=lam * 4))
    loss, _ = Objective(free_bits=100.0)(out, model)
    head = model.head.base if hasattr(model.head, "base") else model.head
    grad = torch.autograd.grad(loss - out.recon.mean(), head.loc.weight, allow_unused=True)[0]
    assert grad is None or torch.all(grad == 0)  # clamped: the KL sends no gradient


def test_warmup_is_applied_and_logged_by_the_trainer(idx_dir, tmp_path):
    cfg = RunConfig(
        dataset="mnist",
        data_dir=str(idx_dir),
        val_size=100,
        latent_dim=3,
        hidden=16,
        epochs=3,
        batch_size=100,
        device="cpu",
        pictures=False,
        kl_warmup=2,
        free_bits=0.05,
    )
    train(cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as f:
        betas = [float(r["beta"]) for r in csv.DictReader(f)]
    # 3 steps per epoch: the last step of epoch 1 is at progress 2/3 of an epoch, i.e. beta 1/3
    assert betas == pytest.approx([1 / 3, 5 / 6, 1.0])
