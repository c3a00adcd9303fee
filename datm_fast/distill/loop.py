"""The DATM outer loop: initialise a synthetic set, then match expert trajectory segments.

Everything upstream's ``distill/DATM.py`` does, key for key (see :class:`DistillConfig`), plus what it
lacks: every random choice is derived from ``config.seed`` and the iteration number, so a run
reproduces bit for bit and a resumed run equals an uninterrupted one; atomic checkpoints; NaN and
infinite losses are reported and skipped; a progress bar and ``metrics.jsonl``; optional TensorBoard and
wandb logging (:mod:`datm_fast.distill.loggers`).

One iteration ``it``:

1. at the iterations of :func:`eval_iterations`, evaluate the set (before the update) and keep the best;
2. take the next expert of a shuffled order (reshuffled after each pass over the experts) and a start
   epoch uniform in ``[min_start_epoch, upper(it))`` (difficulty alignment, :func:`sample_start_epoch`);
3. ``loss = trajectory_matching_loss(...)`` from its checkpoint at the start epoch towards the one
   ``expert_epochs`` later, and ``loss.backward()``;
4. if ``loss <= threshold``, one SGD step each on the images (lr_img, momentum 0.5), the learned lr
   (lr_lr, momentum 0.5) and the label logits (lr_y, momentum_y); otherwise skip all three.

With ``segments`` K > 1 (``config.matching.segments``; datm_fast's change of algorithm, off by
default) step 3 matches K segments (consecutive experts of the shuffled order, start epochs drawn
each) and the loss and gradients are the mean of theirs.

On several ranks (``distill(..., distributed=)``, one process per device under torchrun) every rank
runs this loop on the same state and shares each unroll's work (the exact and tesla engines,
:func:`~datm_fast.distill.unroll.trajectory_matching_loss`): the all-reduces hand every rank the same
gradients, so every rank takes the same updates and reaches the same decisions (skips, divergence,
DistillationFailed) from the same state. Before any work the ranks agree on the config, the data and
the expert buffer (:class:`~datm_fast.distributed.RanksDisagree` on every rank otherwise), and at every
iteration on the unroll's plan. Rank 0 alone owns the run directory (its lock, checkpoints, sets,
metrics, grids, failure.txt), the trackers, the callback and the progress bar; it reads a checkpoint
to resume and hands the state to the others (a checkpoint holds no per-rank state: any number of ranks
resumes it), and it alone evaluates, handing the outcome to the others. Whatever fails on rank 0
alone (a refused run directory, a full disk, an evaluation) is raised on every rank
(:class:`~datm_fast.distributed.OtherRankFailed` on the others).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..augment import DSAConfig
from ..data import DataSpec, ImageDataset, Transform
from ..distributed import SINGLE, Distributed, on_every_rank, on_main
from ..models import ConvNetSpec, convnet_forward, convnet_spec_from_name
from ..precision import precision_scope
from ..step_graphs import StepGraphs
from ..utils import available_memory_bytes, peak_rss_bytes, resolve_device, tensor_digest
from .config import DistillConfig, eval_iterations, sample_start_epoch, validate_against
from .loggers import MetricsLogger, check_logger_names, make_loggers
from .rundir import RunDir, RunRecord, SyntheticSet
from .unroll import UnrollPlan, least_unroll_bytes, make_unroll_plan, trajectory_matching_loss

__all__ = [
    "Trajectories",
    "EvalOutcome",
    "DistilledSet",
    "DistillationFailed",
    "UpdateCounts",
    "SANE_MAX_ABS_IMAGE",
    "SANE_MAX_ABS_LABEL",
    "SANE_MAX_LR",
    "derived_seed",
    "initialize_synthetic_set",
    "distill",
]


class Trajectories(Protocol):
    """What the loop reads from an expert buffer (``datm_fast.experts.ExpertBuffer`` is one)."""

    @property
    def num_experts(self) -> int: ...

    @property
    def num_epochs(self) -> int:  # epochs trained: checkpoints 0 (init) .. num_epochs
        ...

    def params(self, expert: int, epoch: int) -> Tensor:  # (P,) float32 flat parameters
        ...


@dataclass(frozen=True)
class EvalOutcome:
    """What an evaluator returns: test accuracy (fraction) of each freshly trained network, and the mean
    accuracy of every other network the set was evaluated with (``(name, mean)`` pairs)."""

    accuracies: tuple[float, ...]
    other_models: tuple[tuple[str, float], ...] = ()

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


# images, labels, lr, seed -> outcome. Called every eval_it iterations.
Evaluator = Callable[[Tensor, Tensor, float, int], EvalOutcome]


@dataclass
class UpdateCounts:
    """What became of a run's iterations: updates applied, and skipped for a non-finite loss or
    gradient or for a loss above the threshold."""

    applied: int = 0
    nonfinite: int = 0
    over_threshold: int = 0

    def __str__(self) -> str:
        total = self.applied + self.nonfinite + self.over_threshold
        skipped = total - self.applied
        why = f" ({self.nonfinite} non-finite, {self.over_threshold} above the threshold)" if skipped else ""
        return f"{self.applied} of {total} updates applied{why}"


@dataclass
class DistilledSet:
    """The result of :func:`distill`: the best synthetic set (by evaluation; the last one without)."""

    images: Tensor  # (M, C, H, W) float32, in the training space (ZCA-whitened when config.zca)
    labels: Tensor  # (M, K) float32 label logits; soft targets are softmax(labels)
    lr: float  # learned inner-loop learning rate
    iteration: int  # iteration the set comes from
    best_accuracy: float | None  # mean evaluation accuracy of this set, when evaluated
    run_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows of this call
    updates: UpdateCounts = field(default_factory=UpdateCounts)  # of the whole run, resumes included


class DistillationFailed(RuntimeError):
    """A run that cannot produce a useful set: its set or lr left the sane range (it diverged), or
    not one update was applied. The message says why and what to change."""


# The sane range of a set. Beyond it a run has diverged and nothing later brings it back: the values
# only grow (lr_img=1e38 took the images to 3.9e35, a threshold of 1e30 let a loss of 1.2e11 through
# and the images reached 1e14, the lr -1.4e5). Preprocessed real pixels lie within +-3.2
# (ZCA-whitened CIFAR-10 and MNIST, measured 2026-12-04), label logits from experts within tens, the
# learned lr starts at lr_teacher (0.01 for CIFAR-10): the bounds leave three orders of magnitude.
SANE_MAX_ABS_IMAGE = 1e4
SANE_MAX_ABS_LABEL = 1e4
SANE_MAX_LR = 1e3


def derived_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for one purpose (``keys``), independent of every other purpose and iteration.

    Every random draw of the loop is seeded this way, from ``config.seed`` and the iteration, so no
    generator state needs to be carried across iterations: resuming at iteration ``k`` draws exactly
    what an uninterrupted run draws there.
    """
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]
    for key in keys:
        if isinstance(key, str):
            words.extend(key.encode())
        else:
            words.extend([key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF])
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> 1)


