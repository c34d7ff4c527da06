"""Train an AR(1)-posterior VAE on your own array of real-valued vectors, then use it from Python.

python examples/own_array.py [OUT_DIR]
"""

import sys
from pathlib import Path

import numpy as np
import torch

import rhovae

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/examples")

# 2,000 vectors of 16 features that live near a 2-D curve, plus noise: a Gaussian likelihood fits them
rng = np.random.default_rng(0)
t = rng.uniform(-2, 2, size=(2000, 2))
x = np.concatenate([np.sin(t), np.cos(t), t, t**2 / 4] * 2, axis=1).astype(np.float32)
x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)

model, run_dir = rhovae.fit(
    posterior="ar1", likelihood="gaussian", latent_dim=4, hidden=64, epochs=3, batch_size=100,
    data=x, run_dir=out / "own-array", device="cpu",
)  # fmt: skip
print("run folder:", run_dir)

model = rhovae.load(run_dir, device="cpu")  # the same model, read back from best.pt
q = model.encode(x[:5])  # an AR1Normal over z, batch (5,), event (4,)
print("posterior:", type(q).__name__, tuple(q.batch_shape), tuple(q.event_shape))
print("rho of the first example:", float(rhovae.posterior_statistics(q)["rho"][0]))
px = model.decode(q.mean)  # p(x|z): Independent(Normal), event (16,)
print("likelihood:", type(px.base_dist).__name__, tuple(px.event_shape))
print("ELBO per example:", model.elbo(x[:5]).numpy().round(2))
print("log p(x), IWAE k=100:", model.log_likelihood(x[:5], k=100).numpy().round(2))
samples = model.sample(3, seed=0)  # means of p(x|z), z ~ p(z)
assert samples.shape == (3, 16) and torch.isfinite(samples).all()
