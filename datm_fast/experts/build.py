"""Build a buffer end to end: prepare the data, train the missing experts, store them, resume after a crash."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Union

import torch

from .._version import __version__
from ..backends import Backend
from ..data import DataSpec, ImageDataset
from ..models import ConvNetSpec
from .buffer import BufferWriter, ExpertBuffer, dataset_info, spec_to_dict
from .config import ExpertConfig
from .train import EpochReport, ExpertTrainer, TrainedExpert

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
        rate = (
            f"trained {len(self.trained)} in {self.seconds:.1f} s ({self.expert_epochs_per_second:.3g} expert-epochs/s)"
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
    progress: bool = False,
    verify_existing: bool = True,
) -> BuildSummary:
    """Train experts ``0..num_experts-1`` into the buffer directory ``out``, skipping finished ones.

    Running it again with the same arguments resumes: experts stored completely (checked by size and,
    with ``verify_existing``, by checksum) are skipped, an interrupted group is trained again from
    its start (same seeds, so the same result). Running it with a larger ``num_experts`` extends the
    buffer. A buffer made with another model, dataset (fingerprint) or config is refused with
    :class:`~datm_fast.experts.ExpertBufferError` naming the manifest and the difference.

    ``data_spec``: how ``dataset`` was made (:meth:`DataSpec.load`); the manifest records it, so that a
    distillation from the buffer rebuilds the same data (``ExpertBuffer.data_spec``).
    ``backend``: of the fused ConvNet block, see :class:`~datm_fast.experts.ExpertTrainer`.
    ``progress=True`` shows a tqdm bar (experts, epoch, ETA, current test accuracy) on stderr.
    """
    if num_experts < 1:
        raise ValueError(f"build_buffer: num_experts must be >= 1, got {num_experts}")
    header = {
        "model": {"name": model_name, "spec": spec_to_dict(spec)},
        "dataset": dataset_info(dataset),
        "config": config.to_dict(),
        "num_epochs": config.epochs,
        "num_params": spec.num_params,
    }
    if data_spec is not None:
        header["data"] = data_spec.to_json()
    with BufferWriter(out, header) as writer:
        done = writer.finished(verify=verify_existing)
        todo = [i for i in range(num_experts) if i not in done]
        skipped = tuple(sorted(i for i in done if i < num_experts))
        started = time.perf_counter()
        if todo:
            trainer = ExpertTrainer(dataset, spec, config, device=device, backend=backend)
            writer.set(
                requested_experts=max(num_experts, int(writer.manifest.get("requested_experts") or 0)),
                versions=_versions(),
            )
            total = int(dataset.train_labels.shape[0])
            bar = _Progress(len(todo), config.epochs, num_experts, total) if progress else None
            try:
                for expert in trainer.train_iter(
                    todo,
                    experts_per_batch=experts_per_batch,
                    on_step=bar.step if bar else None,
                    on_epoch=bar.epoch if bar else None,
                ):
                    writer.add(expert.index, expert.trajectory, _entry(expert, trainer))
            finally:
                if bar is not None:
                    bar.close()
    seconds = time.perf_counter() - started
    buf = ExpertBuffer.open(out, verify="none")
    accs = tuple(float(e["test_acc"][-1]) for e in (buf.stats(i) for i in range(buf.num_experts)) if e.get("test_acc"))
    return BuildSummary(buf, tuple(todo), skipped, seconds if todo else 0.0, accs)


def _entry(expert: TrainedExpert, trainer: ExpertTrainer) -> dict[str, Any]:
    return {
        "seed": expert.seed,
        "train_loss": list(expert.train_loss),
        "train_acc": list(expert.train_acc),
        "test_loss": list(expert.test_loss),
        "test_acc": list(expert.test_acc),
        "seconds": round(expert.seconds, 3),
        "device": str(trainer.device),
        "block_backend": trainer.block_backend,
    }


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

    def close(self) -> None:
        self._bar.close()