def _generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *keys))


def expert_for_iteration(seed: int, iteration: int, num_experts: int) -> int:
    """The expert matched at ``iteration``: a fresh shuffle of all experts for every pass over them."""
    n_pass, position = divmod(iteration, num_experts)
    order = torch.randperm(num_experts, generator=_generator(seed, "expert-order", n_pass))
    return int(order[position])


# ----- initialisation ----------------------------------------------------------------------------------
@torch.no_grad()
def _logits(spec: ConvNetSpec, params: Tensor, images: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([convnet_forward(spec, params, images[i : i + batch]) for i in range(0, len(images), batch)])


def initialize_synthetic_set(
    data: ImageDataset,
    experts: Trajectories,
    config: DistillConfig,
    spec: ConvNetSpec,
    *,
    device: torch.device,
    label_experts: int = 10,
) -> tuple[Tensor, Tensor]:
    """Initial images (M, C, H, W) and label logits (M, K), class by class (``ipc`` each, class order).

    ``pix_init``:
        ``samples_predicted_correctly``: per class, real training images (in a seeded random order)
        that the checkpoint ``label_model_timestamp`` (-1: the last) of expert 0 classifies correctly.
        ``real``: random real training images of the class.
        ``noise``: standard normal images.
    Labels: the mean logits over the last checkpoints of the first ``label_experts`` experts that
    classify the image correctly (the selecting checkpoint always does for
    ``samples_predicted_correctly``); when none does, the logits of expert 0's selecting checkpoint.
    For ``noise`` images, whose expert logits mean nothing, the labels are the class's one-hot vector
    times 10 (softmax about 0.9995 on the class): upstream crashes here.
    """
    k = data.num_classes
    learning = config.learning
    epoch = learning.label_model_timestamp if learning.label_model_timestamp >= 0 else experts.num_epochs
    if epoch > experts.num_epochs:
        raise ValueError(
            f"label_model_timestamp {learning.label_model_timestamp} is beyond the buffer's {experts.num_epochs} epochs"
        )
    selector = experts.params(0, epoch).to(device)
    gen = _generator(config.run.seed, "init")
    images, labels = [], []
    for c in range(k):
        pool = torch.nonzero(data.train_labels == c).flatten()
        pool = pool[torch.randperm(len(pool), generator=gen)]
        if learning.pix_init == "noise":
            x = torch.randn(learning.ipc, *data.train_images.shape[1:], generator=gen)
            images.append(x)
            labels.append(torch.nn.functional.one_hot(torch.full((learning.ipc,), c), k).float() * 10.0)
            continue
        if learning.pix_init == "real":
            chosen = pool[: learning.ipc]
        else:
            chosen_list: list[Tensor] = []
            found = 0
            for start in range(0, len(pool), 256):  # upstream scans in batches of 256
                idx = pool[start : start + 256]
                pred = _logits(spec, selector, data.train_images[idx].to(device)).argmax(1).cpu()
                good = idx[pred == c][: learning.ipc - found]
                chosen_list.append(good)
                found += len(good)
                if found == learning.ipc:
                    break
            if found < learning.ipc:
                raise ValueError(
                    f"pix_init samples_predicted_correctly: expert 0 (epoch {epoch}) classifies only {found} "
                    f"images of class {c} ({data.classes[c]!r}) correctly, fewer than ipc={learning.ipc}; "
                    "use pix_init real, or a better-trained buffer"
                )
            chosen = torch.cat(chosen_list)
        images.append(data.train_images[chosen])
    images_t = torch.cat(images).to(device)
    if learning.pix_init == "noise":
        return images_t, torch.cat(labels).to(device)
    class_of = torch.arange(k).repeat_interleave(learning.ipc).to(device)
    total = torch.zeros(len(images_t), k, device=device)
    count = torch.zeros(len(images_t), 1, device=device)
    for e in range(min(label_experts, experts.num_experts)):
        logits = _logits(spec, experts.params(e, experts.num_epochs).to(device), images_t)
        right = (logits.argmax(1) == class_of).unsqueeze(1).float()
        total += logits * right
        count += right
    fallback = _logits(spec, selector, images_t)
    labels_t = torch.where(count > 0, total / count.clamp_min(1), fallback)
    return images_t, labels_t


# ----- what a run writes -------------------------------------------------------------------------------
@dataclass
class _State:
    """What the loop carries from one iteration to the next (and a checkpoint holds)."""

    images: Tensor
    labels: Tensor
    lr: Tensor
    opt_images: torch.optim.Optimizer
    opt_lr: torch.optim.Optimizer
    opt_labels: torch.optim.Optimizer
    iteration: int  # next iteration to run
    best_accuracy: float | None
    best_iteration: int | None
    updates: UpdateCounts = field(default_factory=UpdateCounts)

    def snapshot(self) -> tuple[Tensor, Tensor, float]:
        """The current set, detached: images, labels, lr."""
        return self.images.detach().clone(), self.labels.detach().clone(), float(self.lr.detach())

    def checkpoint(self, seed: int) -> dict[str, Any]:
        return {
            "next_iteration": self.iteration,
            "images": self.images.detach().cpu(),
            "labels": self.labels.detach().cpu(),
            "lr": self.lr.detach().cpu(),
            "opt_images": self.opt_images.state_dict(),
            "opt_lr": self.opt_lr.state_dict(),
            "opt_labels": self.opt_labels.state_dict(),
            "best_accuracy": -1.0 if self.best_accuracy is None else self.best_accuracy,
            "best_iteration": -1 if self.best_iteration is None else self.best_iteration,
            # Every random draw is derived from (seed, iteration), so no generator state is needed to
            # resume; the seed is kept to refuse a resume under another one.
            "seed": seed,
            "updates": [self.updates.applied, self.updates.nonfinite, self.updates.over_threshold],
        }

    def restore(self, payload: dict[str, Any], seed: int, source: Path) -> None:
        if payload["seed"] != seed:
            raise ValueError(f"{source}: written with seed {payload['seed']}, resuming with seed {seed}")
        if payload["images"].shape != self.images.shape or payload["labels"].shape != self.labels.shape:
            raise ValueError(
                f"{source}: holds a set of shape {tuple(payload['images'].shape)}, this config makes "
                f"{tuple(self.images.shape)}"
            )
        with torch.no_grad():
            self.images.copy_(payload["images"])
            self.labels.copy_(payload["labels"])
            self.lr.copy_(payload["lr"])
        self.opt_images.load_state_dict(payload["opt_images"])
        self.opt_lr.load_state_dict(payload["opt_lr"])
        self.opt_labels.load_state_dict(payload["opt_labels"])
        self.iteration = int(payload["next_iteration"])
        self.best_accuracy = None if payload["best_accuracy"] < 0 else float(payload["best_accuracy"])
        self.best_iteration = None if payload["best_iteration"] < 0 else int(payload["best_iteration"])
        self.updates = UpdateCounts(*(int(n) for n in payload["updates"]))

    def divergence(self) -> str | None:
        """Why the set has left the sane range (``SANE_MAX_*``), or None while it is within it."""
        for name, values, bound in (
            ("images", self.images, SANE_MAX_ABS_IMAGE),
            ("label logits", self.labels, SANE_MAX_ABS_LABEL),
        ):
            peak = float(values.detach().abs().max())
            if not peak <= bound:  # NaN fails too
                return f"the {name} reached |value| {peak:.3g}, beyond the sane {bound:g}"
        lr = float(self.lr.detach())
        if not 0 < lr <= SANE_MAX_LR:
            return f"the learned lr reached {lr:.3g}, outside the sane (0, {SANE_MAX_LR:g}]"
        return None


class _Outputs:
    """Everything one :func:`distill` call writes and sends: the run directory's files (through its
    :class:`RunDir`, when there is one), the trackers' rows and grids, and the caller's callback.

    On several ranks, rank 0's (the others' hold nothing): each write runs on rank 0 alone and its
    failure is raised on every rank (:func:`~datm_fast.distributed.on_main`), so every rank calls each method alike."""

    def __init__(
        self,
        run: RunDir | None,
        loggers: Sequence[MetricsLogger],
        callback: Callable[[dict[str, Any]], None] | None,
        transform: Transform | None,
        config: DistillConfig,
        distributed: Distributed = SINGLE,
    ) -> None:
        self.run, self.loggers, self.callback, self.transform = run, list(loggers), callback, transform
        self.distributed = distributed
        self.ipc = config.learning.ipc
        # Upstream sends grids to its tracker only below IPC 50 unless force_save; the PNG is always written.
        self.grids_to_trackers = self.ipc < 50 or config.run.force_save

    def _on_main(self, what: str, work: Callable[[], None]) -> None:
        on_main(self.distributed, what, work, share=False)

    def row(self, row: dict[str, Any]) -> None:
        def write() -> None:
            if self.run is not None:
                self.run.append_metrics(row)
            for logger in self.loggers:
                logger.log(row, row["iteration"])
            if self.callback is not None:
                self.callback(row)

        self._on_main(f"write the metrics of iteration {row['iteration']}", write)

    def best(self, images: Tensor, labels: Tensor, lr: float, iteration: int) -> None:
        def write() -> None:
            if self.run is not None:
                self.run.save_set("best", images, labels, lr)
                self._grid("best", images, iteration)

        self._on_main("write the best set", write)

    def checkpoint(self, state: _State, iteration: int, seed: int) -> None:
        def write() -> None:
            if self.run is None:
                return
            self.run.save_set(str(iteration), state.images, state.labels, float(state.lr.detach()))
            self._grid("latest", state.images, iteration)
            self.run.save_checkpoint(state.checkpoint(seed))

        self._on_main(f"write the checkpoint of iteration {iteration}", write)

    def final_checkpoint(self, state: _State, seed: int) -> None:
        """The state at the end of the call (no set, no grid): what a resume continues from."""
        self._on_main(
            "write the final checkpoint", lambda: self.run.save_checkpoint(state.checkpoint(seed)) if self.run else None
        )

    def _grid(self, tag: str, images: Tensor, iteration: int) -> None:
        assert self.run is not None
        path = self.run.save_grid(tag, images, self.transform, self.ipc)
        targets = [lg for lg in self.loggers if callable(getattr(lg, "log_images", None))]
        if not targets or not self.grids_to_trackers:
            return
        with Image.open(path) as picture:
            grid = np.asarray(picture.convert("RGB"))
        for logger in targets:
            logger.log_images(f"images_{tag}", grid, max(iteration, 0))  # type: ignore[attr-defined]

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # one failing tracker must not hide the run's outcome
                warnings.warn(
                    f"distill: closing logger {type(logger).__name__} failed: {exc}", RuntimeWarning, stacklevel=4
                )


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


# ----- one iteration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Problem:
    """What every iteration reads and never changes."""

    spec: ConvNetSpec
    experts: Trajectories
    config: DistillConfig
    augment: DSAConfig | None
    batch_syn: int
    device: torch.device
    # The run's static steps (EngineOptions.graphs "on"): each captured once per run, replayed after.
    step_graphs: StepGraphs | None = None
    distributed: Distributed = SINGLE  # the ranks that share each unroll's work


@dataclass(frozen=True)
class _Segment:
    """One expert segment matched at an iteration: the expert, its start epoch, and the keys that seed its
    draws (``(it,)`` for the first segment: with ``segments=1`` every draw is DATM's single segment's)."""

    expert: int
    start_epoch: int
    keys: tuple[int, ...]


def _segments(config: DistillConfig, it: int, num_experts: int) -> list[_Segment]:
    """The ``config.matching.segments`` segments of iteration ``it``: consecutive experts of the shuffled
    order (the k-th of iteration ``it`` is the one ``it * segments + k`` of :func:`expert_for_iteration`),
    start epochs drawn each from their own generator."""
    seed, count = config.run.seed, config.matching.segments
    out = []
    for k in range(count):
        keys = (it,) if k == 0 else (it, k)
        expert = expert_for_iteration(seed, it * count + k, num_experts)
        out.append(_Segment(expert, sample_start_epoch(config, it, _generator(seed, "start-epoch", *keys)), keys))
    return out


def _segment_loss(problem: _Problem, state: _State, segment: _Segment, sharing: Distributed | None) -> Tensor:
    """The matching loss of one segment (``sharing``: the ranks that share its unroll, or None: this rank)."""
    config, device, seed = problem.config, problem.device, problem.config.run.seed
    start = problem.experts.params(segment.expert, segment.start_epoch).to(device)
    target = problem.experts.params(segment.expert, segment.start_epoch + config.matching.expert_epochs).to(device)
    # The plan is what trajectory_matching_loss would draw from these generators; drawn here to check that
    # every rank sharing the unroll has drawn the same (generators seeded alike: the agreed seed, the keys).
    plan = make_unroll_plan(
        state.images.shape[0],
        config.matching.syn_steps,
        problem.batch_syn,
        image_size=problem.spec.image_size,
        augment=problem.augment,
        generator=_generator(seed, "unroll", *segment.keys, device=device),
        host_generator=_generator(seed, "unroll-host", *segment.keys),
        device=state.images.device,
    )
    if sharing is not None and sharing.active:
        sharing.agree(f"the unroll plan of iteration {segment.keys}", _plan_digest(plan))
    return trajectory_matching_loss(
        problem.spec,
        start,
        target,
        state.images,
        state.labels,
        state.lr,
        plan=plan,
        options=config.engine,
        step_graphs=problem.step_graphs,
        distributed=sharing,
    )


def _match(problem: _Problem, state: _State, it: int) -> dict[str, Any]:
    """Iteration ``it``: match the iteration's expert segments, update the set when the loss allows; the
    metrics row.

    One segment (DATM): its loss and gradient, every rank sharing its unroll. Several: the mean of their
    losses; on several ranks the segments are dealt out (rank r matches segments r, r + N, ...; each
    unroll on its rank alone) and the gradients and losses summed in one all-reduce.
    """
    config, device, ranks = problem.config, problem.device, problem.distributed
    t0 = time.perf_counter()
    segments = _segments(config, it, problem.experts.num_experts)
    dealt = len(segments) > 1 and ranks.active
    mine = ranks.mine(range(len(segments))) if dealt else range(len(segments))
    optimisers = (state.opt_images, state.opt_lr, state.opt_labels)
    for opt in optimisers:
        opt.zero_grad(set_to_none=True)
    learned = (state.images, state.labels, state.lr)
    total = 0.0  # of the losses: non-finite if any is
    for k in mine:
        loss = _segment_loss(problem, state, segments[k], None if dealt else ranks)
        value = float(loss.detach())
        total += value
        if math.isfinite(value):  # else the update is skipped: no gradient needed
            with precision_scope(config.engine.precision):  # the full engine's backward runs here
                (loss if len(segments) == 1 else loss / len(segments)).backward()
        del loss
    if dealt:
        for p in learned:  # a rank may have no segment, or only non-finite ones
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ranks.all_reduce_sum_each([p.grad for p in learned])
        total = float(ranks.all_reduce_sum(torch.tensor([total], dtype=torch.float64, device=device)))
    loss_value = total / len(segments)
    finite = math.isfinite(loss_value) and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in learned)
    if not finite:
        where = ", ".join(f"expert {s.expert}, start epoch {s.start_epoch}" for s in segments)
        warnings.warn(
            f"distill: iteration {it}: non-finite loss or gradient (loss {loss_value}, {where}); update skipped, "
            "the set is unchanged",
            RuntimeWarning,
            stacklevel=4,
        )
    skipped = not finite or loss_value > config.matching.threshold
    if not finite:
        state.updates.nonfinite += 1
    elif skipped:
        state.updates.over_threshold += 1
    else:
        state.opt_labels.step()
        state.opt_images.step()
        state.opt_lr.step()
        state.updates.applied += 1
    row = {
        "loss": loss_value,
        "start_epoch": segments[0].start_epoch,
        "expert": segments[0].expert,
        "lr": float(state.lr.detach()),
        "skipped": skipped,
        "nonfinite": not finite,
        "seconds": time.perf_counter() - t0,
        "peak_memory_gb": _peak_memory_gb(device),
    }
    if len(segments) > 1:
        row["segments"] = [[s.expert, s.start_epoch] for s in segments]
    return row


