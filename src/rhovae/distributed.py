"""One run on several processes: the process group, DistributedDataParallel, and the few collectives
the trainer needs, each a no-op in a single process.

``torchrun --nproc_per_node N -m rhovae train ...`` starts N processes with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in their environment. :func:`join` turns that into a :class:`Cluster`, initialising the
process group (NCCL when the device is CUDA, gloo otherwise) and giving each process the GPU
``cuda:LOCAL_RANK``; a single process gets :data:`SINGLE`. What the trainer distributes, and why, is
described in :mod:`rhovae.train`.
"""

from __future__ import annotations

import atexit
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from rhovae.errors import RhovaeError

__all__ = ["SINGLE", "Cluster", "join", "rank_seed", "wrap"]

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """Where this process stands among the processes training one run: ``rank`` of ``world``, and its
    ``local_rank`` on its machine. Collectives must be called by every rank in the same order."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0, the one process that writes the run folder."""
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over all ranks, in place (on the device of the process group's backend)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object; the others pass a placeholder)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank. A :class:`RhovaeError` it raises
        is raised on every rank, so that a refusal (say, a run folder in use) stops all processes with
        the same one-line message instead of leaving the others waiting."""
        if self.world == 1:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except RhovaeError as e:
                error = e
        result, message = self.broadcast((result, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise RhovaeError(message)
        return result


SINGLE = Cluster()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise RhovaeError(f"environment variable {name}={value!r} is not a number") from None


def join(device: torch.device) -> tuple[Cluster, torch.device]:
    """The cluster this process belongs to and the device it trains on.

    Under torchrun (``WORLD_SIZE`` > 1) the process group is initialised on first use and kept for the
    life of the process (destroyed at exit): a second run in the same processes reuses it, since
    tearing a group down and building it again through the same rendezvous store races with the other
    ranks. A process group someone else initialised is used as it is (import ``torch.distributed.nn``
    before initialising it, or the group outlives the interpreter: see the comment below). A CUDA
    device becomes ``cuda:LOCAL_RANK``. Without either, :data:`SINGLE` and ``device`` unchanged.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE, device
    local_rank = _env_int("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1))
    if device.type == "cuda":
        if device.index is not None:
            raise RhovaeError(
                f"device {device}: under torchrun each process takes the GPU cuda:LOCAL_RANK; pass "
                "--device cuda (or auto)"
            )
        if local_rank >= torch.cuda.device_count():
            raise RhovaeError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA devices; "
                "start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise RhovaeError(f"device {device}: several processes train on cpu (gloo) or cuda (nccl) only")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if not dist.is_available():
            raise RhovaeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        # torch.distributed.nn.functional binds group.WORLD as a default argument when first imported
        # (DDP imports it): imported after init, it would hold the process group for the life of the
        # process, and the group's gloo worker threads would outlive the interpreter (an abort at exit)
        importlib.import_module("torch.distributed.nn.functional")

        dist.init_process_group(backend)
        atexit.register(_destroy)
    elif dist.get_backend() != backend:
        raise RhovaeError(
            f"this process group runs {dist.get_backend()}, which cannot train on {device.type}; start "
            "another torchrun job for it"
        )
    return Cluster(rank, world, local_rank), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of rank ``rank``'s sampling noise: ``seed`` itself on rank 0 (a one-process run keeps its
    numbers), an independent stream on every other rank; ``epoch`` > 0 reseeds at an epoch boundary
    (a resume on another number of processes)."""
    if rank == 0 and epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] >> 1)


def wrap(model: nn.Module, cluster: Cluster, device: torch.device, unused: bool) -> nn.Module:
    """``model`` as a training step calls it: itself in one process, else a DistributedDataParallel
    wrapper that averages gradients over ranks during backward. On CUDA, BatchNorm layers become
    SyncBatchNorm (statistics over the global batch, as in one process; PyTorch has it on GPUs only).
    ``unused``: some parameters get no gradient from a step, every step alike (say, a prior the objective
    ignores although the forward computes with it): DDP then learns which from the first step
    (``static_graph``), where looking for them from the forward's outputs would find them used."""
    if cluster.world == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=unused
    )
