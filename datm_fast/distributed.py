"""One process per device on ``torch.distributed``: the ranks of a run, and what they say to each other.

datm_fast scales out on PyTorch's own engine, launched by ``torchrun`` (NCCL between GPUs, gloo on
CPU): ``torchrun --nproc-per-node N -m datm_fast.cli distill ...`` on one machine,
``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` across machines (or under
SLURM's ``srun``). :func:`from_environment` reads torchrun's environment and joins the process group;
the :class:`Distributed` it returns is passed to whatever runs on several ranks (expert training,
the exact engine, evaluation). Without torchrun it is :data:`SINGLE`, a world of one rank for which
every collective is the identity, so that single-process code paths are the distributed ones with
``world_size == 1``.

No state lives here: the process group is ``torch.distributed``'s, joined once per process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SINGLE",
    "Distributed",
    "RanksDisagree",
    "from_environment",
    "launched_by_torchrun",
]

T = TypeVar("T")

# How long a rank waits in a collective for the others before it fails (a dead peer usually fails it at
# once: its sockets close; the timeout bounds the rest, e.g. a peer that hangs). Long enough for the
# slowest thing ranks do between two collectives at the paper's sizes: an in-loop evaluation on rank 0
# (a few minutes on a GPU) while the others wait at the next step.
DEFAULT_TIMEOUT_S = 1800.0


class RanksDisagree(RuntimeError):
    """The ranks of one run were given different inputs (config, data, buffer): raised on every rank,
    naming the ranks and their values, before any work."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a run: ``rank`` of ``world_size`` (``local_rank`` on its machine).

    ``world_size == 1`` needs no process group: every collective returns its input.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"Distributed: rank {self.rank} of world_size {self.world_size} is not a rank")

    @property
    def active(self) -> bool:
        """More than one rank: the collectives talk to the others."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, which alone writes a run's files."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def close(self) -> None:
        """Leave the process group (every rank, at the end of the run). Without it gloo's threads can
        abort the interpreter at exit ("terminate called without an active exception", 1 exit in 6
        on a 2-rank CPU run, 2026-12-04)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- sharing work out -------------------------------------------------------------------------
    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th one from ``rank`` on (round robin)."""
        return list(items[self.rank :: self.world_size])

    def owner(self, index: int) -> int:
        """The rank that :meth:`mine` gives item ``index`` to."""
        return index % self.world_size

    # ----- collectives ------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.active:
            dist.barrier()

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank."""
        if not self.active:
            return value
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, what: str, value: Any) -> None:
        """Raise :class:`RanksDisagree` on every rank unless every rank has the same ``value`` (a short
        picklable summary: a config dict, a fingerprint, a checksum), naming the differing ranks."""
        values = self.all_gather_object(value)
        if all(v == values[0] for v in values):
            return
        groups: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            groups.setdefault(repr(v), []).append(rank)
        shown = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {v}" for v, r in groups.items())
        raise RanksDisagree(f"the ranks disagree on {what} ({shown}); every rank must be given the same")


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def from_environment(device_type: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed:
    """This process's :class:`Distributed`: :data:`SINGLE` without torchrun, else its rank, joining
    the process group (NCCL for ``device_type="cuda"``, gloo otherwise) if it has not joined yet.

    The rendezvous is torchrun's (``MASTER_ADDR``/``MASTER_PORT``, set for every rendezvous backend);
    a world of one rank joins no group.
    """
    if not launched_by_torchrun():
        return SINGLE
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    here = Distributed(rank, world_size, local_rank, timeout_s)
    if world_size == 1 or dist.is_initialized():
        return here
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return here
