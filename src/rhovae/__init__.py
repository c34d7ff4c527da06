"""rhovae: variational autoencoders with pluggable structured posteriors, centred on the ρ-VAE."""

from rhovae.distributions import AR1Normal
from rhovae.errors import RhovaeError

__all__ = ["AR1Normal", "RhovaeError", "__version__"]
__version__ = "0.1.0"
