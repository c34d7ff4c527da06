"""`rhovae compare`: the grid, resuming, the report's rows and statistics, and the paper-legacy mode."""

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import toy_experiment as toy
from conftest import train_argv

from rhovae.cli import main
from rhovae.config import RunConfig
from rhovae.distributions import AR1Normal
from rhovae.errors import RhovaeError
from rhovae.experiments import compare, load_experiment, paired_difference
from rhovae.legacy import PaperLegacyAR1, paper_legacy_kl_total
from rhovae.model import ModelConfig, build_model
from rhovae.objectives import Objective


def test_two_run_grid_writes_report_with_the_right_rows(idx_dir, tmp_path):
    report = compare(toy(idx_dir), tmp_path / "out")
    out = tmp_path / "out"
    assert report == out / "report.md" and (out / "report.json").exists()
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["posterior"] for r in rows] == ["diagonal", "ar1"] and all(r["seed"] == "0" for r in rows)
    assert all(float(r["iwae_nll"]) > 0 and r["kl_estimator"] == "exact" for r in rows)
    data = json.loads((out / "report.json").read_text())
    assert [s["posterior"] for s in data["summary"]] == ["diagonal", "ar1"]
    (pair,) = data["paired"]
    assert pair["posterior"] == "ar1" and pair["test_neg_elbo"]["n"] == 1
    expected = float(rows[1]["test_neg_elbo"]) - float(rows[0]["test_neg_elbo"])
    assert pair["test_neg_elbo"]["mean"] == pytest.approx(expected)
    text = report.read_text()
    assert "| mlp | mnist | ar1 | 1 |" in text and "Paired differences" in text
    for pic in data["pictures"]:
        assert (out / pic["path"]).stat().st_size > 0


def test_interrupted_grid_resumes_without_redoing_finished_runs(idx_dir, tmp_path, monkeypatch):
    exp = toy(idx_dir, seeds=(0, 1))
    compare(exp, tmp_path / "out")
    calls = []
    import rhovae.train

    original = rhovae.train.train

    def counting(cfg, run_dir, resume=False, **kw):
        calls.append((run_dir.name, resume))
        return original(cfg, run_dir, resume=resume, **kw)

    monkeypatch.setattr(rhovae.train, "train", counting)
    compare(exp, tmp_path / "out")
    assert calls == []  # everything finished before
    runs = tmp_path / "out" / "runs"
    (runs / "mlp-mnist-ar1-s1" / "evaluation.json").unlink()  # killed after training, before evaluation
    compare(exp, tmp_path / "out")
    assert calls == [("mlp-mnist-ar1-s1", True)]
    with open(tmp_path / "out" / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    # the time the report states counts every run, not only what the last command did
    spent = json.loads((tmp_path / "out" / "report.json").read_text())["compute_seconds"]
    training = evaluation = 0.0
    for run in runs.iterdir():
        with open(run / "metrics.csv") as f:
            training += sum(float(r["epoch_seconds"]) for r in csv.DictReader(f))
        evaluation += json.loads((run / "evaluation.json").read_text())["evaluation_seconds"]
    assert spent == pytest.approx({"training": training, "evaluation": evaluation, "evaluated": 4})
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"Time summed over the 4 runs: training passes {training / 60:.1f} min" in text
    assert f"final evaluation {evaluation / 60:.1f} min;" in text
    # a record from before evaluations were timed: the figure says how many runs it covers
    record = json.loads((runs / "mlp-mnist-ar1-s0" / "evaluation.json").read_text())
    del record["evaluation_seconds"]
    (runs / "mlp-mnist-ar1-s0" / "evaluation.json").write_text(json.dumps(record))
    compare(exp, tmp_path / "out")
    assert "(timed for 3 of the 4 runs)" in (tmp_path / "out" / "report.md").read_text()


def test_paired_difference_against_a_hand_computed_example():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653; half width 4.302653 / sqrt(3) = 2.484138
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(1.0) and d["n"] == 3
    assert d["low"] == pytest.approx(2.0 - 2.484138, abs=1e-6) and d["high"] == pytest.approx(
        4.484138, abs=1e-6
    )
    one = paired_difference([5.0], [4.0])
    assert one["mean"] == 1.0 and math.isnan(one["low"])
    with pytest.raises(RhovaeError):
        paired_difference([1.0], [1.0, 2.0])


def test_presets_load_and_expand():
    quick = load_experiment("quick")
    assert quick.grid["posterior"] == ["diagonal", "ar1"] and quick.iwae_k == 100
    paper = load_experiment("paper")
    assert len(paper.grid["model"]) * len(paper.grid["dataset"]) * 2 * 3 == 48
    families = load_experiment("families")
    assert "ar1+iaf" in families.grid["posterior"] and families.iwae_k == 5000
    assert len(families.configs()) == 21 and families.configs()[0][1].pixels == "dynamic"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[grid]\nposterior = []\n", "non-empty lists"),
        ("[grid]\nposterior = ['ar1']\n[misc]\na = 1\n", "unknown section"),
        ("[grid]\nposterior = ['ar1']\n[evaluate]\niwae = 3\n", "unknown key 'iwae'"),
        ("[grid]\nposterior = ['ar7']\n", "unknown posterior 'ar7'"),
        ("[grid]\nlatent_dim = [0]\n", r"latent-dim 0 \(no latent\)"),
        ("[grid]\nposterior = ['ar1', 'ar1']\n", "same run"),
    ],
)
def test_bad_experiment_files(tmp_path, text, message):
    path = tmp_path / "e.toml"
    path.write_text(text)
    with pytest.raises(RhovaeError, match=message):
        load_experiment(path).configs()


