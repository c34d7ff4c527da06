"""Evaluation: negative ELBO and its terms, IWAE NLL, active units, the mutual information I(x; z) of
the aggregate posterior, and posterior statistics.

All figures are per sample (nats), averaged over a split; the model runs in eval mode so no batch
statistics leak into the numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rhovae.data import Data, batches
from rhovae.errors import RhovaeError
from rhovae.files import strict_json
from rhovae.hierarchy import active_units_per_group
from rhovae.model import VAE
from rhovae.objectives import Objective
from rhovae.posteriors import mean_abs_rho, posterior_statistics
from rhovae.runs import eval_mode, load_run, prepare_data, progress_bar, write_text_atomic

__all__ = [
    "active_units",
    "elbo_terms",
    "evaluate_run",
    "imputation_metrics",
    "iwae_nll",
    "mutual_information",
    "posterior_summary",
    "write_evaluation",
]


@torch.no_grad()
def elbo_terms(model: VAE, x, batch_size: int = 1000, objective: Objective | None = None) -> dict[str, float]:
    """Mean objective (default: the ELBO's ``recon + KL``), reconstruction and KL over the split ``x``
    (one z per example), the objective's extra terms (e.g. ``mmd``), and mean |rho| where the posterior
    family reports a rho (:func:`~rhovae.posteriors.posterior_statistics`)."""
    objective = objective or Objective()
    sums: dict[str, Tensor] = {}
    n = 0

    def add(name: str, value: Tensor) -> None:
        sums[name] = sums[name] + value.double() if name in sums else value.double()

    with eval_mode(model):
        for xb in batches(x, batch_size):
            out = model(xb)
            loss, extras = objective(out, model)
            add("loss", loss * len(xb))
            add("recon", out.recon.sum())
            add("kl", out.kl.sum())
            for key, value in extras.items():
                add(key, value * len(xb))
            rho = mean_abs_rho(posterior_statistics(out.q))
            if rho is not None:
                add("mean_abs_rho", rho.sum())
            n += len(xb)
    names = list(sums)
    values = (torch.stack([sums[k] for k in names]) / max(n, 1)).tolist()
    return dict(zip(names, values, strict=True))


@torch.no_grad()
def iwae_nll(model: VAE, x, k: int, batch_size: int = 100, progress: bool = False) -> dict[str, float]:
    """``-log p(x)`` estimated by the k-sample importance-weighted bound: mean and standard error.
    ``progress``: a bar over the examples (k = 1000 on a convolutional decoder takes minutes on a CPU)."""
    values = []
    bar = progress_bar(len(x), f"IWAE k={k}", progress)
    with eval_mode(model):
        for xb in batches(x, batch_size):
            values.append(-model.iwae_bound(xb, k))
            if bar is not None:
                bar.update(len(xb))
    if bar is not None:
        bar.close()
    v = torch.cat(values)
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"iwae_nll": float(v.mean()), "iwae_nll_se": se, "iwae_k": k}


@torch.no_grad()
def active_units(model: VAE, x, threshold: float = 0.01, batch_size: int = 1000) -> dict[str, Any]:
    """Burda et al. (2016): unit u is active when ``Cov_x(E_q[z_u | x]) > threshold``.

    For a latent map ``(C, H, W)`` the record adds ``active_units_per_channel`` (C counts out of H W)
    and ``active_channels_per_position`` (an H x W list of counts out of C)."""
    with eval_mode(model):
        means = torch.cat([model.posterior(xb).mean for xb in batches(x, batch_size)])
    shape = tuple(means.shape[1:])
    means = means.flatten(1)
    variance = means.var(dim=0) if means.shape[-1] else means.new_zeros(0)  # no latent: no unit
    result: dict[str, Any] = {
        "active_units": int((variance > threshold).sum()),
        "active_unit_variances": [round(float(v), 6) for v in variance],
    }
    if len(shape) == 3:  # a latent map (C, H, W): where the active units are
        active = (variance > threshold).view(shape)
        result["active_units_per_channel"] = [int(v) for v in active.sum((1, 2))]
        result["active_channels_per_position"] = active.sum(0).tolist()
    sizes = getattr(model.head, "group_sizes", None)
    if sizes:  # latent hierarchies
        result["active_units_per_group"] = active_units_per_group(variance, list(sizes), threshold)
    return result


#: test examples the evaluation record's mutual information is estimated on (the first ones): its N x N
#: log-densities take about a second on a CPU for the small models, and the estimate is capped at log N
MI_EXAMPLES = 1000
#: the sequence evaluation's interpolations: pairs of test sequences, interior points per line
INTERPOLATION_PAIRS, INTERPOLATION_POINTS = 100, 8


@torch.no_grad()
def mutual_information(
    model: VAE,
    split,
    batch_size: int = 500,
    max_examples: int = 0,
    seed: int = 0,
    max_pairs: int = 1 << 17,
) -> float:
    """He et al. (ICLR 2019, "Lagging inference networks")'s estimate of ``I(x; z)`` in nats under the
    aggregate posterior ``q(z) = (1/N) sum_n q(z|x_n)`` of the first ``max_examples`` examples of
    ``split`` (0: all of them).

    One draw ``z_i ~ q(z|x_i)`` per example, then
    ``I = (1/N) sum_i [log q(z_i|x_i) - log q(z_i)]`` with
    ``log q(z_i) = logsumexp_n log q(z_i|x_n) - log N`` over all N examples (``n = i`` included).
    Each term is at most ``log N`` (the sum holds the ``n = i`` term), so the estimate is too: a posterior
    that tells the N examples apart perfectly scores ``log N``, one that ignores x scores 0 (up to
    Monte-Carlo noise; small negative values are possible). Compare values at the same N only.

    Generic over posterior families: ``log q(z_i|x_n)`` is ``q.log_prob(z.unsqueeze(1))``, a block of
    draws ``(M, 1, d)`` broadcast against a batch ``(B,)`` of posteriors, ``(M, B)`` (checked for
    diagonal, ar1, ar1-diag, isotropic, full and latent hierarchies, whose top-down states then depend on
    the draws only). Families that give ``log_prob`` only at their own draws (planar/iaf flows, and
    hierarchies of flow groups: the flows are not inverted) raise ``NotImplementedError`` there; the
    estimate is then undefined and NaN is returned (``evaluate_run`` leaves it out of the record).

    Memory stays bounded: the posteriors are built ``batch_size`` examples at a time and the draws are
    scored in blocks of at most ``max_pairs`` (draw, example) pairs, the log-sum-exp accumulated per draw.
    Deterministic for a given ``seed``; the global random state is left untouched. A model without a
    latent (``latent_dim`` 0) returns 0.0.
    """
    n_total = len(split)
    n = min(max_examples, n_total) if max_examples > 0 else n_total
    if n == 0 or model.latent_dim == 0:
        return 0.0
    dev = model.device
    with eval_mode(model), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        draws, own = [], []
        for start in range(0, n, batch_size):
            q = model.posterior(split[start : min(start + batch_size, n)])
            z = q.sample()
            own.append(q.log_prob(z).double())  # flows: their draws' cached log-density
            draws.append(z)
        z_all = torch.cat(draws)  # (N, d)
        log_q_own = torch.cat(own)  # (N,) log q(z_i | x_i)
        log_sum = torch.full((n,), -math.inf, dtype=torch.float64, device=z_all.device)
        for start in range(0, n, batch_size):
            q = model.posterior(split[start : min(start + batch_size, n)])
            b = q.batch_shape[0]
            block = max(1, max_pairs // b)
            for i in range(0, n, block):
                zi = z_all[i : i + block]
                try:
                    lp = q.log_prob(zi.unsqueeze(1)).expand(len(zi), b)  # (M, 1, d) against (B,): (M, B)
                except NotImplementedError:
                    return math.nan
                log_sum[i : i + block] = torch.logaddexp(log_sum[i : i + block], lp.double().logsumexp(1))
    log_q_aggregate = log_sum - math.log(n)
    return float((log_q_own - log_q_aggregate).mean())


@torch.no_grad()
def posterior_summary(model: VAE, x, batch_size: int = 1000) -> dict[str, Any]:
    """Quantiles over ``x`` of every statistic the posterior family reports (AR(1): rho and s)."""
    collected: dict[str, list[Tensor]] = {}
    with eval_mode(model):
        for xb in batches(x, batch_size):
            for name, value in posterior_statistics(model.posterior(xb)).items():
                collected.setdefault(name, []).append(value.reshape(-1).double())
    probs = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)

    def summary(t: Tensor) -> dict[str, float]:
        qs = torch.quantile(t, probs)
        out = {"mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()), "max": float(t.max())}
        out.update({f"q{int(p * 100):02d}": float(v) for p, v in zip(probs, qs, strict=True)})
        return out

    result: dict[str, Any] = {name: summary(torch.cat(v)) for name, v in collected.items()}
    rhos = [torch.cat(collected[k]) for k in ("rho", "rho_rows", "rho_cols") if k in collected]
    if rhos:
        result["mean_abs_rho"] = float(torch.cat(rhos).abs().mean())
    return result


@torch.no_grad()
def imputation_metrics(
    model: VAE, x, truth: Tensor, train=None, batch_size: int = 500, seed: int = 0
) -> dict[str, float]:
    """How well the model fills in missing values (NaN in ``x``) against their complete values ``truth``,
    GP-VAE's protocol (Fortuin et al. 2020, ratschlab/GP-VAE ``compute_nll``/``compute_mse``):

    - ``imputation_nll``: ``-log p(x_i | z)`` of the true missing values under the decoder at one draw
      ``z ~ q(z | x_obs)``, averaged over the missing values (nats per value; with the Bernoulli
      likelihood on grey levels, the cross-entropy, as the published HMNIST figures on binary frames);
    - ``imputation_mse``: the squared error of the decoder's mean at the posterior mean against the true
      missing values, averaged over them (GP-VAE rounds both on binary frames; here nothing is rounded);
    - ``imputation_mse_mean``: the same error for mean imputation (each value position's mean over the
      observed values of ``train``), the floor any model must beat; ``missing_values``: how many.

    Deterministic for a given ``seed``; the global random state is left untouched."""
    dev = model.device
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    mse = torch.zeros_like(nll)
    mse_mean = torch.zeros_like(nll)
    count = 0
    fill = None
    if train is not None:
        total = torch.zeros(truth.shape[1:], dtype=torch.float64, device=dev)
        seen = torch.zeros_like(total)
        for xb in batches(train, batch_size):
            observed = ~xb.isnan()
            total += xb.nan_to_num(0.0).double().sum(0)
            seen += observed.double().sum(0)
        fill = (total / seen.clamp_min(1)).float()
    with eval_mode(model), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(x), batch_size):
            xb, tb = x[start : start + batch_size], truth[start : start + batch_size]
            missing = xb.isnan()
            q = model.posterior(xb)
            px = model.decode(q.sample())
            base = getattr(px, "base", None)
            if base is None:
                raise RhovaeError("imputation needs a likelihood that scores single values (a frames model)")
            nll -= (base.log_prob(tb) * missing).double().sum()
            mean = model.decode(q.mean).mean
            mse += ((mean - tb).square() * missing).double().sum()
            if fill is not None:
                mse_mean += ((fill - tb).square() * missing).double().sum()
            count += int(missing.sum())
    if count == 0:
        return {"missing_values": 0}
    out = {
        "imputation_nll": float(nll / count),
        "imputation_mse": float(mse / count),
        "missing_values": count,
    }
    if fill is not None:
        out["imputation_mse_mean"] = float(mse_mean / count)
    return out


def evaluate_run(
    run_dir,
    iwae_k: int = 1000,
    checkpoint: str = "best",
    limit: int = 0,
    device: str = "auto",
    seed: int = 0,
    data: Data | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a run folder on its test split; returns the record (:func:`write_evaluation` saves it).

    Test negative ELBO and its terms, the IWAE NLL with ``iwae_k`` samples, active units, the posterior
    family's statistics and ``mutual_information`` (:func:`mutual_information` on the first
    :data:`MI_EXAMPLES` = 1,000 test examples, ``mutual_information_examples`` of them; left out for flow
    posteriors, where it is undefined). Sequence runs add :func:`sequence_evaluation`'s figures; frame
    sequences whose complete values are known add :func:`imputation_metrics`' (and their IWAE NLL and
    ELBO are those of the observed values).
    ``limit > 0`` evaluates the first ``limit`` test examples.
    ``data``: the run's data, already on the model's device, when the caller has it loaded (as
    ``compare`` does after training); ``progress``: a bar over the IWAE pass.
    """
    if iwae_k < 1:
        raise RhovaeError(f"--iwae-k must be positive, got {iwae_k}")
    if limit < 0:
        raise RhovaeError(f"--limit must be >= 0, got {limit}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    model, cfg, ckpt = load_run(run_dir, checkpoint, device)
    dev = model.device
    if data is None:
        data = prepare_data(cfg, dev)
    x = data.test
    x = x[: min(limit, len(x))] if limit > 0 else x
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        terms = elbo_terms(model, x)
        extra = sequence_evaluation(model, x, data, seed) if "vocab" in data.meta else {}
        if data.meta.get("frames"):  # frame sequences: the bounds are those of the observed values
            extra["observed_fraction"] = data.meta.get("observed_fraction", {}).get("test", 1.0)
        if "test" in data.truth:  # frame sequences with known complete values
            truth = data.truth["test"]
            truth = truth[: min(limit, len(truth))] if limit > 0 else truth
            extra.update(imputation_metrics(model, x, truth, data.train, seed=seed))
        n_mi = min(len(x), MI_EXAMPLES)
        mi = mutual_information(model, x, max_examples=n_mi, seed=seed)
        if not math.isnan(mi):  # flows: undefined, left out (a report then drops the column)
            extra["mutual_information"] = mi
        extra["mutual_information_examples"] = n_mi
        record = {
            **extra,
            "run": str(run_dir),
            "checkpoint": checkpoint,
            "epoch": ckpt["epoch"],
            "dataset": cfg.dataset,
            "posterior": cfg.posterior,
            "likelihood": cfg.likelihood,
            "test_images": len(x),
            "test_neg_elbo": terms["recon"] + terms["kl"],
            "test_recon": terms["recon"],
            "test_kl": terms["kl"],
            **iwae_nll(model, x, iwae_k, progress=progress),
            **active_units(model, x),
            "posterior_statistics": posterior_summary(model, x),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seed": seed,
            "config": cfg.to_dict(),
        }
    record["evaluation_seconds"] = round(time.perf_counter() - start, 3)  # with loading, on this machine
    return record


@torch.no_grad()
def sequence_evaluation(model: VAE, x, data, seed: int = 0, n_samples: int = 1000) -> dict[str, float]:
    """What sequence-VAE papers report: reconstruction accuracy (whole sequence and per token, greedy
    decode at the posterior mean) and, for ``n_samples`` prior samples (greedy decode of z ~ p(z)),
    validity under the set's rule, uniqueness and novelty against the training split
    (:func:`rhovae.sequence_metrics.sequence_metrics`), and ``interpolation_validity``: the fraction of
    valid greedy decodes at ``INTERPOLATION_POINTS`` = 8 interior points of the lines between the
    posterior means of ``INTERPOLATION_PAIRS`` = 100 seeded pairs of test sequences
    (:func:`rhovae.sequence_metrics.interpolation_validity`)."""
    from rhovae.data.sequences import SequenceVocab
    from rhovae.sequence_metrics import interpolation_validity, sequence_metrics

    vocab = SequenceVocab.from_dict(data.meta["vocab"])
    with eval_mode(model):
        recon = torch.cat([model.reconstruct(xb) for xb in batches(x, 1000)])
        samples = model.sample(n_samples, seed=seed)
        interpolation = interpolation_validity(
            model, x, vocab, pairs=INTERPOLATION_PAIRS, points=INTERPOLATION_POINTS, seed=seed
        )
    inputs = torch.cat(list(batches(x, 1000)))
    train = torch.cat(list(batches(data.train, 10000)))
    metrics = sequence_metrics(recon.cpu(), inputs.cpu(), samples.cpu(), train.cpu(), vocab)
    if not math.isnan(interpolation):  # fewer than two test sequences
        metrics["interpolation_validity"] = interpolation
    return metrics


def write_evaluation(run_dir, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``RUN/evaluation.json`` atomically; returns the path."""
    path = Path(run_dir) / "evaluation.json"
    write_text_atomic(path, strict_json(record, indent=2) + "\n")
    return path
