"""Independent dense references for the AR(1) Gaussian, built entry by entry from the definition.

Nothing here calls rhovae: the covariance is written as diag(sigma) T diag(sigma) with
T[j, k] = rho^|j-k| from nested loops, and every law is left to torch's MultivariateNormal.
"""

import torch
from torch.distributions import MultivariateNormal


def toeplitz_ar1(rho: float, d: int) -> torch.Tensor:
    return torch.tensor([[rho ** abs(j - k) for k in range(d)] for j in range(d)], dtype=torch.float64)


def dense_covariance(rho: torch.Tensor, scale: torch.Tensor, d: int) -> torch.Tensor:
    """rho (B, 1), scale (B, 1) or (B, d) -> (B, d, d) float64."""
    mats = []
    for b in range(rho.shape[0]):
        sd = scale[b].expand(d).double()
        mats.append(sd[:, None] * toeplitz_ar1(float(rho[b, 0]), d) * sd[None, :])
    return torch.stack(mats)


def dense_cholesky_ar1(rho: float, d: int) -> torch.Tensor:
    """L_rho from its printed entries: column 0 is rho^j, column k >= 1 is sqrt(1-rho^2) rho^(j-k)."""
    c = (1 - rho * rho) ** 0.5
    rows = []
    for j in range(d):
        rows.append([0.0 if k > j else (rho**j if k == 0 else c * rho ** (j - k)) for k in range(d)])
    return torch.tensor(rows, dtype=torch.float64)


def dense_mvn(loc: torch.Tensor, rho: torch.Tensor, scale: torch.Tensor) -> MultivariateNormal:
    d = loc.shape[-1]
    return MultivariateNormal(loc.double(), covariance_matrix=dense_covariance(rho, scale, d))