def _plan_digest(plan: UnrollPlan) -> str:
    """A short digest of every draw of a plan: minibatch indices, DSA op groups and per-sample values."""
    tensors = [step.indices for step in plan.steps]
    for step in plan.steps:
        if step.augment is not None:
            tensors += [t for _, t in sorted(step.augment.tensors().items())]
    groups = [step.augment.groups for step in plan.steps if step.augment is not None]
    return tensor_digest(*tensors, extra=repr(groups))


# ----- what the ranks agree on -------------------------------------------------------------------------
def _experts_identity(experts: Trajectories) -> Any:
    """The buffer's manifest identity and its experts' file checksums (an ExpertBuffer with a manifest),
    else a hash of the first and last checkpoints of its first and last experts."""
    manifest = getattr(experts, "manifest", None)
    ids = getattr(experts, "expert_ids", None)
    if isinstance(manifest, dict) and "identity" in manifest and ids is not None:
        files = manifest.get("experts", {})
        return manifest["identity"], tuple((i, files.get(str(i), {}).get("sha256")) for i in ids)
    n, epochs = experts.num_experts, experts.num_epochs
    rows = [experts.params(e, epoch) for e in sorted({0, n - 1}) for epoch in (0, epochs)]
    return n, epochs, tensor_digest(*rows)


