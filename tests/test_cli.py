"""The `rhovae` command end to end, and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from rhovae.cli import build_parser, config_flags, main
from rhovae.config import RunConfig


def tiny(idx_dir, run_dir, *extra):
    return [
        "-q",
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(idx_dir),
        "--val-size",
        "100",
        "--latent-dim",
        "3",
        "--hidden",
        "16",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *extra,
    ]


def test_train_evaluate_sample_reconstruct(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny(idx_dir, run)) == 0
    assert "test loss" in capsys.readouterr().out
    assert main(["-q", "evaluate", str(run), "--iwae-k", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "IWAE NLL (k=5)" in out and "rho  median" in out
    result = json.loads((run / "evaluation.json").read_text())
    assert result["iwae_k"] == 5 and result["test_images"] == 100
    assert result["iwae_nll"] <= result["test_neg_elbo"] + 1.0  # IWAE tightens the bound (MC slack)
    assert 0 <= result["active_units"] <= 3
    assert -1 < result["posterior_statistics"]["rho"]["q50"] < 1
    assert (
        main(["-q", "sample", str(run), "-n", "9", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    )
    assert (
        main(["-q", "reconstruct", str(run), "-n", "4", "--out", str(tmp_path / "r.png"), "--device", "cpu"])
        == 0
    )
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0


def test_config_file_with_flag_override(idx_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('posterior = "diagonal"\nlatent_dim = 2\nepochs = 1\n')
    run = tmp_path / "run"
    assert main([*tiny(idx_dir, run), "--config", str(cfg), "--epochs", "1"]) == 0
    saved = (run / "config.toml").read_text()
    assert 'posterior = "diagonal"' in saved and "latent_dim = 3" in saved  # the flag wins over the file


def test_every_flag_is_explained():
    flags = config_flags()
    assert set(flags) == {f.name for f in __import__("dataclasses").fields(RunConfig)}
    assert all(len(text) > 10 for text in flags.values())  # every setting explains itself
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in flags:
        assert "--" + name.replace("_", "-") in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--posterior", "ar7"], "unknown posterior 'ar7'"),
        (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["train", "--latent-dim", "0"], "latent-dim 0 (no latent) is the sequence model"),
        (["train", "--batch-size", "-3"], "batch-size must be positive"),
        (["train", "--config", "/nonexistent.toml"], "config file not found"),
        (["evaluate", "/nonexistent-run"], "no such run folder"),
        (["sample", "/nonexistent-run"], "no such run folder"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rhovae: error:") and message in err and "\n" not in err and "Traceback" not in err


def test_bad_config_keys_and_types(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("latent_dimension = 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key 'latent_dimension'" in capsys.readouterr().err
    bad.write_text('epochs = "ten"\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "must be a int" in capsys.readouterr().err


def test_missing_and_corrupt_data_through_the_cli(idx_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(tiny(empty, tmp_path / "r1")) == 2
    assert "no mnist dataset there" in capsys.readouterr().err  # an explicit --data-dir is used or fails
    assert not (tmp_path / "r1").exists()  # a run that never started leaves no folder behind
    (idx_dir / "t10k-images-idx3-ubyte").write_bytes((idx_dir / "t10k-images-idx3-ubyte").read_bytes()[:-7])
    assert main(tiny(idx_dir, tmp_path / "r2")) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte: IDX file truncated" in err and "\n" not in err.strip()


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """``rhovae ... | head``: the reader leaves, rhovae stops without an error line or a traceback, and
    exits 0: its work is done and saved; only the summary had nowhere to go (``train ... | true``)."""
    code = (
        "import sys; from rhovae import cli; sys.stdout.close = lambda: None\n"
        "def listing(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli.COMMANDS['sample'] = listing\n"
        "sys.exit(cli.main(['sample', 'x']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""


def test_installed_entry_point_exits_non_zero_without_traceback(tmp_path):
    env = {**os.environ, "RHOVAE_DATA": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "rhovae.cli", "train", "--posterior", "nope"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rhovae: error: unknown posterior 'nope'; choose one of:")


@pytest.mark.parametrize("posterior", ["planar", "iaf", "ar1+iaf"])
def test_flow_families_train_and_report_iwae(idx_dir, tmp_path, capsys, posterior):
    run = tmp_path / "run"
    assert main([*tiny(idx_dir, run), "--posterior", posterior, "--flow-steps", "2", "--kl-warmup", "1"]) == 0
    assert main(["-q", "evaluate", str(run), "--iwae-k", "10", "--device", "cpu"]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["posterior"] == posterior
    for key in ("test_neg_elbo", "iwae_nll"):
        assert result[key] == result[key] and abs(result[key]) < 1e6  # finite
    if posterior == "ar1+iaf":
        assert -1 < result["posterior_statistics"]["rho"]["q50"] < 1
