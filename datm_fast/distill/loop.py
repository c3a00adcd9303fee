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
"""

from __future__ import annotations

import json
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
from ..data import ImageDataset
from ..data.transforms import Transform
from ..models import ConvNetSpec, convnet_forward, convnet_spec_from_name
from ..utils import atomic_write, peak_rss_bytes, resolve_device
from ..viz import save_image_grid
from .config import DistillConfig, eval_iterations, sample_start_epoch, validate_against
from .loggers import MetricsLogger, check_logger_names, make_loggers
from .unroll import trajectory_matching_loss

__all__ = [
    "Trajectories",
    "EvalOutcome",
    "DistilledSet",
    "derived_seed",
    "initialize_synthetic_set",
    "distill",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


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
    """What an evaluator returns: test accuracy (fraction) of each freshly trained network."""

    accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


# images, labels, lr, seed -> outcome. Called every eval_it iterations.
Evaluator = Callable[[Tensor, Tensor, float, int], EvalOutcome]


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
    epoch = config.label_model_timestamp if config.label_model_timestamp >= 0 else experts.num_epochs
    if epoch > experts.num_epochs:
        raise ValueError(
            f"label_model_timestamp {config.label_model_timestamp} is beyond the buffer's {experts.num_epochs} epochs"
        )
    selector = experts.params(0, epoch).to(device)
    gen = _generator(config.seed, "init")
    images, labels = [], []
    for c in range(k):
        pool = torch.nonzero(data.train_labels == c).flatten()
        pool = pool[torch.randperm(len(pool), generator=gen)]
        if config.pix_init == "noise":
            x = torch.randn(config.ipc, *data.train_images.shape[1:], generator=gen)
            images.append(x)
            labels.append(torch.nn.functional.one_hot(torch.full((config.ipc,), c), k).float() * 10.0)
            continue
        if config.pix_init == "real":
            chosen = pool[: config.ipc]
        else:
            chosen_list: list[Tensor] = []
            found = 0
            for start in range(0, len(pool), 256):  # upstream scans in batches of 256
                idx = pool[start : start + 256]
                pred = _logits(spec, selector, data.train_images[idx].to(device)).argmax(1).cpu()
                good = idx[pred == c][: config.ipc - found]
                chosen_list.append(good)
                found += len(good)
                if found == config.ipc:
                    break
            if found < config.ipc:
                raise ValueError(
                    f"pix_init samples_predicted_correctly: expert 0 (epoch {epoch}) classifies only {found} "
                    f"images of class {c} ({data.classes[c]!r}) correctly, fewer than ipc={config.ipc}; "
                    "use pix_init real, or a better-trained buffer"
                )
            chosen = torch.cat(chosen_list)
        images.append(data.train_images[chosen])
    images_t = torch.cat(images).to(device)
    if config.pix_init == "noise":
        return images_t, torch.cat(labels).to(device)
    class_of = torch.arange(k).repeat_interleave(config.ipc).to(device)
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


# ----- run directory -----------------------------------------------------------------------------------
def _save_tensor(path: Path, tensor: Tensor | float) -> None:
    value = tensor.detach().cpu() if isinstance(tensor, Tensor) else torch.tensor(float(tensor))
    with atomic_write(path) as f:
        torch.save(value, f)


def _save_set(run_dir: Path, tag: str, images: Tensor, labels: Tensor, lr: float) -> None:
    """Upstream's file names and layouts: images_<tag>.pt (M,C,H,W), labels_<tag>.pt (M,K), lr_<tag>.pt ()."""
    _save_tensor(run_dir / f"images_{tag}.pt", images)
    _save_tensor(run_dir / f"labels_{tag}.pt", labels)
    _save_tensor(run_dir / f"lr_{tag}.pt", lr)


