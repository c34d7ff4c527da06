"""Sequence backbones: a bidirectional LSTM/GRU encoder and the autoregressive LSTM decoder of the notes
(seed 003, section 4.1, Algorithms 1 and 2), for data ``(B, L, K + F)`` in the format of
:mod:`rhovae.data.sequences` (one-hot token types, F ∈ {0, 1} features in [0, 1], all-zero padding rows).

The decoder returns ``p(x|z)`` itself, a :class:`SequenceDistribution`: the exact teacher-forced
log-likelihood, and the free-running greedy decode as its ``mean``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from rhovae.data.sequences import SequenceVocab
from rhovae.errors import RhovaeError

__all__ = ["LSTMDecoder", "LSTMEncoder", "SequenceDistribution", "step_mask"]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def step_mask(x: Tensor) -> Tensor:
    """``(..., L, W) -> (..., L)`` bool: the real (not padding) steps, i.e. the rows that are not all zero.

    A real step always holds a 1 in its one-hot, so no vocabulary is needed to tell it from padding.
    """
    return (x != 0).any(-1)


class LSTMEncoder(nn.Module):
    """``(B, L, W) -> (B, out_features)``: a bidirectional LSTM (or GRU) over the real steps, the final
    states of both directions concatenated, then Linear and ReLU.

    Each sequence is read over its own real steps only, so appending padding rows changes nothing: the
    forward direction's state is taken at the sequence's last real step, and the backward direction
    reads the sequence reversed within its length, starting at its own last real step. This is what a
    packed bidirectional LSTM computes (``pack_padded_sequence``; tested against it), done as two padded
    passes because in float32 on CPU the padded LSTM runs as one fused oneDNN kernel where the packed
    one runs ATen's step loop (benchmarks/bench_collapse.py: the VAE's epoch on ``words`` at width 128
    went from 4.2x to 2.6x its language model's). The GRU has no fused CPU kernel: it reads every padded
    step. ``out_features`` defaults to ``hidden``.
    """

    def __init__(
        self,
        data_shape: tuple[int, int],
        hidden: int = 256,
        cell: str = "lstm",
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise RhovaeError(f"unknown recurrent cell {cell!r}; choose one of: {', '.join(_CELLS)}")
        _, width = data_shape
        self.forward_rnn = _CELLS[cell](width, hidden, batch_first=True)
        self.backward_rnn = _CELLS[cell](width, hidden, batch_first=True)
        self.out_features = out_features or hidden
        self.proj = nn.Sequential(nn.Linear(2 * hidden, self.out_features), nn.ReLU())
        self._register_load_state_dict_pre_hook(_bidirectional_keys)

    def forward(self, x: Tensor) -> Tensor:
        # an all-padding row still reads one step (of zeros), as the packed LSTM did
        lengths = step_mask(x).sum(-1).clamp_min(1)
        steps = torch.arange(x.shape[-2], device=x.device)
        last = lengths - 1
        # reverse each sequence within its own length; padding rows stay where they are
        order = torch.where(steps < lengths.unsqueeze(-1), last.unsqueeze(-1) - steps, steps)
        reversed_x = x.gather(-2, order.unsqueeze(-1).expand_as(x))
        index = last.view(-1, 1, 1).expand(-1, 1, self.forward_rnn.hidden_size)
        h_forward = self.forward_rnn(x)[0].gather(-2, index).squeeze(-2)
        h_backward = self.backward_rnn(reversed_x)[0].gather(-2, index).squeeze(-2)
        return self.proj(torch.cat([h_forward, h_backward], dim=-1))


def _bidirectional_keys(state_dict, prefix, *_args) -> None:
    """Read checkpoints written when the encoder held one bidirectional module ``rnn`` (its
    ``weight_ih_l0`` ... and ``weight_ih_l0_reverse`` ...): the same weights, under the two directions'
    names. The parameter order is unchanged, so saved optimiser states still line up."""
    for key in [k for k in state_dict if k.startswith(prefix + "rnn.")]:
        name = key[len(prefix + "rnn.") :]
        direction = "backward_rnn." if name.endswith("_reverse") else "forward_rnn."
        state_dict[prefix + direction + name.removesuffix("_reverse")] = state_dict.pop(key)


class LSTMDecoder(nn.Module):
    """``z (..., d) -> p(x|z)``, a :class:`SequenceDistribution` with batch shape ``z.shape[:-1]`` and event
    shape ``(L, K + F)``.

    ``z`` → Linear, ReLU → Linear gives the start vector ``x0`` (K + F), and the LSTM's initial hidden and
    cell states ``h, c`` (``hidden`` each, independent of the token size). One LSTM layer reads the
    inputs ``x0 ‖ x[0 : L-1]`` (teacher forcing) or its own previous outputs (generation); a Linear on
    every step maps its output back to K type logits and F feature means (through a sigmoid).

    Args:
        latent_dim: d.
        data_shape: ``(L, K + F)``, matching ``vocab``.
        vocab: the token set (K, F, the end token).
        hidden: the LSTM (and the z-MLP) width.
        word_dropout: in training mode, each teacher-forced input step (not ``x0``) is replaced by the
            all-zero vector with this probability (Bowman et al. 2016), so the decoder must lean on z.
        temperature: the default sampling temperature of :meth:`SequenceDistribution.sample`.
        init_std, min_std: the feature noise (F = 1): ``sigma = min_std + exp(feature_log_excess)``, one
            learned value per channel, starting at ``init_std``. The floor keeps the density bounded on
            quantised features (at most ``-log(min_std sqrt(2 pi)) ≈ 3.69`` nats a step for 0.01).
    """

    def __init__(
        self,
        latent_dim: int,
        data_shape: tuple[int, int],
        vocab: SequenceVocab,
        hidden: int = 256,
        word_dropout: float = 0.0,
        *,
        temperature: float = 1.0,
        init_std: float = 0.1,
        min_std: float = 0.01,
    ) -> None:
        super().__init__()
        length, width = data_shape
        if (length, width) != (vocab.max_len, vocab.width):
            raise RhovaeError(
                f"data shape {tuple(data_shape)} does not match the {vocab.name} vocab "
                f"({vocab.max_len}, {vocab.width})"
            )
        if not 0.0 <= word_dropout < 1.0:
            raise RhovaeError(f"word_dropout must lie in [0, 1), got {word_dropout}")
        if not 0 < min_std < init_std:
            raise RhovaeError(f"need 0 < min_std < init_std, got {min_std} and {init_std}")
        self.vocab = vocab
        self.max_len, self.width = length, width
        self.n_types, self.n_features, self.end = vocab.n_types, vocab.n_features, vocab.end
        self.hidden = hidden
        self.word_dropout = word_dropout
        self.temperature = temperature
        self.min_std = min_std
        self.init = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, width + 2 * hidden)
        )
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.out = nn.Linear(hidden, width)
        if self.n_features:
            self.feature_log_excess = nn.Parameter(
                torch.full((self.n_features,), math.log(init_std - min_std))
            )

    def forward(self, z: Tensor) -> SequenceDistribution:
        x0, h, c = self.init(z).split([self.width, self.hidden, self.hidden], dim=-1)
        return SequenceDistribution(self, x0, h, c)

    def feature_std(self) -> Tensor:
        """``(F,)`` the feature noise sigma."""
        return self.min_std + self.feature_log_excess.exp()

    def step(
        self, inputs: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """The LSTM over ``inputs (N, T, W)`` from ``state`` (each ``(1, N, hidden)``):
        type logits ``(N, T, K)``, feature means ``(N, T, F)`` and the final state."""
        out, state = self.lstm(inputs, state)
        raw = self.out(out)
        return raw[..., : self.n_types], torch.sigmoid(raw[..., self.n_types :]), state


class SequenceDistribution(Distribution):
    """``p(x|z)`` over sequences ``(L, K + F)``: an autoregressive categorical over token types and, where
    F = 1, a Gaussian ``N(f; mean, sigma^2)`` on each token's feature (a density on [0, 1]-valued
    features, unlike a Bernoulli on a continuous value; ``sigma`` learned, floored).

    Built by :class:`LSTMDecoder` from ``x0 (*B, W)``, ``h0, c0 (*B, hidden)``; batch shape ``B``.

    ``log_prob(x)``, ``x (*S, *B, L', W)`` for any L': the exact ``log p(x|z)`` in nats per sequence by
    teacher forcing, ``sum_t log softmax(logits_t)[x_t]`` over the real steps plus the feature log-density
    over the real steps that are not the end token. Padding steps add nothing, and outputs at step t see
    inputs before t only, so appended padding changes nothing.

    ``mean``: the greedy free-running decode (Algorithm 2), ``(*B, L, W)``: from ``x0``, each step's argmax
    type is fed back as a one-hot with its feature mean (0 on the end step); rows after the end token are
    zero padding. ``sample(sample_shape, temperature, generator)``: the same with types drawn from
    ``softmax(logits / temperature)`` (features stay at their mean). Both are detached (no gradient).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = False

    def __init__(self, decoder: LSTMDecoder, x0: Tensor, h0: Tensor, c0: Tensor) -> None:
        self.decoder = decoder
        self.x0, self.h0, self.c0 = x0, h0, c0
        self.temperature = decoder.temperature
        super().__init__(x0.shape[:-1], torch.Size((decoder.max_len, decoder.width)), validate_args=False)

    def _flat_params(self, shape: torch.Size) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x0 (N, W)`` and the state ``(1, N, hidden)`` twice, broadcast to the leading ``shape``."""
        x0, h0, c0 = (
            p.expand(shape + p.shape[-1:]).reshape(-1, p.shape[-1]) for p in (self.x0, self.h0, self.c0)
        )
        return x0, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())

    def teacher_forced(self, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 1 on ``value (*S, *B, L', W)``: ``(value, logits, feature means)`` flattened to
        ``(N, L', ·)``, with N the broadcast of the leading shapes."""
        d = self.decoder
        shape = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        x = value.expand(shape + value.shape[-2:]).reshape(-1, *value.shape[-2:])
        x0, state = self._flat_params(shape)
        previous = x[:, :-1]
        if d.training and d.word_dropout > 0:
            keep = torch.rand(previous.shape[:-1], device=x.device) >= d.word_dropout
            previous = previous * keep.unsqueeze(-1).to(previous.dtype)
        inputs = torch.cat([x0.unsqueeze(1).to(x.dtype), previous], dim=1)
        logits, feature_mean, _ = d.step(inputs, state)
        return x, logits, feature_mean

    def log_prob(self, value: Tensor) -> Tensor:
        d = self.decoder
        shape = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        x, logits, feature_mean = self.teacher_forced(value)
        one_hot = x[..., : d.n_types]
        # a padding row has an all-zero one-hot, so its categorical term is 0 without a mask
        log_p = (F.log_softmax(logits, dim=-1) * one_hot).sum((-2, -1))
        if d.n_features:
            scored = one_hot.sum(-1) > 0.5
            if d.end is not None:
                scored = scored & (one_hot[..., d.end] < 0.5)
            std = d.feature_std()
            z = (x[..., d.n_types :] - feature_mean) / std
            log_n = -0.5 * z.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)
            log_p = log_p + (log_n.sum(-1) * scored).sum(-1)
        return log_p.view(shape)

    @torch.no_grad()
    def _generate(self, sample_shape: torch.Size, temperature: float | None, generator) -> Tensor:
        d = self.decoder
        shape = sample_shape + self.batch_shape
        inputs, state = self._flat_params(shape)
        inputs = inputs.unsqueeze(1)
        n = inputs.shape[0]
        out = inputs.new_zeros(n, d.max_len, d.width)
        alive = torch.ones(n, dtype=torch.bool, device=inputs.device)
        for t in range(d.max_len):
            logits, feature_mean, state = d.step(inputs, state)
            logits = logits[:, 0]
            if temperature is None:
                k = logits.argmax(-1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                k = torch.multinomial(probs, 1, generator=generator)[:, 0]
            step = F.one_hot(k, d.n_types).to(out.dtype)
            if d.n_features:
                feature = feature_mean[:, 0]
                if d.end is not None:
                    feature = feature * (k != d.end).unsqueeze(-1)
                step = torch.cat([step, feature], dim=-1)
            out[:, t] = step * alive.unsqueeze(-1)
            inputs = step.unsqueeze(1)
            if d.end is not None:
                alive = alive & (k != d.end)
                if not alive.any():
                    break
        return out.view(shape + self.event_shape)

    @property
    def mean(self) -> Tensor:
        return self._generate(torch.Size(), None, None)

    def sample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = (),
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        temperature = self.temperature if temperature is None else temperature
        if not temperature > 0:
            raise RhovaeError(
                f"sampling temperature must be positive, got {temperature}; use .mean for greedy"
            )
        return self._generate(torch.Size(sample_shape), float(temperature), generator)
