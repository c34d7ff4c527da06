"""Your own time series with gaps: sequences of unequal length padded with pad_ragged, values missing,
saved as an .npz with a mask (True = observed), a frames model with GP-VAE's banded posterior and GP
prior trained on them, then the missing values imputed. First, the banded posterior as a distribution.

python examples/temporal.py [RUN_PARENT]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import rhovae
from rhovae.cli import main
from rhovae.data.frames import pad_ragged
from rhovae.distributions import BandedNormal, GaussianProcessPrior

# the distribution: N(loc, (B^T B)^-1) over T = 6 frames, B upper-bidiagonal (exact, O(T))
loc = torch.zeros(4, 6)
q = BandedNormal(loc, torch.full((4, 6), 1.5), torch.full((4, 5), -0.8))
z = q.rsample()  # (4, 6)
dense = MultivariateNormal(loc, covariance_matrix=q.covariance_matrix)
torch.testing.assert_close(q.log_prob(z), dense.log_prob(z), rtol=1e-4, atol=1e-4)
prior = GaussianProcessPrior(6, 1)()  # GP-VAE's Cauchy kernel, one channel: event (1, 6)
print("KL to the GP prior:", kl_divergence(q, prior.base_dist))  # closed form, checked against dense
print("the banded posterior matches a dense MultivariateNormal")

# your sequences: 300 noisy 3-channel oscillations of 8 to 12 steps, 30% of the values missing
rng = np.random.default_rng(0)
sequences = []
for _ in range(300):
    t = np.arange(rng.integers(8, 13))[:, None]
    phase, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8)
    clean = np.sin(speed * t + phase + np.array([0.0, 1.0, 2.0]))
    sequences.append((clean + 0.05 * rng.standard_normal(clean.shape)).astype(np.float32))
x, mask = pad_ragged(sequences)  # (300, 12, 3) and the mask of the real steps
mask &= torch.from_numpy(rng.random(tuple(x.shape)) > 0.3)  # and a value missing here and there
parent = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs")
parent.mkdir(parents=True, exist_ok=True)
np.savez(parent / "waves.npz", train=x.numpy(), train_mask=mask.numpy())

run = parent / "waves-banded-gp"
flags = "--model frames --posterior banded --prior gp --likelihood gaussian --latent-dim 2 --hidden 32"
flags += " --overwrite --epochs 20 --lr 0.003 --batch-size 32 --no-progress --device cpu"
assert (
    main(["-q", "train", "--dataset", f"npz:{parent / 'waves.npz'}", "--run-dir", str(run), *flags.split()])
    == 0
)
model = rhovae.load(run, device="cpu")
real = pad_ragged([np.ones(len(s), bool) for s in sequences])[0][:, :, None].bool()  # (300, 12, 1)
gappy = x.masked_fill(~mask, float("nan"))  # missing values are NaN
filled = model.reconstruct(gappy)  # the decoder's mean at the posterior mean: every value, gaps included
held = ~mask & real.expand_as(x)  # values that existed but were hidden from the model
error, zero = (filled - x)[held].square().mean(), x[held].square().mean()
print(f"imputed {int(held.sum())} hidden values: MSE {error:.3f} (filling them with 0: {zero:.3f})")
print("posterior trajectories:", tuple(model.encode(gappy).mean.shape))  # (300, 2 channels, 12 steps)
