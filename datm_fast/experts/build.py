"""Build a buffer end to end: prepare the data, train the missing experts, store them, resume after a crash."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Union

import torch

from .._version import __version__
from ..backends import Backend
from ..data import DataSpec, ImageDataset
from ..distributed import SINGLE, Distributed, OtherRankFailed, on_every_rank
from ..models import ConvNetSpec
from ..utils import locked_file, resolve_device
from .buffer import (
    BufferWriter,
    ExpertBuffer,
    ExpertBufferError,
    ExpertFiles,
    manifest_entry,
    recorded_dataset_info,
    spec_to_dict,
)
from .config import ExpertConfig
from .train import EpochReport, ExpertTrainer, TrainedExpert, default_experts_per_batch

__all__ = ["BuildSummary", "build_buffer"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class BuildSummary:
    """What :func:`build_buffer` did."""

    buffer: ExpertBuffer
    trained: tuple[int, ...]  # experts trained by this call
    skipped: tuple[int, ...]  # experts already in the buffer (resume)
    seconds: float  # wall time of the training part
    final_test_acc: tuple[float, ...]  # last-epoch test accuracy of every expert in the buffer that has one
    world_size: int = 1  # processes (torchrun ranks) that trained them
    trained_here: tuple[int, ...] | None = None  # experts this rank trained (None: all of ``trained``)

    @property
    def expert_epochs_per_second(self) -> float:
        n = len(self.trained) * self.buffer.num_epochs
        return n / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        """The one-line summary the command prints."""
        b = self.buffer
        accs = self.final_test_acc
        acc = (
            f"final test acc {100 * sum(accs) / len(accs):.2f}% (min {100 * min(accs):.2f}, max {100 * max(accs):.2f})"
            if accs
            else "no test accuracy recorded"
        )
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        rate = (
            f"trained {len(self.trained)}{ranks} in {self.seconds:.1f} s "
            f"({self.expert_epochs_per_second:.3g} expert-epochs/s)"
            if self.trained
            else "nothing to train"
        )
        return (
            f"buffer {b.root}: {b.num_experts} experts x {b.num_epochs} epochs of {b.spec.num_params} params; "
            f"{rate}, {len(self.skipped)} already done; {acc}"
        )


def build_buffer(
    out: PathLike,
    dataset: ImageDataset,
    spec: ConvNetSpec,
    config: ExpertConfig,
    num_experts: int,
    *,
    model_name: str = "ConvNet",
    data_spec: DataSpec | None = None,
    device: Union[str, torch.device, None] = None,
    experts_per_batch: int | None = None,
    backend: Backend = "auto",
    graphs: bool = False,
    progress: bool = False,
    verify_existing: bool = True,
    distributed: Distributed = SINGLE,
) -> BuildSummary:
    """Train experts ``0..num_experts-1`` into the buffer directory ``out``, skipping finished ones.

    Running it again with the same arguments resumes: experts stored completely (checked by size and,
    with ``verify_existing``, by checksum) are skipped, an interrupted group is trained again from
    its start (same seeds, so the same result). Running it with a larger ``num_experts`` extends the
    buffer. A buffer made with another model, dataset (fingerprint) or config is refused with
    :class:`~datm_fast.experts.ExpertBufferError` naming the manifest and the difference.

    ``data_spec``: how ``dataset`` was made (:meth:`DataSpec.load`); the manifest records it, so that a
    distillation from the buffer rebuilds the same data (``ExpertBuffer.data_spec``).
    ``backend``: of the fused ConvNet block, and ``graphs``: each step as a CUDA graph (the same experts),
    see :class:`~datm_fast.experts.ExpertTrainer`.
    ``progress=True`` shows a tqdm bar (experts, epoch, ETA, current test accuracy) on stderr.

    ``distributed``: the processes of a ``torchrun`` job (:func:`datm_fast.distributed.from_environment`), every
    one calling this with the same arguments (checked first: :class:`~datm_fast.distributed.RanksDisagree`
    on every rank otherwise) and ``device`` its own. The experts to train are dealt round robin (on a new
    buffer expert ``k`` goes to rank ``k mod world_size``; on resume the missing ones are dealt, so that
    the ranks share what is left evenly), each rank trains its share in groups of ``experts_per_batch``
    and writes their files; rank 0 alone holds the directory's lock and writes the manifest. Each expert
    is seeded from (seed, k) whichever rank trains it, and its file holds no timing, so the buffer is
    the one a single process makes, file for file, wherever each expert is trained in a group of the
    same experts (``experts_per_batch=1``, the CPU default) with the same kernels (on a CPU: as many
    threads per process; torchrun gives each rank one unless OMP_NUM_THREADS says otherwise). Larger
    groups differ with the world size (rank ``r`` groups ``r, r + N, ...``), which changes a group's
    float rounding only (see :mod:`datm_fast.experts.train`), as resuming an interrupted group does.
    The manifests differ in each expert's ``seconds`` (a timing) alone.
    """
    if num_experts < 1:
        raise ValueError(f"build_buffer: num_experts must be >= 1, got {num_experts}")
    dev = resolve_device(device)
    per = default_experts_per_batch(dev) if experts_per_batch is None else int(experts_per_batch)
    if per < 1:
        raise ValueError(f"experts_per_batch must be >= 1, got {experts_per_batch}")
    header = {
        "model": {"name": model_name, "spec": spec_to_dict(spec)},
        "dataset": recorded_dataset_info(out, dataset),
        "config": config.to_dict(),
        "num_epochs": config.epochs,
        "num_params": spec.num_params,
    }
    if data_spec is not None:
        header["data"] = data_spec.to_json()
    versions = _versions()
    root = Path(out)
    where = {k: v for k, v in (header.get("data") or {}).items() if k != "root"}  # the data may sit elsewhere
    distributed.agree_each(
        {
            "the model": header["model"],
            "the dataset (name, content fingerprint, preprocessing, sizes)": header["dataset"],
            "the data spec": where,
            "the training config": header["config"],
            "the number of experts": num_experts,
            "the buffer directory": str(root.resolve()),
            "the experts per batch": per,
            "the block backend asked for": backend,
            "the device type": dev.type,
            "checking finished experts by checksum": verify_existing,
            "the versions": versions,
        },
    )
    writer: BufferWriter | None = None
    held: IO[str] | None = None
    try:
        writer, plan = _open(distributed, root, header, num_experts, verify_existing, versions)
        if distributed.active:

            def reach() -> IO[str] | None:  # the other ranks see rank 0's directory, and hold it while they write
                if distributed.is_main:
                    return None
                _check_probe(root, plan.probe)
                return _ranks_lock(root, shared=True)

            held = on_every_rank(distributed, "reach the buffer directory", reach)
            if distributed.is_main and plan.probe is not None:
                (root / plan.probe[0]).unlink(missing_ok=True)
        started = time.perf_counter()
        mine = tuple(distributed.mine(plan.todo))
        reported = _train(
            distributed, writer, root, header, dataset, spec, config, dev, backend, graphs, per, plan, mine, progress
        )
        # Every rank has written its files (the pulses ended only once no rank trains): rank 0 checks and lists
        # them, and no rank returns before the manifest is final (on_every_rank's gather is the barrier).
        gathered = distributed.all_gather_object(reported)

        def record() -> None:
            if writer is not None and distributed.active:
                writer.record({k: e for entries in gathered[1:] for k, e in entries.items()})

        on_every_rank(distributed, "list the other ranks' experts in the manifest", record)
        seconds = time.perf_counter() - started
    finally:
        if held is not None:
            held.close()
        if writer is not None:
            writer.close()
    buf = ExpertBuffer.open(out, verify="none")
    accs = tuple(float(e["test_acc"][-1]) for e in (buf.stats(i) for i in range(buf.num_experts)) if e.get("test_acc"))
    return BuildSummary(
        buf,
        plan.todo,
        plan.skipped,
        seconds if plan.todo else 0.0,
        accs,
        world_size=distributed.world_size,
        trained_here=mine,
    )


@dataclass(frozen=True)
class _Plan:
    """What rank 0 found in the buffer, sent to every rank."""

    todo: tuple[int, ...]  # experts to train, in order
    skipped: tuple[int, ...]  # experts already stored
    probe: tuple[str, str] | None  # (file name, content) that every rank must read in the directory
    error: str | None = None  # why rank 0 cannot build this buffer


def _open(
    ranks: Distributed,
    root: Path,
    header: dict[str, Any],
    num_experts: int,
    verify: bool,
    versions: dict[str, str],
) -> tuple[BufferWriter | None, _Plan]:
    """Rank 0 opens the buffer (the lock, the manifest, what is done) and tells every rank the plan."""
    if not ranks.is_main:
        plan: _Plan = ranks.broadcast_object(None)
        if plan.error is not None:
            raise OtherRankFailed(f"rank 0: {plan.error}")
        return None, plan
    writer: BufferWriter | None = None
    try:
        writer = BufferWriter(root, header)
        _ranks_lock(root, shared=False)
        done = writer.finished(verify=verify)
        todo = tuple(i for i in range(num_experts) if i not in done)
        if todo:
            writer.set(
                requested_experts=max(num_experts, int(writer.manifest.get("requested_experts") or 0)),
                versions=versions,
            )
        plan = _Plan(
            todo, tuple(sorted(i for i in done if i < num_experts)), _write_probe(root) if ranks.active else None
        )
    except Exception as exc:
        if writer is not None:
            writer.close()
        ranks.broadcast_object(_Plan((), (), None, str(exc)))  # the others stop too, saying nothing more
        raise
    return writer, ranks.broadcast_object(plan)


def _train(
    ranks: Distributed,
    writer: BufferWriter | None,
    root: Path,
    header: dict[str, Any],
    dataset: ImageDataset,
    spec: ConvNetSpec,
    config: ExpertConfig,
    device: torch.device,
    backend: Backend,
    graphs: bool,
    per: int,
    plan: _Plan,
    mine: tuple[int, ...],
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """Train this rank's share ``mine`` of ``plan.todo``, writing each expert's file as soon as its group
    is done (rank 0 also lists it in the manifest at once); returns the other ranks' manifest entries.

    Where the trajectories go: each rank writes its own experts' files into the directory, rather than
    sending them to rank 0 to write. The paper's buffer is 100 experts x 51 checkpoints x 320k floats,
    6.5 GB: through rank 0 that would be 65 MB per expert over the network (and into rank 0's memory)
    and every write serialised on one disk, for nothing a shared directory does not give; the price is
    that the directory must be one that every rank sees (a single machine, or a shared filesystem across
    machines), which :func:`_check_probe` proves before any training, and rank 0 checks every reported
    file's size and sha256 before listing it.
    """
    if not plan.todo:
        return {}
    trainer = ExpertTrainer(dataset, spec, config, device=device, backend=backend, graphs=graphs)
    # "auto" resolves per machine (a missing C++ extension falls back to PyTorch's ops); the backend is in
    # every expert's file, so mixing them would make a buffer that no single process would.
    ranks.agree("the fused block's backend (datm-fast info says why one is off)", trainer.block_backend)
    files = ExpertFiles(root, header)
    bar = None
    if progress and ranks.is_main:
        experts = len(plan.todo) + len(plan.skipped)  # the number asked for
        bar = _Progress(len(plan.todo), config.epochs, experts, int(dataset.train_labels.shape[0]))
    pulse = _Pulse(ranks, trainer.device, bar.others if bar is not None else None)

    def on_epoch(report: EpochReport) -> None:
        if bar is not None:
            bar.epoch(report)
        pulse.beat(len(report.experts))

    reported: dict[int, dict[str, Any]] = {}
    try:
        for expert in trainer.train_iter(
            mine, experts_per_batch=per, on_step=bar.step if bar is not None else None, on_epoch=on_epoch
        ):
            info, run_info = _entry(expert, trainer)
            if writer is not None:
                writer.add(expert.index, expert.trajectory, info, run_info=run_info)
            else:
                reported[expert.index] = manifest_entry(files.write(expert.index, expert.trajectory, info), run_info)
        pulse.wait_for_all()
    finally:
        if bar is not None:
            bar.close()
    return reported


class _Pulse:
    """Ranks that have trained their share wait for the others one epoch at a time.

    A rank that waited for the rest in one collective could wait for hours (on a CPU a CIFAR expert
    takes over an hour, and the shares differ by a group on an uneven split), past the group's timeout
    (:data:`datm_fast.distributed.DEFAULT_TIMEOUT_S`). So every rank that trains sums (working, expert
    epochs done) with the others after each epoch, and a rank that is done keeps summing (0, 0) until
    the sum says that none works: the longest wait is one epoch of one group. Rank 0's progress bar
    counts the other ranks' epochs from the sums.
    """

    def __init__(self, ranks: Distributed, device: torch.device, on_others: Callable[[int], None] | None) -> None:
        self._ranks = ranks
        self._device = device  # NCCL sums CUDA tensors only
        self._on_others = on_others

    def _sum(self, working: int, expert_epochs: int) -> int:
        if not self._ranks.active:
            return 0
        t = self._ranks.all_reduce_sum(torch.tensor([working, expert_epochs], dtype=torch.int64, device=self._device))
        total_working, total_epochs = (int(v) for v in t.tolist())
        if self._on_others is not None:
            self._on_others(total_epochs - expert_epochs)
        return total_working

    def beat(self, expert_epochs: int) -> None:
        """After each epoch of a group: ``expert_epochs`` (the group's size) more done here."""
        self._sum(1, expert_epochs)

    def wait_for_all(self) -> None:
        """After this rank's share: wait until no rank trains."""
        while self._sum(0, 0):
            pass


# ----- the buffer directory is shared by a job's ranks --------------------------------------------------------
_PROBE_PREFIX = ".rank-probe-"
_RANKS_LOCK = ".ranks.lock"


def _write_probe(root: Path) -> tuple[str, str]:
    """Rank 0 (holding the lock): a file with fresh random content that every other rank must read."""
    for stale in root.glob(f"{_PROBE_PREFIX}*"):  # of a killed job
        stale.unlink(missing_ok=True)
    token = secrets.token_hex(16)
    name = f"{_PROBE_PREFIX}{token[:12]}"
    (root / name).write_text(token, encoding="utf-8")
    return name, token


def _check_probe(root: Path, probe: tuple[str, str] | None) -> None:
    if probe is None:
        return
    name, token = probe
    try:
        seen: str | None = (root / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        seen = None
    if seen != token:
        raise ExpertBufferError(
            f"{root}: this rank does not see the file {name} that rank 0 just wrote there: every rank writes its "
            "experts into the buffer directory, which must be one directory that every rank sees (one machine, "
            "or a shared filesystem)"
        )


def _ranks_lock(root: Path, *, shared: bool) -> IO[str] | None:
    """The lock that keeps a new job from starting while ranks of an earlier one still write here.

    Rank 0 holds the directory's lock (:class:`BufferWriter`); the other ranks, which write expert files
    but hold no such lock, hold ``.ranks.lock`` shared for as long as they may write (``shared=True``;
    returns the open file: close it to release). If rank 0 is killed, its lock is freed at once, while
    the others may live on for a moment (until torchrun stops them, or longer if the launcher died
    too); rank 0 of the next job, holding the directory's lock, first takes this one exclusively and
    releases it (``shared=False``), which fails while any of them lives. The OS frees flocks of a
    killed process, so a dead job never blocks the next. Where ``flock`` is missing (Windows) nothing
    is locked.
    """
    path = root / _RANKS_LOCK
    if not shared and not path.exists():  # no job of several ranks ever wrote here
        return None
    try:
        f = locked_file(path, shared=shared)
    except BlockingIOError:
        raise ExpertBufferError(
            f"{root}: ranks of another job still write expert files here (they hold {path}); wait until they "
            "have exited, or write to another directory"
        ) from None
    if shared:
        return f
    f.close()
    return None


def _entry(expert: TrainedExpert, trainer: ExpertTrainer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The expert's entry (in its file and the manifest) and what only this run knows (the manifest only).

    The device is recorded by its type: the expert does not depend on which of a machine's GPUs trained it
    (rank r trains on cuda:r), and the file should not either.
    """
    info = {
        "seed": expert.seed,
        "train_loss": list(expert.train_loss),
        "train_acc": list(expert.train_acc),
        "test_loss": list(expert.test_loss),
        "test_acc": list(expert.test_acc),
        "device": trainer.device.type,
        "block_backend": trainer.block_backend,
    }
    return info, {"seconds": round(expert.seconds, 3)}


def _versions() -> dict[str, str]:
    import platform

    return {"datm_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}


class _Progress:
    """tqdm bar in expert-epochs (fractional within an epoch), showing the group, epoch and test accuracy."""

    def __init__(self, experts: int, epochs: int, total_experts: int, train_images: int) -> None:
        from tqdm.auto import tqdm

        self._images = train_images
        self._total_experts = total_experts
        self._group: tuple[int, ...] = ()
        self._bar = tqdm(
            total=experts * epochs,
            unit="expert-epoch",
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} expert-epochs "
            "[{elapsed}<{remaining}]{postfix}",
        )

    def step(self, experts: tuple[int, ...], images: int) -> None:
        if experts != self._group:
            self._group = experts
            lo, hi = min(experts), max(experts)
            who = f"expert {lo}" if lo == hi else f"experts {lo}-{hi}"
            self._bar.set_description(f"{who} of {self._total_experts}", refresh=False)
            self._bar.set_postfix_str("epoch 1", refresh=False)
        self._bar.update(len(experts) * images / self._images)

    def epoch(self, report: EpochReport) -> None:
        acc = 100 * sum(report.test_acc) / len(report.test_acc)
        nxt = f"epoch {report.epoch + 1}/{report.epochs}, " if report.epoch < report.epochs else ""
        self._bar.set_postfix_str(f"{nxt}test acc {acc:.1f}% after epoch {report.epoch}")

    def others(self, expert_epochs: int) -> None:
        """Expert-epochs that other ranks finished."""
        if expert_epochs:
            self._bar.update(expert_epochs)

    def close(self) -> None:
        self._bar.close()