# ----- the loop ----------------------------------------------------------------------------------------
def distill(
    data: ImageDataset,
    experts: Trajectories,
    config: DistillConfig,
    *,
    data_spec: DataSpec | None = None,
    transform: Transform | None = None,
    evaluator: Evaluator | None = None,
    run_dir: str | Path | RunDir | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_iterations: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    loggers: str | Sequence[str] | Sequence[MetricsLogger] = (),
    distributed: Distributed = SINGLE,
) -> DistilledSet:
    """Distil ``data`` into ``config.ipc`` images per class by matching ``experts``' trajectories.

    Args:
        data: the real dataset in the experts' training space (ZCA-whitened when ``config.zca``).
        experts: an expert buffer (``datm_fast.experts.ExpertBuffer`` or any :class:`Trajectories`).
        config: the DATM configuration (:func:`datm_fast.distill.config.load_config`).
        data_spec: how ``data`` was made (``data, transform = data_spec.load()``): recorded in the run
            directory's ``run.json``, so that ``datm-fast eval`` and ``report`` rebuild the same space.
        transform: the preprocessing of ``data``, to draw image grids in pixel space.
        evaluator: called as ``evaluator(images, labels, lr, seed)`` at the evaluation iterations;
            the best mean accuracy's set is kept. Without one, the last set is "best".
        run_dir: where checkpoints, sets, grids and ``metrics.jsonl`` go (``config.out_dir`` if None;
            nothing is written when both are None). See :class:`~datm_fast.distill.rundir.RunDir`: a
            directory holding another run is refused unless ``resume`` or ``overwrite``, and so is one
            another process writes. A :class:`RunDir` the caller has started is used as it is.
        resume: continue from the run directory's checkpoint; the result equals an uninterrupted run.
            Refused when ``config`` computes something else than the run's (placement keys may change).
        overwrite: delete what the run directory holds and start again.
        progress: show a progress bar.
        max_iterations: stop after this many iterations of this call (a budget; for tests and demos).
        callback: called with each metrics row.
        loggers: experiment trackers that get each metrics row with ``step = iteration``, and the image
            grids: names (``"tensorboard"``, ``"wandb"``, or ``"tensorboard,wandb"``; see
            :func:`datm_fast.distill.loggers.make_loggers`) or ready :class:`MetricsLogger` objects.
            All are closed when the call ends, normally or not.
        distributed: the ranks of the run (:func:`datm_fast.distributed.from_environment`); every rank calls
            ``distill`` with the same arguments and shares each unroll's work (engines ``exact`` and
            ``tesla``; ``full`` is refused). Rank 0 alone takes and writes the run directory, calls the
            evaluator (its outcome is handed to the others: the others' evaluator is never called and may
            be None), the loggers and the callback, and shows the progress bar; the other ranks write
            nothing. Every rank returns the same set. On CUDA each rank runs on ``cuda:<local_rank>``.

    Returns:
        :class:`DistilledSet` with the best images, labels and lr.

    Raises:
        DistillationFailed: the set or lr left the sane range (``SANE_MAX_*``; the run directory keeps
            the last checkpoint before), or the run ended without one update applied.
        RanksDisagree: the ranks were given different configs, data or expert buffers (on every rank,
            before any work).
        OtherRankFailed: on the other ranks, when what rank 0 alone does failed there.
    """
    m = config.matching
    if distributed.active:  # before anything that could fail on some ranks only because of them
        distributed.agree("the config", config.to_dict())
        # Its content and derivations (ImageDataset.identity): copies at other paths agree.
        distributed.agree("the dataset", (data.name, data.identity()))
    experts = _selected(experts, m.max_files, m.max_experts)  # the same on every rank, given the same config
    if distributed.active:
        distributed.agree("the expert buffer", _experts_identity(experts))
    if isinstance(loggers, str):
        loggers = [loggers]
    where = run_dir if run_dir is not None else config.run.out_dir
    run = where if isinstance(where, RunDir) else (RunDir(where) if where is not None else None)

    def check() -> tuple[torch.device, ConvNetSpec, int, list[str]]:
        # No collective in here: a rank that raises skips what follows its error.
        device = distributed.device(resolve_device(config.run.device))  # one GPU per rank
        spec = convnet_spec_from_name(m.model, data.channels, data.num_classes, data.image_size)
        validate_against(
            config,
            buffer_epochs=experts.num_epochs,
            class_sizes=data.class_counts("train").tolist(),
            class_names=data.classes,
        )
        if not 0 < config.learning.lr_teacher <= SANE_MAX_LR:  # the first update would stop the run
            raise ValueError(
                f"lr_teacher={config.learning.lr_teacher:g} is outside the sane range of the learned lr, "
                f"(0, {SANE_MAX_LR:g}]: lower it (upstream's configs use 0.01)"
            )
        if distributed.active and config.engine.unroll == "full":
            raise ValueError(
                f"unroll full cannot share its work over {distributed.world_size} ranks (one autograd graph through "
                "the whole unroll): use unroll exact (the same gradient), or one rank"
            )
        batch_syn = m.batch_syn or config.learning.ipc * data.num_classes
        _check_fits(spec, batch_syn, config, device)  # by each rank's own device
        names = check_logger_names([lg for lg in loggers if isinstance(lg, str)])
        if "tensorboard" in names and run is None:
            raise ValueError("distill: tensorboard logging needs a run directory (run_dir or config.out_dir)")
        if run is None and resume:
            raise ValueError("distill: resume needs a run directory (run_dir or config.out_dir)")
        return device, spec, batch_syn, names

    device, spec, batch_syn, logger_names = on_every_rank(distributed, "checking the run's inputs", check)

    def take() -> RunDir | None:
        if run is None or not run.started:  # else the caller holds the directory and answers for it
            return run.start(config, resume=resume, overwrite=overwrite) if run is not None else None
        if resume:
            run.check_resumable(config)
        return None

    # Rank 0 alone takes the directory (lock, refusals) and writes it; the others write nothing.
    owned = on_main(distributed, "take the run directory", take, share=False)
    writer = run if distributed.is_main else None
    try:
        return _distill(
            data,
            experts,
            config,
            _Problem(
                spec,
                experts,
                config,
                _augment(config),
                batch_syn,
                device,
                StepGraphs() if config.engine.graphs == "on" else None,
                distributed,
            ),
            writer,
            data_spec=data_spec,
            transform=transform,
            evaluator=evaluator,
            resume=resume,
            progress=progress and distributed.is_main,
            max_iterations=max_iterations,
            callback=callback if distributed.is_main else None,
            loggers=[lg for lg in loggers if not isinstance(lg, str)] if distributed.is_main else [],
            logger_names=logger_names if distributed.is_main else [],
            run_path=run.path if run is not None else None,
        )
    except DistillationFailed as exc:
        if writer is not None:
            writer.record_failure(f"{exc}")
        raise
    finally:
        if owned is not None:
            owned.finish()


