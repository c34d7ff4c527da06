"""Evaluation: negative ELBO and its terms, IWAE NLL, active units, and posterior statistics.

All figures are per sample (nats), averaged over a split; the model runs in eval mode so no
batch statistics leak into the numbers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from rhovae.data import batches
from rhovae.model import VAE

__all__ = ["active_units", "elbo_terms", "iwae_nll", "posterior_statistics"]


@contextmanager
def _eval_mode(model: VAE):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def elbo_terms(model: VAE, x: Tensor, batch_size: int = 1000, objective=None) -> dict[str, float]:
    """Mean objective (default: the ELBO's ``recon + KL``), reconstruction and KL over ``x`` (one z per
    image), the objective's extra terms (e.g. ``mmd``), and mean |rho| where q has a rho."""
    from rhovae.objectives import Objective

    objective = objective or Objective()
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    rho_abs, n = 0.0, 0
    has_rho = False
    with _eval_mode(model):
        for xb in batches(x, batch_size):
            out = model(xb)
            loss, extras = objective(out, model)
            sums["loss"] += float(loss) * len(xb)
            for key, value in extras.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(xb)
            sums["recon"] += float(out.recon.sum())
            sums["kl"] += float(out.kl.sum())
            rho = getattr(out.q, "rho", None)  # AR(1) posteriors report their correlation
            if rho is not None:
                has_rho = True
                rho_abs += float(rho.abs().sum())
            n += len(xb)
    result = {k: v / n for k, v in sums.items()}
    if has_rho:
        result["mean_abs_rho"] = rho_abs / n
    return result


@torch.no_grad()
def iwae_nll(model: VAE, x: Tensor, k: int, batch_size: int = 100) -> dict[str, float]:
    """``-log p(x)`` estimated by the k-sample importance-weighted bound: mean and standard error."""
    values = []
    with _eval_mode(model):
        for xb in batches(x, batch_size):
            values.append(-model.iwae_bound(xb, k))
    v = torch.cat(values)
    return {"iwae_nll": float(v.mean()), "iwae_nll_se": float(v.std() / math.sqrt(len(v))), "iwae_k": k}


@torch.no_grad()
def active_units(model: VAE, x: Tensor, threshold: float = 0.01, batch_size: int = 1000) -> dict[str, Any]:
    """Burda et al. (2016): unit u is active when ``Cov_x(E_q[z_u | x]) > threshold``."""
    with _eval_mode(model):
        means = torch.cat([model.posterior(xb).mean for xb in batches(x, batch_size)])
    variance = means.var(dim=0)
    return {
        "active_units": int((variance > threshold).sum()),
        "active_unit_variances": [round(float(v), 6) for v in variance],
    }


@torch.no_grad()
def posterior_statistics(model: VAE, x: Tensor, batch_size: int = 1000) -> dict[str, Any]:
    """Quantiles of rho and of s (the variance scale) over ``x``, for posteriors that carry them."""
    rhos, scales = [], []
    with _eval_mode(model):
        for xb in batches(x, batch_size):
            q = model.posterior(xb)
            if getattr(q, "rho", None) is None:
                return {}
            rhos.append(q.rho.reshape(len(xb), -1)[:, 0])
            scales.append(q.scale.pow(2).reshape(len(xb), -1))
    rho, s = torch.cat(rhos).double(), torch.cat(scales).double().flatten()
    probs = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)

    def summary(t: Tensor) -> dict[str, float]:
        qs = torch.quantile(t, probs)
        out = {"mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()), "max": float(t.max())}
        out.update({f"q{int(p * 100):02d}": float(v) for p, v in zip(probs, qs, strict=True)})
        return out

    return {"rho": summary(rho), "s": summary(s), "mean_abs_rho": float(rho.abs().mean())}
