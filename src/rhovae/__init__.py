"""rhovae: variational autoencoders with pluggable structured posteriors, centred on the ρ-VAE.

The public API (each name documented in docs/api.md)::

    import rhovae
    model, run_dir = rhovae.fit(posterior="ar1", epochs=5, data=x)   # train on your data
    model = rhovae.load("runs/x")                                    # a trained run, with preprocessing
    q = model.encode(x); px = model.decode(q.rsample()); model.log_likelihood(x, k=1000)
"""

__version__ = "0.2.0"

from rhovae.api import Fitted, fit, load  # noqa: E402
from rhovae.config import RunConfig, load_config  # noqa: E402
from rhovae.distributions import AR1Normal, LatentMap, SeparableAR1Normal, StandardNormal  # noqa: E402
from rhovae.errors import RhovaeError  # noqa: E402
from rhovae.likelihoods import make_likelihood  # noqa: E402
from rhovae.model import VAE, ModelConfig, build_model  # noqa: E402
from rhovae.objectives import Objective  # noqa: E402
from rhovae.posteriors import (  # noqa: E402
    AR1GaussianHead,
    DiagonalGaussianHead,
    FullCovGaussianHead,
    MapHead,
    make_head,
    make_map_head,
    posterior_statistics,
)
from rhovae.priors import make_prior  # noqa: E402

__all__ = [
    "AR1GaussianHead",
    "AR1Normal",
    "DiagonalGaussianHead",
    "Fitted",
    "FullCovGaussianHead",
    "LatentMap",
    "MapHead",
    "ModelConfig",
    "Objective",
    "RhovaeError",
    "RunConfig",
    "SeparableAR1Normal",
    "StandardNormal",
    "VAE",
    "__version__",
    "build_model",
    "fit",
    "load",
    "load_config",
    "make_head",
    "make_likelihood",
    "make_map_head",
    "make_prior",
    "posterior_statistics",
]