def _augment(config: DistillConfig) -> DSAConfig | None:
    m = config.matching
    return DSAConfig(strategy=m.dsa_strategy) if m.dsa and not m.no_aug else None


def _check_fits(spec: ConvNetSpec, batch_syn: int, config: DistillConfig, device: torch.device) -> None:
    """Refuse, before any work, an unroll that cannot fit in the device's memory at all (by
    :func:`least_unroll_bytes`, a lower bound): ``syn_steps=100000000`` otherwise grows the memory
    for minutes before it fails."""
    m, unroll = config.matching, config.engine.unroll
    need = least_unroll_bytes(spec, batch_syn, m.syn_steps, unroll, torch.float32)
    available = available_memory_bytes(device)
    if available is not None and need > available:
        raise ValueError(
            f"syn_steps={m.syn_steps} at batch_syn {batch_syn}: one unroll of the {unroll} engine holds at least "
            f"{need / 1e9:,.1f} GB (every step's {spec.num_params} parameters), more than the "
            f"{available / 1e9:,.1f} GB this {device.type} has available; lower syn_steps"
        )


def _distill(
    data: ImageDataset,
    experts: Trajectories,
    config: DistillConfig,
    problem: _Problem,
    run: RunDir | None,
    *,
    data_spec: DataSpec | None,
    transform: Transform | None,
    evaluator: Evaluator | None,
    resume: bool,
    progress: bool,
    max_iterations: int | None,
    callback: Callable[[dict[str, Any]], None] | None,
    loggers: list[MetricsLogger],
    logger_names: list[str],
    run_path: Path | None,
) -> DistilledSet:
    """:func:`distill` once its inputs are checked and its run directory is held (by rank 0: ``run`` is
    None on the other ranks, ``run_path`` the directory's path on every rank)."""
    device, learning, ranks = problem.device, config.learning, problem.distributed

    def prepare() -> tuple[dict[str, Any] | None, SyntheticSet | None, bool]:
        # A damaged checkpoint is refused before anything in the directory is written.
        saved = run.load_checkpoint() if resume and run is not None else None
        if run is not None:
            run.write_config(config)
            run.write_record(RunRecord(data_spec, config.matching.model, learning.ipc))
            run.clear_failure()
        # The best set so far lives in the run directory.
        kept = run.load_set("best") if saved is not None and run is not None and saved["best_iteration"] >= 0 else None
        return saved, kept, evaluator is not None

    # Rank 0 reads the checkpoint (it holds no per-rank state) and hands it to every rank; whether the run
    # evaluates is rank 0's to say too (it alone evaluates).
    prepared = on_main(ranks, "read and start the run directory", prepare)
    assert prepared is not None
    saved, kept, evaluates = prepared

    images, labels = initialize_synthetic_set(data, experts, config, problem.spec, device=device)
    if ranks.active and saved is None:
        # Rank 0's initial set on every rank: the ranks start from the same bits whatever their kernels do.
        shared = ranks.broadcast_object((images.cpu(), labels.cpu()))
        images, labels = shared[0].to(device), shared[1].to(device)
    images = images.detach().clone().requires_grad_(True)
    labels = labels.detach().clone().requires_grad_(True)
    lr = torch.tensor(float(learning.lr_teacher), device=device).requires_grad_(True)
    state = _State(
        images=images,
        labels=labels,
        lr=lr,
        opt_images=torch.optim.SGD([images], lr=learning.lr_img, momentum=0.5),
        opt_lr=torch.optim.SGD([lr], lr=learning.lr_lr, momentum=0.5),
        opt_labels=torch.optim.SGD([labels], lr=learning.lr_y, momentum=learning.momentum_y),
        iteration=0,
        best_accuracy=None,
        best_iteration=None,
    )
    best = (*state.snapshot(), state.iteration)
    if saved is not None:
        assert run_path is not None
        state.restore(saved, config.run.seed, run_path / RunDir.CHECKPOINT)
        next_iteration = state.iteration
        on_main(
            ranks,
            "truncate the metrics",
            lambda: run.truncate_metrics(next_iteration) if run is not None else None,
            share=False,
        )
        if state.best_iteration is not None:
            assert kept is not None
            best = (kept.images.to(device), kept.labels.to(device), float(kept.lr), state.best_iteration)

    eval_its = set(eval_iterations(config)) if evaluates else set()
    last = config.schedule.iterations
    stop = last + 1 if max_iterations is None else min(last + 1, state.iteration + max_iterations)
    history: list[dict[str, Any]] = []
    loggers = loggers + make_loggers(
        logger_names, run.path if run else None, config, resume_from=state.iteration if resume else None
    )
    outputs = _Outputs(run, loggers, callback, transform, config, ranks)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=last + 1, initial=state.iteration, desc=f"distill {data.name} ipc {learning.ipc}", unit="it")
    try:
        for it in range(state.iteration, stop):
            row: dict[str, Any] = {"iteration": it}
            if it in eval_its:
                evaluate = functools.partial(_evaluate, evaluator, state, derived_seed(config.run.seed, "eval", it))
                outcome = on_main(ranks, f"evaluate the set of iteration {it}", evaluate)
                assert outcome is not None
                row.update(eval_mean=outcome.mean, eval_std=outcome.std)
                row.update({f"eval_mean_{name}": mean for name, mean in outcome.other_models})
                if state.best_accuracy is None or outcome.mean > state.best_accuracy:
                    state.best_accuracy, state.best_iteration = outcome.mean, it
                    best = (*state.snapshot(), it)
                    outputs.best(*best)
            row.update(_match(problem, state, it))
            history.append(row)
            outputs.row(row)
            diverged = None if row["skipped"] else state.divergence()
            if diverged is not None:  # stopped before a checkpoint could keep the diverged set
                kept_note = "; the run directory keeps the last checkpoint before it" if run_path is not None else ""
                raise DistillationFailed(
                    f"iteration {it}: {diverged}: the run diverged and is stopped (lower lr_img, lr_lr or lr_y, or "
                    f"the threshold){kept_note}"
                )
            state.iteration = it + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", start=row["start_epoch"], lr=f"{row['lr']:.2e}")
            every = config.schedule.checkpoint_every
            if every and state.iteration % every == 0:
                outputs.checkpoint(state, it, config.run.seed)

        if state.best_accuracy is None:  # no evaluation: the last set is the result
            best = (*state.snapshot(), state.iteration - 1)
            outputs.best(*best)
    finally:
        if bar is not None:
            bar.close()
        outputs.close()
    outputs.final_checkpoint(state, config.run.seed)
    if state.iteration > last and state.updates.applied == 0:
        losses = [r["loss"] for r in history if math.isfinite(r["loss"])]
        smallest = f" (the smallest loss of this call {min(losses):.3g})" if losses else ""
        raise DistillationFailed(
            f"the run ended without one update: {state.updates}{smallest}, threshold {config.matching.threshold:g}; "
            "the set is its initialisation (lower lr_teacher, or raise threshold)"
        )
    return DistilledSet(
        images=best[0].cpu(),
        labels=best[1].cpu(),
        lr=best[2],
        iteration=best[3],
        best_accuracy=state.best_accuracy,
        run_dir=run_path,
        history=history,
        updates=state.updates,
    )


def _evaluate(evaluator: Evaluator | None, state: _State, seed: int) -> EvalOutcome:
    """The evaluator's outcome for the current set (on rank 0, whose word decides that the run evaluates)."""
    assert evaluator is not None
    return evaluator(*state.snapshot(), seed)


def _selected(experts: Trajectories, max_files: int | None, max_experts: int | None) -> Trajectories:
    """The experts the config's ``max_files`` / ``max_experts`` keep (a buffer view), or all of them."""
    if max_files is None and max_experts is None:
        return experts
    select = getattr(experts, "select", None)
    if select is None:
        raise ValueError(
            f"max_files / max_experts need an expert buffer that can select files (ExpertBuffer), got "
            f"{type(experts).__name__}"
        )
    return select(max_files=max_files, max_experts=max_experts)
