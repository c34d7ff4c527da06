"""Aggressive inference-network training (He et al., "Lagging inference networks and posterior collapse
in variational autoencoders", ICLR 2019, Algorithm 1).

Posterior collapse starts when the encoder lags behind the decoder: the model settles where q(z|x) is
the prior before the encoder has learned anything worth using. While the aggressive phase lasts, every
training step first updates the encoder (the network and the posterior head) alone, on fresh random
batches, until its loss stops improving, and only then takes the ordinary step, for the decoder
alone. After each epoch the mutual information I(x; z) on the validation split is estimated; once it
stops rising the phase ends and training goes on as usual (both parts in one step).

The inner loop's stopping rule is He et al.'s: losses summed over blocks of 15 encoder steps, stop
when a block's sum is no lower than the block before, and at most 100 steps. Its batches are drawn
from its own generator (the reparameterisation noise and dynamic binarisation from the global one,
as in any step); its state (on/off, best MI, the encoder optimiser, the generator) travels in
``last.pt`` beside the global random state, so a resumed run gives the numbers of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AggressiveTraining"]

MAX_INNER_STEPS = 100  # He et al.'s cap on encoder steps per decoder step
CHECK_EVERY = 15  # encoder steps per block of the stopping rule


class AggressiveTraining:
    """The aggressive phase of one run: ``encoder_steps`` before each ordinary step, ``decoder_only``
    between its backward and its optimiser step, ``end_epoch`` with the epoch's MI."""

    def __init__(self, model, make_optimizer: Callable[[list, float], Any], lr: float, seed: int) -> None:
        self.encoder_parameters = [
            p for part in (model.encoder, model.head) for p in part.parameters() if p.requires_grad
        ]
        self.optimizer = make_optimizer(self.encoder_parameters, lr)  # the run's kind, encoder only
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.on = True
        self.best_mi = -math.inf
        self.inner_steps = 0  # in all, for the cost it adds

    def encoder_steps(self, step_model, model, objective, data, batch_size: int) -> int:
        """Encoder-only steps on fresh random training batches until the loss stops improving; returns
        how many were taken."""
        n = len(data.train)
        previous, block = math.inf, 0.0
        taken = 0
        for taken in range(1, MAX_INNER_STEPS + 1):
            rows = torch.randint(n, (min(batch_size, n),), generator=self.generator)
            if isinstance(data.train, Tensor):
                rows = rows.to(data.train.device)
            x = data.train[rows]
            if data.pixels == "dynamic":
                x = torch.bernoulli(x)
            loss, _ = objective(step_model(x), model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            block += float(loss.detach())
            if taken % CHECK_EVERY == 0:
                if block >= previous:
                    break
                previous, block = block, 0.0
        self.inner_steps += taken
        return taken

    def decoder_only(self) -> None:
        """Drop the encoder's gradients of the ordinary step, so it moves the decoder alone (Adam skips
        parameters without a gradient)."""
        for p in self.encoder_parameters:
            p.grad = None

    def end_epoch(self, mutual_information: float) -> None:
        """The phase ends once the epoch's MI is no higher than the best so far."""
        if math.isfinite(mutual_information) and mutual_information > self.best_mi:
            self.best_mi = mutual_information
        else:
            self.on = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "on": self.on,
            "best_mi": self.best_mi,
            "inner_steps": self.inner_steps,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on, self.best_mi = bool(state["on"]), float(state["best_mi"])
        self.inner_steps = int(state["inner_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
