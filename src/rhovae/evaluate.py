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


def evaluate_run(
    run_dir, iwae_k: int = 1000, checkpoint: str = "best", limit: int = 0, device: str = "auto", seed: int = 0
) -> dict[str, Any]:
    """Evaluate a run folder on its test split and write ``evaluation.json``; returns the record.

    Test negative ELBO and its terms, the IWAE NLL with ``iwae_k`` samples, active units and, for
    posteriors with a rho, its distribution. ``limit > 0`` evaluates the first ``limit`` test images.
    """
    import json
    from pathlib import Path

    from rhovae.errors import RhovaeError
    from rhovae.train import load_run, prepare_data

    if iwae_k < 1:
        raise RhovaeError(f"--iwae-k must be positive, got {iwae_k}")
    run_dir = Path(run_dir)
    model, cfg, ckpt = load_run(run_dir, checkpoint, device)
    dev = next(model.parameters()).device
    x = prepare_data(cfg, dev).test
    x = x[:limit] if limit > 0 else x
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        terms = elbo_terms(model, x)
        result = {
            "run": str(run_dir),
            "checkpoint": checkpoint,
            "epoch": ckpt["epoch"],
            "dataset": cfg.dataset,
            "posterior": cfg.posterior,
            "test_images": len(x),
            "test_neg_elbo": terms["recon"] + terms["kl"],
            "test_recon": terms["recon"],
            "test_kl": terms["kl"],
            **iwae_nll(model, x, iwae_k),
            **active_units(model, x),
            "posterior_statistics": posterior_statistics(model, x),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seed": seed,
            "config": cfg.to_dict(),
        }
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