def _save_grid(path: Path, images: Tensor, transform: Transform | None, ipc: int) -> None:
    """The set as pictures: one row per class (at most 10 images per row), whitening undone."""
    x = images.detach().cpu()
    if transform is not None:
        x = transform.inverse(x)
    per_row = min(ipc, 10)
    k = len(x) // ipc
    shown = torch.cat([x[c * ipc : c * ipc + per_row] for c in range(min(k, 100))])
    # Thumbnails of at least 64 px: 8 px digits x8, 32 px CIFAR x2, 64 px Tiny ImageNet as they are.
    save_image_grid(shown, path, nrow=per_row, scale=max(1, 64 // x.shape[-1]))


def _log_grid(loggers: Sequence[MetricsLogger], tag: str, path: Path, step: int) -> None:
    """Send the grid just saved at ``path`` to the loggers that take images."""
    targets = [lg for lg in loggers if callable(getattr(lg, "log_images", None))]
    if not targets:
        return
    with Image.open(path) as picture:
        grid = np.asarray(picture.convert("RGB"))
    for logger in targets:
        logger.log_images(tag, grid, max(step, 0))  # type: ignore[attr-defined]


def _close_loggers(loggers: Sequence[MetricsLogger]) -> None:
    for logger in loggers:
        try:
            logger.close()
        except Exception as exc:  # one failing tracker must not hide the run's outcome
            warnings.warn(
                f"distill: closing logger {type(logger).__name__} failed: {exc}", RuntimeWarning, stacklevel=3
            )


@dataclass
class _State:
    images: Tensor
    labels: Tensor
    lr: Tensor
    opt_images: torch.optim.Optimizer
    opt_lr: torch.optim.Optimizer
    opt_labels: torch.optim.Optimizer
    iteration: int  # next iteration to run
    best_accuracy: float | None
    best_iteration: int | None


def _checkpoint(run_dir: Path, state: _State, config: DistillConfig) -> None:
    payload = {
        "format": "datm_fast.distill.checkpoint/1",
        "next_iteration": state.iteration,
        "images": state.images.detach().cpu(),
        "labels": state.labels.detach().cpu(),
        "lr": state.lr.detach().cpu(),
        "opt_images": state.opt_images.state_dict(),
        "opt_lr": state.opt_lr.state_dict(),
        "opt_labels": state.opt_labels.state_dict(),
        "best_accuracy": -1.0 if state.best_accuracy is None else state.best_accuracy,
        "best_iteration": -1 if state.best_iteration is None else state.best_iteration,
        # Every random draw is derived from (seed, iteration), so no generator state is needed to
        # resume; the seed is kept to refuse a resume under another one.
        "seed": config.seed,
    }
    with atomic_write(run_dir / CHECKPOINT_NAME) as f:
        torch.save(payload, f)


def _load_checkpoint(run_dir: Path, state: _State, config: DistillConfig, device: torch.device) -> None:
    path = run_dir / CHECKPOINT_NAME
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which
        raise ValueError(f"{path}: not a readable datm_fast checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != "datm_fast.distill.checkpoint/1":
        raise ValueError(f"{path}: not a datm_fast distillation checkpoint")
    if payload["seed"] != config.seed:
        raise ValueError(f"{path}: written with seed {payload['seed']}, resuming with seed {config.seed}")
    if payload["images"].shape != state.images.shape or payload["labels"].shape != state.labels.shape:
        raise ValueError(
            f"{path}: holds a set of shape {tuple(payload['images'].shape)}, this config makes "
            f"{tuple(state.images.shape)}"
        )
    with torch.no_grad():
        state.images.copy_(payload["images"].to(device))
        state.labels.copy_(payload["labels"].to(device))
        state.lr.copy_(payload["lr"].to(device))
    state.opt_images.load_state_dict(payload["opt_images"])
    state.opt_lr.load_state_dict(payload["opt_lr"])
    state.opt_labels.load_state_dict(payload["opt_labels"])
    state.iteration = int(payload["next_iteration"])
    state.best_accuracy = None if payload["best_accuracy"] < 0 else float(payload["best_accuracy"])
    state.best_iteration = None if payload["best_iteration"] < 0 else int(payload["best_iteration"])


def _truncate_metrics(path: Path, next_iteration: int) -> None:
    """Drop rows a killed run logged after its last checkpoint: they will be computed again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a half-written last line of a killed run
            continue
        if row.get("iteration", -1) < next_iteration:
            keep.append(line)
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


# ----- the loop ----------------------------------------------------------------------------------------
def distill(
    data: ImageDataset,
    experts: Trajectories,
    config: DistillConfig,
    *,
    transform: Transform | None = None,
    evaluator: Evaluator | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    max_iterations: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    loggers: str | Sequence[str] | Sequence[MetricsLogger] = (),
) -> DistilledSet:
    """Distil ``data`` into ``config.ipc`` images per class by matching ``experts``' trajectories.

    Args:
        data: the real dataset in the experts' training space (ZCA-whitened when ``config.zca``).
        experts: an expert buffer (``datm_fast.experts.ExpertBuffer`` or any :class:`Trajectories`).
        config: the DATM configuration (:func:`datm_fast.distill.config.load_config`).
        transform: the preprocessing of ``data``, to draw image grids in pixel space.
        evaluator: called as ``evaluator(images, labels, lr, seed)`` at the evaluation iterations;
            the best mean accuracy's set is kept. Without one, the last set is "best".
        run_dir: where checkpoints, sets, grids and ``metrics.jsonl`` go (``config.out_dir`` if None;
            nothing is written when both are None).
        resume: continue from ``run_dir/checkpoint.pt``; the result equals an uninterrupted run.
        progress: show a progress bar.
        max_iterations: stop after this many iterations of this call (a budget; for tests and demos).
        callback: called with each metrics row.
        loggers: experiment trackers that get each metrics row with ``step = iteration``, and the image
            grids: names (``"tensorboard"``, ``"wandb"``, or ``"tensorboard,wandb"``; see
            :func:`datm_fast.distill.loggers.make_loggers`) or ready :class:`MetricsLogger` objects.
            All are closed when the call ends, normally or not.

    Returns:
        :class:`DistilledSet` with the best images, labels and lr.
    """
    device = resolve_device(config.device)
    spec = convnet_spec_from_name(config.model, data.channels, data.num_classes, data.image_size)
    validate_against(
        config,
        buffer_epochs=experts.num_epochs,
        class_sizes=data.class_counts("train").tolist(),
        class_names=data.classes,
    )
    run_path = Path(run_dir) if run_dir is not None else (Path(config.out_dir) if config.out_dir else None)
    if isinstance(loggers, str):
        loggers = [loggers]
    logger_names = check_logger_names([lg for lg in loggers if isinstance(lg, str)])
    if "tensorboard" in logger_names and run_path is None:
        raise ValueError("distill: tensorboard logging needs a run directory (run_dir or config.out_dir)")
    if resume and (run_path is None or not (run_path / CHECKPOINT_NAME).exists()):
        raise ValueError(f"resume: no {CHECKPOINT_NAME} in {run_path}")
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_path / "config.yaml")

    images, labels = initialize_synthetic_set(data, experts, config, spec, device=device)
    images = images.detach().clone().requires_grad_(True)
    labels = labels.detach().clone().requires_grad_(True)
    lr = torch.tensor(float(config.lr_teacher), device=device).requires_grad_(True)
    state = _State(
        images=images,
        labels=labels,
        lr=lr,
        opt_images=torch.optim.SGD([images], lr=config.lr_img, momentum=0.5),
        opt_lr=torch.optim.SGD([lr], lr=config.lr_lr, momentum=0.5),
        opt_labels=torch.optim.SGD([labels], lr=config.lr_y, momentum=config.momentum_y),
        iteration=0,
        best_accuracy=None,
        best_iteration=None,
    )
    best = (images.detach().clone(), labels.detach().clone(), float(lr.detach()), state.iteration)
    if resume:
        assert run_path is not None
        _load_checkpoint(run_path, state, config, device)
        _truncate_metrics(run_path / METRICS_NAME, state.iteration)
        if state.best_iteration is not None:  # the best set so far lives in the run directory
            best = (
                *(torch.load(run_path / f"{n}_best.pt", weights_only=True).to(device) for n in ("images", "labels")),
                float(torch.load(run_path / "lr_best.pt", weights_only=True)),
                state.best_iteration,
            )

    augment = DSAConfig(strategy=config.dsa_strategy) if config.dsa and not config.no_aug else None
    batch_syn = config.batch_syn or len(images)
    eval_its = set(eval_iterations(config)) if evaluator is not None else set()
    last = config.iterations
    stop = last + 1 if max_iterations is None else min(last + 1, state.iteration + max_iterations)
    history: list[dict[str, Any]] = []
    active: list[MetricsLogger] = [lg for lg in loggers if not isinstance(lg, str)]
    active += make_loggers(logger_names, run_path, config, resume_from=state.iteration if resume else None)
    metrics_file = (run_path / METRICS_NAME).open("a") if run_path is not None else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=last + 1, initial=state.iteration, desc=f"distill {data.name} ipc {config.ipc}", unit="it")
    try:
        for it in range(state.iteration, stop):
            row: dict[str, Any] = {"iteration": it}
            if it in eval_its:
                outcome = evaluator(
                    images.detach().clone(),
                    labels.detach().clone(),
                    float(lr.detach()),
                    derived_seed(config.seed, "eval", it),
                )
                row.update(eval_mean=outcome.mean, eval_std=outcome.std)
                if state.best_accuracy is None or outcome.mean > state.best_accuracy:
                    state.best_accuracy, state.best_iteration = outcome.mean, it
                    best = (images.detach().clone(), labels.detach().clone(), float(lr.detach()), it)
                    if run_path is not None:
                        _save_set(run_path, "best", *best[:3])
                        _save_grid(run_path / "images_best.png", best[0], transform, config.ipc)
                        _log_grid(active, "images_best", run_path / "images_best.png", it)

            t0 = time.perf_counter()
            expert = expert_for_iteration(config.seed, it, experts.num_experts)
            start_epoch = sample_start_epoch(config, it, _generator(config.seed, "start-epoch", it))
            start = experts.params(expert, start_epoch).to(device)
            target = experts.params(expert, start_epoch + config.expert_epochs).to(device)
            loss = trajectory_matching_loss(
                spec,
                start,
                target,
                images,
                labels,
                lr,
                syn_steps=config.syn_steps,
                batch_syn=batch_syn,
                augment=augment,
                generator=_generator(config.seed, "unroll", it, device=device),
                host_generator=_generator(config.seed, "unroll-host", it),
                unroll=config.unroll,
                micro_batch=config.micro_batch,
                memory_budget=config.memory_budget_bytes,
                backend=config.backend,
            )
            for opt in (state.opt_images, state.opt_lr, state.opt_labels):
                opt.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            finite = math.isfinite(loss_value)
            if finite:
                loss.backward()
                finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in (images, labels, lr))
            del loss
            if not finite:
                warnings.warn(
                    f"distill: iteration {it}: non-finite loss or gradient (loss {loss_value}, expert {expert}, "
                    f"start epoch {start_epoch}); update skipped, the set is unchanged",
                    RuntimeWarning,
                    stacklevel=2,
                )
                skipped = True
            elif loss_value <= config.threshold:
                state.opt_labels.step()
                state.opt_images.step()
                state.opt_lr.step()
                skipped = False
            else:
                skipped = True
            seconds = time.perf_counter() - t0
            row.update(
                loss=loss_value,
                start_epoch=start_epoch,
                expert=expert,
                lr=float(lr.detach()),
                skipped=skipped,
                nonfinite=not finite,
                seconds=seconds,
                peak_memory_gb=_peak_memory_gb(device),
            )
            history.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            for logger in active:
                logger.log(row, it)
            if callback is not None:
                callback(row)
            state.iteration = it + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", start=start_epoch, lr=f"{float(lr.detach()):.2e}")
            if run_path is not None and config.checkpoint_every and state.iteration % config.checkpoint_every == 0:
                _save_set(run_path, str(it), images, labels, float(lr.detach()))
                _save_grid(run_path / "images_latest.png", images, transform, config.ipc)
                _log_grid(active, "images_latest", run_path / "images_latest.png", it)
                _checkpoint(run_path, state, config)

        if state.best_accuracy is None:  # no evaluation: the last set is the result
            best = (images.detach().clone(), labels.detach().clone(), float(lr.detach()), state.iteration - 1)
            if run_path is not None:
                _save_set(run_path, "best", *best[:3])
                _save_grid(run_path / "images_best.png", best[0], transform, config.ipc)
                _log_grid(active, "images_best", run_path / "images_best.png", best[3])
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        _close_loggers(active)
    if run_path is not None:
        _checkpoint(run_path, state, config)
    return DistilledSet(
        images=best[0].cpu(),
        labels=best[1].cpu(),
        lr=best[2],
        iteration=best[3],
        best_accuracy=state.best_accuracy,
        run_dir=run_path,
        history=history,
    )
