"""A spatial latent map: SeparableAR1Normal as a torch distribution, then a cnn VAE whose latent is an
8x7x7 map with the separable 2-D AR(1) posterior and prior, trained for one epoch on a small array.

python examples/latent_map.py [RUN_PARENT]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import rhovae
from rhovae import SeparableAR1Normal, StandardNormal

# the distribution: per channel Cov = s T(rho_rows) kron T(rho_cols)
loc = torch.zeros(4, 8, 7, 7)  # (B, C, H, W)
q = SeparableAR1Normal(loc, torch.full((4, 8), 0.7), torch.full((4, 8), -0.3), torch.ones(4, 8))
z = q.rsample()  # (4, 8, 7, 7): exact, differentiable
print("log q(z):", q.log_prob(z))
print("KL to N(0, I):", kl_divergence(q, StandardNormal((8, 7, 7))))  # closed form, O(C H W)
dense = MultivariateNormal(loc.flatten(1), covariance_matrix=q.covariance_matrix)
torch.testing.assert_close(q.log_prob(z), dense.log_prob(z.flatten(1)), rtol=1e-4, atol=1e-3)
print("matches a dense MultivariateNormal")

# a model with a latent map, trained on your own images
parent = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs")
images = (np.random.default_rng(0).random((512, 28, 28)) > 0.8).astype(np.float32)
model, run_dir = rhovae.fit(
    model="cnn", latent_shape="8,7,7", posterior="ar1-2d", prior="ar1-2d", epochs=1, data=images,
    run_dir=parent / "latent-map", device="cpu",
)  # fmt: skip
q = model.encode(images[:3])
print(type(q).__name__, "batch", tuple(q.batch_shape), "event", tuple(q.event_shape))  # (3,), (8, 7, 7)
print("rho along rows, channel 0:", rhovae.posterior_statistics(q)["rho_rows"][:, 0])
