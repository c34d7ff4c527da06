"""One template for every (model x posterior) pair: shapes, finite loss, gradients everywhere, an overfit."""

import pytest
import torch
from conftest import make_images, overfit

from rhovae.errors import RhovaeError
from rhovae.model import MODELS, ModelConfig, build_model
from rhovae.posteriors import HEADS

FAMILIES = sorted(HEADS) + ["planar", "iaf", "ar1+iaf", "ar1+planar"]
# lstm: sequences, its own template below; frames: frame sequences, its own in test_frames_model.py
IMAGE_MODELS = [m for m in sorted(MODELS) if m not in ("lstm", "frames")]
PAIRS = [(m, p) for m in IMAGE_MODELS for p in FAMILIES]
# the overfit runs every base family in every model, and the flows in the MLP (the costly convolutional
# models add nothing flow-specific there)
OVERFIT = [(m, p) for m in IMAGE_MODELS for p in sorted(HEADS)] + [("mlp", p) for p in FAMILIES[4:]]


def model_shape(model, shape):
    """The dataset's shape as the model receives it: some backbones take resized images (betavae: 64x64)."""
    size = MODELS[model].input_size
    return (shape[0], *size) if size else shape


@pytest.mark.parametrize("model, posterior", PAIRS)
@pytest.mark.parametrize("shape", [(1, 12, 12), (3, 32, 32)])
def test_shapes_loss_and_gradients(model, posterior, shape):
    torch.manual_seed(0)
    shape = model_shape(model, shape)
    vae = build_model(ModelConfig(model=model, posterior=posterior, latent_dim=4, hidden=32), shape)
    x = torch.rand(5, *shape)
    out = vae(x)
    loss = out.recon + out.kl
    assert loss.shape == (5,) and out.z.shape == (5, 4) and torch.isfinite(loss).all()
    assert vae.decoder(out.z).shape == (5, *shape)
    assert vae.decode(out.z).event_shape == shape and vae.decode(out.z).batch_shape == (5,)
    assert vae.reconstruct(x).shape == (5, *shape) and vae.sample(3, seed=0).shape == (3, *shape)
    loss.mean().backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # a fresh IAF's gradient reaches its zero-initialised output layers first, not the layers before
        if not (name.startswith("head.iaf") or name.startswith("head.context")):
            assert p.grad.abs().sum() > 0, name
    with torch.no_grad():
        assert vae.iwae_bound(x, 7).shape == (5,)


@pytest.mark.parametrize("model, posterior", OVERFIT)
def test_overfit_lowers_loss_by_a_third(model, posterior):
    torch.manual_seed(0)
    shape = model_shape(model, (1, 12, 12))
    vae = build_model(ModelConfig(model=model, posterior=posterior, latent_dim=4, hidden=64), shape)
    # the convolutional models cost 10-50x the MLP per image: 64 images show the same learning
    n = 256 if model == "mlp" else 64
    x = torch.from_numpy(make_images(n, 12, 3)).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=shape[1:], mode="bilinear") if shape[1:] != (12, 12) else x
    start, end = overfit(vae, x, steps=40 if shape[1] == 64 else 80, lr=2e-3)
    assert end < start * 2 / 3, (start, end)


def test_cnn_parameter_counts_differ_only_in_the_head():
    counts = {
        p: sum(
            t.numel() for t in build_model(ModelConfig(model="cnn", posterior=p), (1, 28, 28)).parameters()
        )
        for p in ("diagonal", "ar1")
    }
    # heads on 400 features: diagonal 2d outputs, AR(1) d + 2 (d = 10)
    assert counts["diagonal"] - counts["ar1"] == 401 * (20 - 12)


@pytest.mark.parametrize("model", ["cnn", "infovae"])
def test_conv_models_reject_tiny_images(model):
    with pytest.raises(RhovaeError, match="at least 4x4"):
        build_model(ModelConfig(model=model), (1, 3, 3))


def test_betavae_insists_on_its_input_size():
    with pytest.raises(RhovaeError, match="64x64"):
        build_model(ModelConfig(model="betavae"), (1, 28, 28))


def test_batchnorm_does_not_leak_batch_statistics_in_eval_mode():
    torch.manual_seed(0)
    vae = build_model(ModelConfig(model="infovae", posterior="ar1", latent_dim=4), (1, 12, 12))
    x = torch.rand(64, 1, 12, 12)
    overfit(vae, x, steps=3, lr=1e-3)  # moves the running statistics away from their initial values
    vae.eval()
    with torch.no_grad():
        alone = vae.posterior(x[:1]).mean
        together = vae.posterior(x).mean[:1]
        torch.testing.assert_close(alone, together)
        torch.testing.assert_close(vae.reconstruct(x[:1]), vae.reconstruct(x)[:1])


@pytest.mark.parametrize("posterior", FAMILIES)
def test_lstm_template_on_sequences(posterior):
    from rhovae.data import load_data

    torch.manual_seed(0)
    data = load_data("nas201", limit=256)
    cfg = ModelConfig(model="lstm", posterior=posterior, latent_dim=4, hidden=32)
    vae = build_model(cfg, data.data_shape, meta=data.meta)
    x = data.train[:5]
    out = vae(x)
    loss = out.recon + out.kl
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    assert vae.decode(out.z).event_shape == data.data_shape
    assert vae.reconstruct(x).shape == x.shape and vae.sample(3, seed=0).shape == (3, *data.data_shape)
    loss.mean().backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        assert vae.iwae_bound(x, 7).shape == (5,)
    if posterior in ("diagonal", "ar1"):
        start, end = overfit(vae, data.train[:256], steps=60, lr=3e-3)
        assert end < start, (start, end)  # nas201 is uniform: the optimum is 6 log 5, little to gain
