"""Sequence sets and latent hierarchies through the trainer, the evaluator and the CLI."""

import json

import pytest
import torch
from conftest import train_argv

import rhovae
from rhovae.cli import main
from rhovae.data import load_data


def test_sequence_sets_load_as_non_image_data():
    data = load_data("nas201")
    assert data.data_shape == (6, 5) and "vocab" in data.meta
    assert len(data.train) + len(data.val) + len(data.test) == 5**6
    assert not (data.train.sum(-1) == 0).any()  # fixed length 6, no padding


@pytest.mark.parametrize("posterior", ["diagonal", "ar1"])
def test_lstm_on_nas201_trains_evaluates_and_samples_text(tmp_path, capsys, posterior):
    run = tmp_path / "run"
    argv = train_argv(
        run,
        f"--model lstm --posterior {posterior} --latent-dim 4 --hidden 32 --epochs 1 --limit 512",
        data=("--dataset", "nas201"),
    )
    assert main(argv) == 0
    assert (run / "samples.txt").read_text().count("|") > 0  # NAS-Bench-201 strings
    assert 'likelihood = "decoder"' in (run / "config.toml").read_text()  # what ran, not a default
    capsys.readouterr()
    assert main(["-q", "evaluate", str(run), "--iwae-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "prior samples validity" in out and "IWAE NLL (k=3)" in out
    record = json.loads((run / "evaluation.json").read_text())
    assert 0 <= record["validity"] <= 1 and 0 <= record["recon_token_acc"] <= 1
    assert main(["-q", "sample", str(run), "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("|") for line in lines)
    assert main(["-q", "sample", str(run), "-n", "3", "--temperature", "1.5"]) == 0


def test_lstm_runs_recorded_with_the_old_likelihood_name_resume_and_load(tmp_path):
    run = tmp_path / "run"
    flags = "--model lstm --latent-dim 2 --hidden 8 --limit 64 --no-pictures"
    assert main(train_argv(run, flags, "--epochs 1", data=("--dataset", "nas201"))) == 0
    config = run / "config.toml"
    config.write_text(config.read_text().replace('likelihood = "decoder"', 'likelihood = "bernoulli"'))
    for name in ("last.pt", "best.pt"):  # as an earlier rhovae wrote them
        ckpt = torch.load(run / name, weights_only=False)
        ckpt["config"]["likelihood"] = "bernoulli"
        torch.save(ckpt, run / name)
    assert main(train_argv(run, flags, "--epochs 2 --resume", data=("--dataset", "nas201"))) == 0
    assert rhovae.load(run, device="cpu").elbo(load_data("nas201", limit=4).test).shape == (4,)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--model lstm --likelihood gaussian", "decoder is its own likelihood; drop --likelihood gaussian"),
        # the flag's default, but given: refused as well (a run config that omits it is not)
        ("--model lstm --likelihood bernoulli", "decoder is its own likelihood; drop --likelihood bernoulli"),
        ("--model lstm --pixels static", "drop --pixels static"),
        ("--model mlp --likelihood decoder", "the mlp model needs another --likelihood"),
    ],
)
def test_likelihood_settings_that_do_not_apply_are_refused_in_one_line(tmp_path, capsys, flags, message):
    assert main(train_argv(tmp_path / "r", flags, "--epochs 1", data=("--dataset", "nas201"))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_sequence_data_on_a_flat_model_says_which_model_reads_sequences(tmp_path, caplog):
    argv = train_argv(
        tmp_path / "r", "--latent-dim 2 --hidden 8 --epochs 1 --limit 64", data=("--dataset", "nas201")
    )
    assert main(argv) == 0
    assert "--model lstm is the sequence VAE" in caplog.text


def test_a_conv_model_refusing_sequence_data_prints_the_refusal_alone(tmp_path, capsys, caplog):
    argv = train_argv(tmp_path / "r", "--model cnn --epochs 1 --limit 64", data=("--dataset", "nas201"))
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert "sequence VAE" not in caplog.text  # no note about reading sequences flat before the refusal


def test_lstm_refuses_image_data(idx_dir, tmp_path, capsys):
    argv = train_argv(
        tmp_path / "r", "--model lstm --epochs 1", data=("--dataset", "mnist", "--data-dir", str(idx_dir))
    )
    assert main(argv) == 2
    assert "lstm model takes sequence data" in capsys.readouterr().err


def test_hierarchy_trains_and_reports_each_group(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_argv(
        run,
        "--posterior ar1 --latent-groups 2 --latent-dim 4 --hidden 16 --group-hidden 16",
        "--epochs 1 --free-bits 0.1",
        data=("--dataset", "mnist", "--data-dir", str(idx_dir)),
    )
    assert main(argv) == 0
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train_kl_group_0" in header and "train_kl_group_1" in header
    assert main(["-q", "evaluate", str(run), "--iwae-k", "3"]) == 0
    record = json.loads((run / "evaluation.json").read_text())
    assert len(record["active_units_per_group"]) == 2
    model = rhovae.load(run, device="cpu")
    assert model.sample(5, seed=0).shape == (5, 1, 12, 12)
    with pytest.raises(rhovae.RhovaeError, match="sum"):
        rhovae.RunConfig(group_sizes="2,1", latent_dim=4).validate()


def test_made_prior_trains(idx_dir, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(
        run,
        "--prior made --latent-dim 3 --hidden 16 --epochs 1 --no-pictures",
        data=("--dataset", "mnist", "--data-dir", str(idx_dir)),
    )
    assert main(argv) == 0
    assert torch.isfinite(rhovae.load(run, device="cpu").sample(4, seed=1)).all()
