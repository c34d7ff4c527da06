"""The Python API end to end: fit on arrays, Datasets and own networks; load round trips; raw inputs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image
from torch import nn

import rhovae
from rhovae.cli import main
from rhovae.errors import RhovaeError
from rhovae.model import MODELS

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(latent_dim=3, hidden=16, epochs=1, batch_size=32, device="cpu", pictures=False)


def test_public_names_are_exported():
    for name in rhovae.__all__:
        assert hasattr(rhovae, name), name
    assert {"fit", "load", "VAE", "RunConfig", "AR1Normal"} <= set(rhovae.__all__)


def test_fit_on_a_uint8_array_and_raw_inputs(tmp_path):
    images = make_images(300, 12, 0)  # (N, H, W) uint8
    model, run_dir = rhovae.fit(posterior="ar1", data=images, run_dir=tmp_path / "run", **TINY)
    assert (run_dir / "best.pt").is_file() and (run_dir / "metrics.csv").is_file()
    assert not model.training and model.latent_dim == 3
    # raw uint8 images are scaled exactly as in training: same numbers as the prepared floats
    prepared = torch.from_numpy(images[:5]).float().div(255).unsqueeze(1)
    q_raw, q_prepared = model.encode(images[:5]), model.encode(prepared)
    torch.testing.assert_close(q_raw.mean, q_prepared.mean)
    assert model.decode(q_raw.mean).event_shape == (1, 12, 12)
    assert model.reconstruct(images[:5]).shape == (5, 1, 12, 12)
    assert model.sample(4, seed=0).shape == (4, 1, 12, 12)
    torch.manual_seed(0)
    elbo = model.elbo(images[:5])
    torch.manual_seed(0)
    assert torch.equal(elbo, model.elbo(prepared))
    ll = model.log_likelihood(images[:5], k=20)
    assert ll.shape == (5,) and (ll >= elbo - 5).all()  # IWAE tightens the ELBO, up to MC noise
    with pytest.raises(RhovaeError, match="expected"):
        model.encode(np.zeros((2, 7, 7), dtype=np.uint8))  # the wrong size says what it wanted


def test_fit_on_real_vectors_with_a_gaussian_likelihood(tmp_path):
    x = np.random.default_rng(0).standard_normal((400, 6)).astype(np.float32) * 3  # outside [0, 1]
    model, _ = rhovae.fit(
        dict(posterior="diagonal", likelihood="gaussian"),
        data=torch.from_numpy(x),
        run_dir=tmp_path / "r",
        **TINY,
    )
    px = model.decode(torch.zeros(2, 3))
    assert px.event_shape == (6,) and isinstance(px.base_dist, torch.distributions.Normal)
    assert torch.isfinite(model.elbo(x[:4])).all()
    with pytest.raises(RhovaeError, match="likelihood gaussian"):
        rhovae.fit(posterior="diagonal", data=x, run_dir=tmp_path / "b", **TINY)  # Bernoulli needs [0, 1]


def test_fit_on_a_torch_dataset_with_labels(tmp_path):
    images = torch.from_numpy(make_images(200, 12, 1)).float().div(255).unsqueeze(1)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(200) % 10)
    model, run_dir = rhovae.fit(posterior="diagonal", data=dataset, run_dir=tmp_path / "r", **TINY)
    assert model.encode(images[:3]).batch_shape == (3,)


class Encoder(nn.Module):  # deliberately without out_features: rhovae measures it
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(144, 24), nn.Tanh())

    def forward(self, x):
        return self.net(x)


def own_decoder():
    return nn.Sequential(nn.Linear(3, 144), nn.Unflatten(1, (1, 12, 12)))


def test_fit_with_own_networks_and_load_them_back(tmp_path):
    images = make_images(200, 12, 2)
    model, run_dir = rhovae.fit(
        posterior="ar1", data=images, encoder=Encoder(), decoder=own_decoder(), run_dir=tmp_path / "r", **TINY
    )
    assert 'model = "custom"' in (run_dir / "config.toml").read_text()
    with pytest.raises(RhovaeError, match="own networks"):
        rhovae.load(run_dir)
    loaded = rhovae.load(run_dir, device="cpu", encoder=Encoder(), decoder=own_decoder())
    torch.testing.assert_close(loaded.encode(images[:4]).mean, model.encode(images[:4]).mean)
    assert main(["-q", "evaluate", str(run_dir), "--iwae-k", "2"]) == 2  # one clear line, not a crash
    with pytest.raises(RhovaeError, match="both an encoder and a decoder"):
        rhovae.fit(posterior="ar1", data=images, encoder=Encoder(), run_dir=tmp_path / "x", **TINY)
    bad = nn.Sequential(nn.Linear(3, 10))  # returns the wrong shape for the likelihood
    with pytest.raises(RhovaeError, match="decoder"):
        rhovae.fit(
            posterior="ar1", data=images, encoder=Encoder(), decoder=bad, run_dir=tmp_path / "y", **TINY
        )
    with pytest.raises(
        RhovaeError, match="likelihood 'decoder' needs a decoder that returns a torch Distribution"
    ):
        rhovae.fit(
            posterior="ar1", likelihood="decoder", data=images, encoder=Encoder(), decoder=own_decoder(),
            run_dir=tmp_path / "z", **TINY,
        )  # fmt: skip


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_load_round_trips_every_model(idx_dir, tmp_path, model_name):
    run = tmp_path / model_name
    sequences = model_name == "lstm"
    cfg = dict(TINY, model=model_name, posterior="ar1", hidden=16, limit=64, batch_size=32)
    data = ["--dataset", "nas201"] if sequences else ["--dataset", "mnist", "--data-dir", str(idx_dir)]
    if model_name == "frames":  # sequences of rotating 12x12 digits with gaps
        data = ["--dataset", "rotating:mnist", "--data-dir", str(idx_dir), "--frames", "3"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "pictures"]
    assert main(["-q", "train", *data, "--run-dir", str(run), "--no-progress", "--no-pictures", *flags]) == 0
    model, _, _ = rhovae.runs.load_run(run, "best", "cpu")
    from rhovae.runs import prepare_data

    x = prepare_data(model_cfg := rhovae.load_config(run / "config.toml"), torch.device("cpu")).test[:8]
    assert model_cfg.model == model_name
    loaded = rhovae.load(run, device="cpu")
    torch.manual_seed(3)
    before = model.elbo(x)
    torch.manual_seed(3)
    after = loaded.elbo(x)
    torch.testing.assert_close(before, after)
    raw = (
        (x.squeeze(1).numpy() * 255).round().astype(np.uint8)
        if model_name in ("mlp", "cnn", "infovae")
        else None
    )
    if raw is not None:  # raw uint8 images of the size the run was trained at
        assert loaded.encode(raw).batch_shape == (8,)


def test_rgb_folder_trains_cnn_and_evaluates_iwae(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 12)):
        for i in range(n):
            folder = tmp_path / "pics" / split / ("red" if i % 2 else "blue")
            folder.mkdir(parents=True, exist_ok=True)
            a = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            a[..., 0 if i % 2 else 2] += 180
            Image.fromarray(a).save(folder / f"{i}.png")
    run = tmp_path / "run"
    argv = [
        "-q",
        "train",
        "--dataset",
        f"folder:{tmp_path / 'pics'}",
        "--model",
        "cnn",
        "--posterior",
        "ar1",
        "--latent-dim",
        "4",
        "--hidden",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert (run / "samples.png").is_file() and (run / "reconstructions.png").is_file()
    assert main(["-q", "evaluate", str(run), "--iwae-k", "4"]) == 0
    assert "IWAE NLL (k=4)" in capsys.readouterr().out
    assert main(["-q", "explore", str(run)]) == 0
    for name in ("traversals.png", "interpolations.png", "latent_pca.png"):
        assert (run / "explore" / name).stat().st_size > 0
    model = rhovae.load(run, device="cpu")
    img = Image.open(next((tmp_path / "pics" / "test" / "red").iterdir()))  # a PIL image, raw
    assert model.encode(img).batch_shape == (1,)


def test_npz_vectors_train_mlp_with_gaussian_likelihood(tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    np.savez(tmp_path / "v.npz", train=x[:250], test=x[250:])
    run = tmp_path / "run"
    argv = [
        "-q",
        "train",
        "--dataset",
        f"npz:{tmp_path / 'v.npz'}",
        "--likelihood",
        "gaussian-per-feature",
        "--posterior",
        "ar1",
        "--latent-dim",
        "2",
        "--hidden",
        "16",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert not (run / "samples.png").exists()  # vectors are not pictures
    assert main(["-q", "evaluate", str(run), "--iwae-k", "4"]) == 0
    assert main(["-q", "sample", str(run), "-n", "5"]) == 0
    assert torch.load(run / "samples.pt", weights_only=True).shape == (5, 5)
    assert main(["-q", "explore", str(run)]) == 0  # the PCA works for any data
    assert (run / "explore" / "latent_pca.png").is_file()


def test_mnist_5k_trains_with_no_other_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["-q", "train", "--dataset", "mnist-5k", "--epochs", "1", "--limit", "256", "--no-progress"])
        == 0
    )
    assert (tmp_path / "runs" / "mnist-5k-mlp-ar1-d10-s0" / "best.pt").is_file()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
