"""Training runs: reproducibility, resume, divergence handling, run-folder safety, checkpoints."""

import csv

import pytest
import torch

from rhovae.config import RunConfig
from rhovae.errors import RhovaeError
from rhovae.likelihoods import BernoulliLikelihood
from rhovae.runs import load_checkpoint, load_run, save_atomic
from rhovae.train import TrainingDiverged, train


def config(idx_dir, **kw):
    base = dict(
        dataset="mnist",
        data_dir=str(idx_dir),
        val_size=100,
        latent_dim=3,
        hidden=24,
        epochs=3,
        batch_size=64,
        device="cpu",
        pictures=False,
        seed=7,
    )
    base.update(kw)
    return RunConfig(**base)


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("epoch_seconds")
        r.pop("samples_per_second")
    return rows


def test_same_seed_same_numbers(idx_dir, tmp_path):
    a = train(config(idx_dir), tmp_path / "a", progress=False)
    b = train(config(idx_dir), tmp_path / "b", progress=False)
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    c = train(config(idx_dir, seed=8), tmp_path / "c", progress=False)
    assert c.history[-1]["train_loss"] != b.history[-1]["train_loss"]


@pytest.mark.parametrize("pixels", ["continuous", "dynamic"])
def test_resume_equals_uninterrupted(idx_dir, tmp_path, pixels):
    train(config(idx_dir, epochs=4, pixels=pixels), tmp_path / "full", progress=False)
    train(config(idx_dir, epochs=2, pixels=pixels), tmp_path / "cut", progress=False)
    train(config(idx_dir, epochs=4, pixels=pixels), tmp_path / "cut", resume=True, progress=False)
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "cut")
    full = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_run_folder_outputs_and_checkpoint_contents(idx_dir, tmp_path):
    run = tmp_path / "run"
    result = train(config(idx_dir, pictures=True, epochs=2), run, progress=False)
    for name in (
        "config.toml",
        "metrics.csv",
        "last.pt",
        "best.pt",
        "samples.png",
        "reconstructions.png",
        "loss_curves.png",
    ):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp"))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["config"]["posterior"] == "ar1" and ckpt["versions"]["torch"] == str(torch.__version__)
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["mean_abs_rho"]) < 1 for r in rows)
    model, cfg, best = load_run(run, "best", "cpu")
    assert best["epoch"] == result.best_epoch and cfg.latent_dim == 3 and not model.training


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(idx_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    original = BernoulliLikelihood.forward
    steps_per_epoch = 5  # 300 training images / batch 64

    def poisoned(self, params):
        if self.training:
            calls["n"] += 1
            if calls["n"] == steps_per_epoch + 3:  # third step of epoch 2
                return original(self, params * float("nan"))
        return original(self, params)

    monkeypatch.setattr(BernoulliLikelihood, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as e:
        train(config(idx_dir), run, progress=False)
    msg = str(e.value)
    assert "epoch 2, step 3" in msg and "reconstruction term is nan" in msg and "last.pt (epoch 1)" in msg
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_run_folder_conflicts_are_refused(idx_dir, tmp_path):
    run = tmp_path / "run"
    train(config(idx_dir, epochs=1), run, progress=False)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(RhovaeError, match="holds a different run.*posterior"):
        train(config(idx_dir, epochs=1, posterior="diagonal"), run, progress=False)
    with pytest.raises(RhovaeError, match="already holds this run; pass --resume"):
        train(config(idx_dir, epochs=1), run, progress=False)
    assert (run / "last.pt").read_bytes() == before  # nothing lost
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RhovaeError, match="not empty"):
        train(config(idx_dir, epochs=1), tmp_path / "other", progress=False)
    with pytest.raises(RhovaeError, match="nothing to resume"):
        train(config(idx_dir, epochs=1), tmp_path / "fresh", resume=True, progress=False)


def test_checkpoint_from_another_config_is_refused(idx_dir, tmp_path):
    run = tmp_path / "run"
    train(config(idx_dir, epochs=1), run, progress=False)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["config"]["latent_dim"] = 5
    torch.save(ckpt, run / "best.pt")
    with pytest.raises(RhovaeError, match="disagrees with .*config.toml on latent_dim"):
        load_run(run, "best", "cpu")  # never silently trust one side of a mixed folder
    (run / "config.toml").unlink()
    with pytest.raises(RhovaeError, match="does not fit its config"):
        load_run(run, "best", "cpu")
    (run / "last.pt").write_bytes(b"garbage")
    with pytest.raises(RhovaeError, match="unreadable checkpoint"):
        load_run(run, "last", "cpu")


def test_save_atomic_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_atomic({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RhovaeError, match=f"cannot write {path}"):
        save_atomic({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left behind


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("latent_dim", 0)])
def test_non_positive_sizes_are_refused(idx_dir, tmp_path, field, value):
    with pytest.raises(RhovaeError, match=field.replace("_", "-")):
        train(config(idx_dir, **{field: value}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
