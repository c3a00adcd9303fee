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

import argparse
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "add_timeout_flag",
    "SINGLE",
    "Distributed",
    "OtherRankFailed",
    "RanksDisagree",
    "on_every_rank",
    "on_main",
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


class OtherRankFailed(RuntimeError):
    """Another rank of the job failed (rank 0 could not take the run directory or write, a rank could not
    read the data): raised on the ranks where it did not happen, naming that rank and its error, so that
    every rank stops instead of waiting in its next collective. The failing rank raises (and reports) the
    error itself: ``datm-fast`` prints nothing more for this one."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a run: ``rank`` of ``world_size`` (``local_rank`` on its machine).

    ``world_size == 1`` needs no process group: every collective returns its input.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    # Whether this object joined the process group (from_environment did): only then does close() leave it,
    # so that a command run inside a script that joined (datm_fast.cli.main under torchrun) leaves the
    # script's group as it found it.
    owns_group: bool = field(default=False, compare=False, repr=False)

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

    def close(self, *, wait: bool = True) -> None:
        """Leave the process group (every rank, at the end of the run), after waiting for the others
        (``wait``; not when this rank fails: they may be gone). Without it gloo's threads can abort the
        interpreter at exit ("terminate called without an active exception", 1 exit in 6 on a 2-rank
        CPU run, 2026-12-04); without the wait 2 of 8 2-rank distill runs still did, with it 0 of 10."""
        if self.active and self.owns_group and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(wait=exc_type is None)

    # ----- sharing work out -------------------------------------------------------------------------
    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th one from ``rank`` on (round robin)."""
        return list(items[self.rank :: self.world_size])

    def owner(self, index: int) -> int:
        """The rank that :meth:`mine` gives item ``index`` to."""
        return index % self.world_size

    def device(self, asked: torch.device) -> torch.device:
        """This rank's device, given the one asked for: with more than one rank a CUDA rank runs on
        ``cuda:LOCAL_RANK`` (one GPU per rank, as torchrun means it), so ``cuda`` becomes that and any
        other index is refused (two ranks on one GPU would each have half of it and fight over it; choose
        the GPUs with ``CUDA_VISIBLE_DEVICES``). Other devices, and a single process, run as asked.
        The one rule for ``buffer``, ``distill`` and ``eval``."""
        if asked.type != "cuda" or not self.active:
            return asked
        if asked.index not in (None, self.local_rank):
            raise ValueError(
                f"device {asked}: under torchrun each rank runs on cuda:LOCAL_RANK ({self} on cuda:{self.local_rank}); "
                "ask for 'cuda' and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", self.local_rank)

    # ----- collectives ------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum_each(self, tensors: Sequence[Tensor]) -> None:
        """Sum each of ``tensors`` over the ranks, in place, in one all-reduce of them flattened into one
        buffer (one message instead of one per tensor; they must share a dtype and device)."""
        if not self.active or not tensors:
            return
        flat = self.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

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

    def agree_each(self, values: dict[str, Any]) -> None:
        """:meth:`agree` on every entry of ``values`` (what: the key) in one gather, naming the first entry
        that differs (a whole config per rank would bury the one setting that differs)."""
        if not self.active:
            return
        gathered = self.all_gather_object(values)
        missing = "<missing>"
        for what, value in values.items():  # in one order on every rank: every rank names the same entry
            if any(g.get(what, missing) != value for g in gathered):
                self.agree(what, value)
        for g in gathered:  # an entry that this rank lacks
            for what in g.keys() - values.keys():
                self.agree(what, values.get(what, missing))


SINGLE = Distributed()


@dataclass(frozen=True)
class _Failure:
    """An error on one rank, as :func:`on_main` and :func:`on_every_rank` hand it to the others."""

    rank: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.kind}: {self.message}"


def on_main(distributed: Distributed, what: str, work: Callable[[], T], *, share: bool = True) -> T | None:
    """``work()`` on rank 0 alone (what only rank 0 does: take a run directory, write a file, evaluate);
    its result on every rank (``share``; else None on the others).

    An exception on rank 0 is raised there and, as :class:`OtherRankFailed` naming ``what`` and the
    error, on every other rank, instead of leaving them waiting in their next collective. One rank:
    ``work()``. Every rank must call it at the same point (it is one broadcast).
    """
    if not distributed.active:
        return work()
    if not distributed.is_main:
        got = distributed.broadcast_object(None)
        if isinstance(got, _Failure):
            raise OtherRankFailed(f"{distributed}: rank 0 failed to {what} ({got})")
        return got
    try:
        value = work()
    except Exception as exc:
        distributed.broadcast_object(_Failure(0, type(exc).__name__, str(exc)))
        raise
    distributed.broadcast_object(value if share else None)
    return value


def on_every_rank(distributed: Distributed, what: str, work: Callable[[], T]) -> T:
    """``work()`` on every rank (checks each rank makes of its own inputs and devices); if it raised on
    any, raise on every rank: the error itself where it happened, :class:`OtherRankFailed` naming the
    failed ranks elsewhere. ``work`` must call no collective (a rank that raises skips the rest)."""
    error: Exception | None = None
    value: T | None = None
    try:
        value = work()
    except Exception as exc:
        error = exc
    if distributed.active:
        mine = None if error is None else _Failure(distributed.rank, type(error).__name__, str(error))
        failed = [f for f in distributed.all_gather_object(mine) if f is not None]
        if failed and error is None:
            raise OtherRankFailed(f"{distributed}: {what} failed on other ranks ({'; '.join(map(str, failed))})")
    if error is not None:
        raise error
    return value  # type: ignore[return-value]


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def from_environment(device_type: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed:
    """This process's :class:`Distributed`: :data:`SINGLE` without torchrun, else its rank, joining
    the process group (NCCL for ``device_type="cuda"``, gloo otherwise) if it has not joined yet
    (then it alone leaves it, at :meth:`Distributed.close`).

    The rendezvous is torchrun's (``MASTER_ADDR``/``MASTER_PORT``, set for every rendezvous backend);
    a world of one rank joins no group.
    """
    if not launched_by_torchrun():
        return SINGLE
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1 or dist.is_initialized():
        return Distributed(rank, world_size, local_rank, timeout_s)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(rank, world_size, local_rank, timeout_s, owns_group=True)


def add_timeout_flag(parser: argparse.ArgumentParser) -> None:
    """``--dist-timeout SECONDS`` (:data:`DEFAULT_TIMEOUT_S`), for every command that runs under torchrun."""
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others in a collective before the job fails (a rank "
        "that dies fails the others at once; this bounds a rank that hangs, and work rank 0 does alone)",
    )
