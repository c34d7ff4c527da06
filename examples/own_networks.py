"""Train with your own encoder and decoder (any nn.Module, no subclassing) on uint8 images.

python examples/own_networks.py [OUT_DIR]
"""

import sys
from pathlib import Path

import numpy as np
from torch import nn

import rhovae

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/examples")

# 600 uint8 images of 16x16: a bright square at a random place (scaled by 1/255 like any uint8 data)
rng = np.random.default_rng(0)
images = np.zeros((600, 16, 16), dtype=np.uint8)
for i, (r, c) in enumerate(rng.integers(0, 12, size=(600, 2))):
    images[i, r : r + 4, c : c + 4] = 255


def networks(latent_dim: int = 3) -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(  # x (B, 1, 16, 16) -> features (B, 64)
        nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU()
    )
    decoder = nn.Sequential(  # z (N, d) -> Bernoulli logits (N, 1, 16, 16)
        nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.Unflatten(1, (1, 16, 16))
    )
    return encoder, decoder


encoder, decoder = networks()
model, run_dir = rhovae.fit(
    posterior="ar1", latent_dim=3, epochs=3, batch_size=64, pictures=False,
    data=images, encoder=encoder, decoder=decoder, run_dir=out / "own-networks", device="cpu",
)  # fmt: skip
print("run folder:", run_dir)

# loading needs fresh instances of the same networks: rhovae never pickles code
encoder, decoder = networks()
model = rhovae.load(run_dir, device="cpu", encoder=encoder, decoder=decoder)
print("ELBO of 4 raw uint8 images:", model.elbo(images[:4]).numpy().round(2))
print("reconstructions:", tuple(model.reconstruct(images[:4]).shape))