def test_cli_compare_needs_exactly_one_experiment(capsys):
    assert main(["compare"]) == 2
    assert "give an experiment file or --preset" in capsys.readouterr().err
    assert main(["compare", "/nonexistent.toml"]) == 2
    assert "no such experiment file" in capsys.readouterr().err


# --- the paper-legacy estimator, from the description in docs/math.md §13 ---------------------------


def test_legacy_kl_equals_the_reference_formula_on_fixed_tensors():
    mu = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], dtype=torch.float64)
    rho = torch.tensor([[0.3], [-0.8]], dtype=torch.float64)
    s = torch.tensor([0.25, 4.0], dtype=torch.float64)
    d, batch = 3, 2
    # written out term by term: 1/2 (sum over batch and dims of mu^2 + mean over batch of the rest)
    mu_sq = sum(float(v) ** 2 for v in mu.flatten())
    rest = [
        (-d * math.log(s[b]) - (d - 1) * math.log(1 - float(rho[b, 0]) ** 2) + d * (float(s[b]) - 1))
        for b in range(batch)
    ]
    expected = 0.5 * (mu_sq + sum(rest) / batch)
    assert float(paper_legacy_kl_total(mu, rho, s.sqrt()[:, None])) == pytest.approx(expected, rel=1e-12)
    # per sample the covariance terms weigh 1/B against the exact KL's 1
    exact = torch.distributions.kl_divergence(
        AR1Normal(mu, rho, s.sqrt()[:, None]),
        torch.distributions.Independent(
            torch.distributions.Normal(
                torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
            ),
            1,
        ),
    )
    assert float(exact.mean()) != pytest.approx(expected / batch)


def test_legacy_sampler_is_the_random_walk():
    loc = torch.zeros(2, 5, dtype=torch.float64)
    scale = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    q = PaperLegacyAR1(loc, torch.tensor([[0.9], [-0.9]], dtype=torch.float64), scale)
    torch.manual_seed(0)
    z = q.rsample()
    torch.manual_seed(0)
    eps = torch.randn(2, 5, dtype=torch.float64)
    u = torch.zeros_like(eps)
    u[:, 0] = scale[:, 0] * eps[:, 0]
    for j in range(1, 5):
        u[:, j] = u[:, j - 1] + scale[:, 0] * eps[:, j]  # rho never enters
    torch.testing.assert_close(z, u)


