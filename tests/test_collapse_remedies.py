"""The sequence VAE's language-model baseline and the remedies for posterior collapse: the LM's exact
NLL, cyclical annealing, BN-VAE's KL floor, aggressive inference training (resumable), the δ-VAE's
committed rate through a run, and the one-line refusals of settings that cannot apply."""

import csv
import json
import math

import pytest
import torch
from conftest import train_argv

from rhovae.cli import main
from rhovae.config import RunConfig
from rhovae.data import load_data
from rhovae.errors import RhovaeError
from rhovae.model import build_model
from rhovae.objectives import Objective

NAS = ("--dataset", "nas201")


def nas_run(run, *flags):
    return train_argv(
        run, "--model lstm --hidden 32 --epochs 1 --limit 384 --batch-size 64", *flags, data=NAS
    )


def metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_the_language_model_is_the_decoder_alone_and_its_nll_is_exact(tmp_path, capsys):
    run = tmp_path / "lm"
    assert main(nas_run(run, "--latent-dim 0")) == 0
    assert main(["-q", "evaluate", str(run), "--iwae-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "active units        0 of 0" in out
    record = json.loads((run / "evaluation.json").read_text())
    assert record["test_kl"] == 0
    assert record["iwae_nll"] == pytest.approx(record["test_neg_elbo"], abs=1e-4)  # no latent: exact
    data = load_data("nas201", limit=64)
    cfg = RunConfig(model="lstm", dataset="nas201", latent_dim=0, hidden=16).validate()
    model = build_model(cfg, data.data_shape, meta=data.meta)
    assert not any(name.startswith(("encoder.", "head.")) for name, _ in model.named_parameters())
    x = data.test[:8]
    with torch.no_grad():
        exact = model.decode(torch.zeros(8, 0)).log_prob(x)
        torch.testing.assert_close(model.iwae_bound(x, 7), exact)


@pytest.mark.parametrize(
    "flags, says",
    [
        ("--latent-dim 0 --posterior diagonal", "posterior diagonal cannot apply"),
        ("--latent-dim 0 --kl-warmup 2", "kl-warmup cannot apply"),
        ("--latent-dim 0 --free-bits 0.5", "free-bits cannot apply"),
        ("--latent-dim 0 --aggressive", "aggressive cannot apply"),
        ("--latent-dim 0 --prior ar1", "prior ar1 cannot apply"),
        ("--latent-dim 0 --model mlp", "use it with --model lstm"),
        ("--prior-rho 0.9", "add --prior ar1"),
        ("--prior ar1 --prior-rho 1.0", "prior-rho must lie in (-1, 1)"),
        ("--prior ar1 --prior-rho -1.5", "prior-rho must lie in (-1, 1)"),
        ("--kl-cycles 4 --kl-warmup 2", "kl-cycles and kl-warmup both schedule beta"),
        ("--kl-cycles 4 --kl-cycle-rise 0", "kl-cycle-rise must be in (0, 1]"),
        ("--bn-gamma 0.5 --posterior iaf", "not posterior 'iaf'"),
        ("--bn-gamma -1", "bn-gamma must be >= 0"),
        ("--model infovae --aggressive", "objective is infovae"),
        ("--latent-dim -1", "latent-dim must be positive"),
        ("--model mlp --word-dropout 0.2", "drop --word-dropout"),
    ],
)
def test_settings_that_cannot_apply_are_one_line(flags, says, tmp_path, capsys):
    assert main(nas_run(tmp_path / "r", flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rhovae: error: ") and says in err, err
    assert not (tmp_path / "r").exists()


def test_cyclical_annealing_follows_fu_et_al():
    objective = Objective(beta=2.0, cycles=4, cycle_rise=0.5)
    objective.total = 400
    weights = [objective.kl_weight(t) for t in range(400)]
    for cycle in range(4):
        start = cycle * 100
        assert weights[start] == 0.0  # each cycle starts at 0
        assert weights[start + 25] == pytest.approx(1.0)  # linear rise over R = 0.5 of the cycle
        assert all(w == 2.0 for w in weights[start + 50 : start + 100])  # then held at beta


def test_cyclical_annealing_in_a_run(tmp_path):
    run = tmp_path / "r"
    argv = nas_run(run, "--latent-dim 4 --kl-cycles 2 --kl-warmup-unit steps")
    argv[argv.index("--epochs") + 1] = "4"
    assert main(argv) == 0
    betas = [float(r["beta"]) for r in metrics(run)]  # beta at each epoch's last step
    # two epochs a cycle: the first ends still rising (5 of 6 steps of the rise), the second on the plateau
    assert betas[0] == pytest.approx(5 / 6) and betas[1] == 1.0
    assert betas[2] == pytest.approx(betas[0]) and betas[3] == 1.0


@pytest.mark.parametrize("posterior", ["diagonal", "ar1", "full"])
def test_bn_vae_floors_the_batch_kl(posterior):
    torch.manual_seed(0)
    gamma, d = 0.6, 6
    data = load_data("nas201", limit=256)
    cfg = RunConfig(
        model="lstm", dataset="nas201", latent_dim=d, hidden=16, posterior=posterior, bn_gamma=gamma
    ).validate()
    model = build_model(cfg, data.data_shape, meta=data.meta).train()
    out = model(data.train[:128])
    means = out.q.mean
    torch.testing.assert_close(means.std(0, unbiased=False), torch.full((d,), gamma), atol=1e-3, rtol=0)
    # KL to N(0, I) >= |mu|^2 / 2 per example, and the batch's mean |mu_j|^2 >= gamma^2
    assert float(out.kl.mean()) >= d * gamma**2 / 2 * (1 - 1e-3)


def test_aggressive_training_records_its_phase_and_resumes_exactly(tmp_path):
    flags = "--latent-dim 4 --aggressive --no-pictures"
    whole, split = tmp_path / "whole", tmp_path / "split"
    two = nas_run(whole, flags)
    two[two.index("--epochs") + 1] = "2"
    assert main(two) == 0
    rows = metrics(whole)
    assert [r["aggressive"] for r in rows][0] == "1"
    assert float(rows[0]["encoder_steps"]) >= 15 and "val_mutual_information" in rows[0]
    assert math.isfinite(float(rows[0]["val_mutual_information"]))
    assert main(nas_run(split, flags)) == 0
    again = nas_run(split, flags, "--resume")
    again[again.index("--epochs") + 1] = "2"
    assert main(again) == 0
    drop = ("epoch_seconds", "samples_per_second")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(split)] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows
    ]
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (whole, split))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_delta_vae_commits_a_rate_in_a_run(tmp_path):
    from rhovae.priors import committed_rate

    run = tmp_path / "r"
    assert main(nas_run(run, "--latent-dim 8 --posterior diagonal --prior ar1 --prior-rho 0.95")) == 0
    delta = committed_rate(0.95, 8)
    assert delta > 3  # 3.09 nats for d = 8 (docs/math.md, eq. 12)
    for row in metrics(run):
        assert float(row["train_kl"]) >= delta - 1e-4 and float(row["val_kl"]) >= delta - 1e-4


def test_grids_hold_one_language_model_per_seed():
    from rhovae.experiments import Experiment

    exp = Experiment(
        name="lm",
        grid={
            "model": ["lstm"],
            "dataset": ["nas201"],
            "remedy": ["lm", "plain"],
            "posterior": ["diagonal", "ar1"],
            "seed": [0, 1],
        },  # fmt: skip
        options={"remedy": {"lm": {"latent_dim": 0}, "plain": {}}},
        run={"latent_dim": 4, "hidden": 16},
    )
    points = exp.points()
    lm = [(rid, choices) for rid, cfg, choices in points if cfg.latent_dim == 0]
    assert len(lm) == 2 and all(c["posterior"] == "none" for _, c in lm)  # one per seed, not per posterior
    assert len(points) == 2 + 4
    with pytest.raises(RhovaeError):
        RunConfig(model="lstm", dataset="nas201", latent_dim=0, kl_cycles=2).validate()


def test_validation_is_measured_at_the_target_beta(tmp_path):
    run = tmp_path / "r"
    argv = nas_run(run, "--latent-dim 4 --kl-cycles 2 --kl-warmup-unit steps --beta 1")
    argv[argv.index("--epochs") + 1] = "4"
    assert main(argv) == 0
    for row in metrics(run):  # whatever beta training stood at, validation weighs the KL by beta = 1
        assert float(row["val_loss"]) == pytest.approx(
            float(row["val_recon"]) + float(row["val_kl"]), rel=1e-4
        )


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_bn_vae_trains_on_batches_of_one_and_two(tmp_path, batch_size):
    argv = nas_run(tmp_path / "r", "--latent-dim 3 --posterior diagonal --bn-gamma 0.5")
    argv[argv.index("--limit") + 1] = "49"
    argv[argv.index("--batch-size") + 1] = batch_size
    assert main(argv) == 0


def test_a_language_model_has_nothing_to_explore(tmp_path, capsys):
    run = tmp_path / "lm"
    assert main(nas_run(run, "--latent-dim 0")) == 0
    capsys.readouterr()
    assert main(["explore", str(run)]) == 2
    assert "nothing to explore" in capsys.readouterr().err


def test_the_lm_table_pairs_runs_when_latent_dim_is_a_grid_key():
    from rhovae.experiments.grid import Experiment
    from rhovae.experiments.report import _versus_language_model

    exp = Experiment(name="x", grid={"latent_dim": [0, 8], "posterior": ["diagonal"], "seed": [0, 1]})
    rows = [
        {"latent_dim": d, "posterior": "none" if d == 0 else "diagonal", "seed": s, "iwae_nll": 10.0 + d + s,
         "test_kl": 0.0, "active_units": 0, "_language_model": d == 0}
        for d in (0, 8) for s in (0, 1)
    ]  # fmt: skip
    (entry,) = _versus_language_model(exp, rows, ["latent_dim"])
    assert entry["iwae_nll"]["mean"] == pytest.approx(8.0) and entry["iwae_nll"]["n"] == 2


def test_reports_name_each_runs_posterior_where_the_grid_does_not_vary_it(tmp_path):
    """A remedy may set the family itself (``bn-vae-ar1 = {posterior = "ar1"}``): the report's posterior
    column then says ar1 for it, the fixed setting for the others and none for the language model."""
    toml = tmp_path / "exp.toml"
    toml.write_text(
        'name = "x"\n[grid]\nseed = [0]\nmodel = ["lstm"]\ndataset = ["nas201"]\n'
        'remedy = ["lm", "plain", "bn-ar1"]\n'
        "[options.remedy]\nlm = { latent_dim = 0 }\nplain = {}\n"
        'bn-ar1 = { bn_gamma = 0.5, posterior = "ar1" }\n'
        "[run]\nepochs = 1\nlimit = 64\nlatent_dim = 3\nhidden = 8\nbatch_size = 32\npictures = false\n"
        'posterior = "diagonal"\n'
        "[evaluate]\niwae_k = 2\niwae_limit = 8\n"
    )
    assert main(["compare", str(toml), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["remedy"], s["posterior"]) for s in report["summary"]] == [
        ("lm", "none"), ("plain", "diagonal"), ("bn-ar1", "ar1")
    ]  # fmt: skip
    with open(tmp_path / "out" / "runs.csv") as f:
        assert [r["posterior"] for r in csv.DictReader(f)] == ["none", "diagonal", "ar1"]
    assert "| lstm | nas201 | bn-ar1 | ar1 |" in (tmp_path / "out" / "report.md").read_text()
