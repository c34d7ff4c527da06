"""What a sequence VAE is scored by: reconstruction accuracy (whole sequences and tokens) and, for prior
samples, validity under the set's rule, uniqueness and novelty (:func:`sequence_metrics`); validity of
the decodes along straight lines between the codes of two test sequences (:func:`interpolation_validity`).

The sequences are those of :mod:`rhovae.data.sequences`; identity of two sequences (uniqueness, novelty)
is equality of their :func:`~rhovae.data.sequences.to_text`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rhovae.data.sequences import (
    Array,
    SequenceVocab,
    _as_numpy,
    decode,
    is_valid_layers,
    is_valid_nas201,
    load_dictionary,
    to_text,
)
from rhovae.errors import RhovaeError

__all__ = ["interpolation_validity", "sequence_metrics", "validity_rule"]


def validity_rule(vocab: SequenceVocab) -> Callable[[list[str], list[float] | None], bool]:
    """The set's validity test on decoded ``(tokens, features)``; the end token must have been emitted
    within L steps where the set has one (a sequence of more than ``max_tokens`` tokens is invalid)."""
    if vocab.name == "nas201":
        return lambda tokens, features: is_valid_nas201(tokens)
    if vocab.name == "layers":
        return lambda tokens, features: len(tokens) <= vocab.max_tokens and is_valid_layers(tokens, features)
    if vocab.name == "words":
        if vocab.source is None:
            raise RhovaeError("this words vocab names no dictionary file (source), so validity is undefined")
        dictionary = set(load_dictionary(vocab.source))
        return lambda tokens, features: len(tokens) <= vocab.max_tokens and "".join(tokens) in dictionary
    raise RhovaeError(f"no validity rule for sequence set {vocab.name!r} (known: nas201, layers, words)")


def _types_and_mask(x: Tensor, vocab: SequenceVocab) -> tuple[Tensor, Tensor]:
    one_hot = x[..., : vocab.n_types]
    return one_hot.argmax(-1), one_hot.sum(-1) > 0.5


def sequence_metrics(
    recon: Tensor,
    x: Tensor,
    samples: Tensor,
    train: Tensor | Array,
    vocab: SequenceVocab,
    *,
    feature_tol: float = 0.05,
    is_valid: Callable[[list[str], list[float] | None], bool] | None = None,
) -> dict[str, float]:
    """Reconstruction and generation quality, as fractions in [0, 1].

    Args:
        recon: ``(N, L, K + F)`` decoded reconstructions of ``x`` (e.g. the greedy decode at the posterior
            mean); x: ``(N, L, K + F)`` the inputs.
        samples: ``(S, L, K + F)`` decoded prior samples; train: ``(M, L, K + F)`` the training split.
        feature_tol: the largest feature error that counts as recovered (0.05 is half a step of the
            layers sizes, ``log2 / 10``, so within it the size rounds the same).
        is_valid: overrides :func:`validity_rule`.

    Returns:
        ``recon_seq_acc_types``: sequences whose token types are all recovered and whose length (the
        padding) matches; ``recon_seq_acc``: the same with every feature (not the end step's) within
        ``feature_tol`` (equal to the former when F = 0); ``recon_token_acc``: recovered types over the
        real steps of ``x``; ``validity``: valid samples / samples; ``uniqueness``: distinct valid samples /
        samples; ``novelty``: valid samples not in ``train`` / valid samples (0 when none is valid).
        Sequences are identical when their :func:`~rhovae.data.sequences.to_text` is.
    """
    if recon.shape != x.shape:
        raise RhovaeError(f"recon {tuple(recon.shape)} and x {tuple(x.shape)} must have the same shape")
    x_types, x_mask = _types_and_mask(x, vocab)
    r_types, r_mask = _types_and_mask(recon, vocab)
    type_ok = (x_types == r_types) & x_mask
    seq_types = ((type_ok | ~x_mask) & (x_mask == r_mask)).all(-1)
    seq = seq_types
    if vocab.n_features:
        scored = x_mask if vocab.end is None else x_mask & (x_types != vocab.end)
        close = (x[..., vocab.n_types] - recon[..., vocab.n_types]).abs() <= feature_tol
        seq = seq & (close | ~scored).all(-1)
    metrics = {
        "recon_seq_acc": float(seq.float().mean()),
        "recon_seq_acc_types": float(seq_types.float().mean()),
        "recon_token_acc": float(type_ok.sum() / x_mask.sum().clamp_min(1)),
    }

    valid_fn = is_valid or validity_rule(vocab)
    train_texts = {to_text(row, vocab) for row in _as_numpy(train)}
    valid_texts = []
    for row in _as_numpy(samples):
        tokens, features = decode(row, vocab)
        if valid_fn(tokens, features):
            valid_texts.append(to_text(row, vocab))
    n_samples, n_valid = len(samples), len(valid_texts)
    metrics["validity"] = n_valid / max(n_samples, 1)
    metrics["uniqueness"] = len(set(valid_texts)) / max(n_samples, 1)
    metrics["novelty"] = sum(t not in train_texts for t in valid_texts) / n_valid if n_valid else 0.0
    return metrics


def _fraction_valid(decoded: Tensor, vocab: SequenceVocab, valid_fn: Callable[..., bool]) -> float:
    rows = _as_numpy(decoded)
    return sum(bool(valid_fn(*decode(row, vocab))) for row in rows) / max(len(rows), 1)


@torch.no_grad()
def interpolation_validity(
    model: Any,
    x: Any,
    vocab: SequenceVocab,
    *,
    pairs: int = 100,
    points: int = 8,
    seed: int = 0,
    batch_size: int = 1000,
    is_valid: Callable[[list[str], list[float] | None], bool] | None = None,
) -> float:
    """The fraction of valid decodes along straight lines between the codes of two test sequences.

    ``pairs`` pairs ``(i, j)`` of distinct examples of ``x`` (a split: ``len`` and slicing) are drawn with
    ``seed`` (a CPU generator; the global random state is untouched); both are encoded to their posterior
    means ``mu_i, mu_j``, and the ``points`` interior points ``z = (1 - t) mu_i + t mu_j``,
    ``t = k / (points + 1)``, k = 1..points, are decoded greedily (``model.decode(z).mean``, as for the
    reconstructions and prior samples of :func:`sequence_metrics`). The endpoints are left out: they are
    the reconstructions, which the reconstruction accuracy scores. Validity is :func:`validity_rule`'s
    (or ``is_valid``'s), the rule the prior samples' validity uses. Returns a fraction in [0, 1] of
    ``pairs * points`` decodes; NaN for fewer than two examples. (A model without a latent decodes every
    point to the same sequence.) The caller puts the model in eval mode.
    """
    n = len(x)
    if n < 2 or pairs < 1 or points < 1:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (pairs,), generator=generator)
    second = (first + torch.randint(1, n, (pairs,), generator=generator)) % n  # never the same example
    means = torch.cat([model.posterior(x[s : s + batch_size]).mean for s in range(0, n, batch_size)])
    first, second = first.to(means.device), second.to(means.device)
    t = (torch.arange(1, points + 1, dtype=means.dtype, device=means.device) / (points + 1))[:, None, None]
    z = ((1 - t) * means[first] + t * means[second]).transpose(0, 1).reshape(pairs * points, -1)
    decoded = torch.cat([model.decode(z[s : s + batch_size]).mean for s in range(0, len(z), batch_size)])
    return _fraction_valid(decoded.cpu(), vocab, is_valid or validity_rule(vocab))