def test_legacy_objective_and_head_only_in_training():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(posterior="ar1", latent_dim=3, hidden=8, kl_estimator="paper-legacy"), (1, 4, 4)
    )
    x = torch.rand(8, 1, 4, 4)
    out = model(x)
    assert isinstance(out.q, PaperLegacyAR1)
    loss, _ = Objective(kl_estimator="paper-legacy")(out, model)
    expected = out.recon.mean() + paper_legacy_kl_total(out.q.loc, out.q.rho, out.q.scale) / 8
    torch.testing.assert_close(loss, expected)
    model.eval()
    q = model.posterior(x)
    assert type(q) is AR1Normal  # evaluation is exact
    with pytest.raises(RhovaeError, match="paper-legacy"):
        RunConfig(posterior="iaf", kl_estimator="paper-legacy").validate()


def test_legacy_runs_are_labelled_in_every_output(idx_dir, tmp_path, capsys, caplog):
    report = compare(
        toy(idx_dir), tmp_path / "out", overrides={"kl_estimator": "paper-legacy", "pictures": False}
    )
    assert "NOT an ELBO" in report.read_text()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "NOT an ELBO" in data["note"] and all(r["kl_estimator"] == "paper-legacy" for r in data["runs"])
    run = tmp_path / "out" / "runs" / "mlp-mnist-ar1-s0"
    with open(run / "metrics.csv") as f:
        assert all(row["objective"] == "paper-legacy objective, NOT an ELBO" for row in csv.DictReader(f))
    assert main(["-q", "evaluate", str(run), "--iwae-k", "3", "--device", "cpu"]) == 0
    assert "NOT an ELBO" in capsys.readouterr().out
    caplog.set_level(logging.INFO)
    assert main(train_argv(tmp_path / "r", "--kl-estimator paper-legacy --posterior ar1 --epochs 1",
                           data=("--dataset", "mnist", "--data-dir", str(idx_dir)))[1:]) == 0  # fmt: skip
    assert "epoch 1: train" in caplog.text and "[paper-legacy objective, NOT an ELBO]" in caplog.text


def test_parallel_jobs_give_the_same_report_rows(idx_dir, tmp_path):
    compare(toy(idx_dir, pictures=False), tmp_path / "a", jobs=1)
    compare(toy(idx_dir, pictures=False), tmp_path / "b", jobs=2)
    rows = []
    for d in ("a", "b"):
        with open(tmp_path / d / "runs.csv") as f:
            rows.append([{k: v for k, v in r.items() if k != "epoch_seconds"} for r in csv.DictReader(f)])
    assert rows[0] == rows[1]


def test_option_bundles_vary_several_settings_at_once(idx_dir, tmp_path):
    exp = toy(idx_dir, pictures=False)
    exp.grid = {"model": ["mlp"], "dataset": ["mnist"], "aid": ["none", "free-bits"], "posterior": ["ar1"]}
    exp.options = {"aid": {"none": {}, "free-bits": {"free_bits": 0.5, "kl_warmup": 1}}}
    points = exp.points()
    assert [p[2]["aid"] for p in points] == ["none", "free-bits"]
    assert points[1][1].free_bits == 0.5 and points[1][1].kl_warmup == 1 and points[0][1].free_bits == 0
    compare(exp, tmp_path / "out")
    with open(tmp_path / "out" / "runs.csv") as f:
        assert [r["aid"] for r in csv.DictReader(f)] == ["none", "free-bits"]
    exp.grid["aid"] = ["warm-up"]
    with pytest.raises(RhovaeError, match=r"aid = 'warm-up' is not one of \[options.aid\]"):
        exp.points()
    for preset in ("sequences", "hierarchy"):
        assert len(load_experiment(preset).points()) in (90, 24)


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/*.toml")), ids=lambda p: p.name
)
def test_shipped_configs_load_and_every_run_validates(path):
    """Every experiment file in configs/ (the commands of the README and docs/results.md) expands to its
    grid, and every grid point is a valid run config: a typo in one is a failing test, not a failed
    hour-long compare."""
    exp = load_experiment(path)
    configs = exp.configs()
    assert configs and exp.name == path.stem
    assert len({rid for rid, _, _ in exp.points()}) == len(configs)
