"""``evaluate_synset``: train fresh networks on a (distilled) set and test them, DATM's protocol."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..distributed import SINGLE, Distributed
from ..models import network_names
from ._engine import GroupResult, TrainSet, make_run_rngs, train_and_test
from .config import EvalConfig, EvalResult, resolve_models

__all__ = ["evaluate_synset", "evaluate_models", "check_lr", "check_models", "merge_runs", "DeviceLike"]

DeviceLike = Union[str, torch.device, None]


def check_lr(lr: object, what: str = "lr") -> float:
    """The lr as a positive finite float (a Python number or a one-element tensor); else ``ValueError``."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(lr.shape)}")
        lr = float(lr.detach().reshape(()).to("cpu", torch.float64))
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise ValueError(f"{what} must be a number or a one-element tensor, got {type(lr).__name__}")
    value = float(lr)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{what} must be positive and finite, got {value} (a learned lr that went negative or blew up?)"
        )
    return value


def check_models(models: Sequence[str]) -> tuple[str, ...]:
    """``models`` if every name is one :func:`datm_fast.models.get_network` builds, else ``ValueError``
    (checked before any training, so a typo in the last model of a pool fails at once)."""
    valid = network_names()
    for m in models:
        if m not in valid:
            close = difflib.get_close_matches(m, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown model {m!r}.{hint} Valid names: {', '.join(valid)}")
    return tuple(models)


def _check_images(images: object, what: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a non-empty floating (N, C, H, W) tensor, got {shape}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} contain NaN or infinite values")
    return images


def _check_hard(labels: Tensor, n: int, num_classes: int, what: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what} span [{int(labels.min())}, {int(labels.max())}], expected [0, {num_classes - 1}] "
            f"for {num_classes} classes"
        )


def resolve_num_classes(labels: Tensor, test_labels: Tensor, num_classes: int | None) -> int:
    """The class count: ``num_classes`` if given, else the width of logit labels, else ``max(label) + 1``."""
    if labels.dim() == 2 and labels.is_floating_point():
        k = int(labels.shape[1])
        if num_classes is not None and num_classes != k:
            raise ValueError(f"labels have {k} logits per image but num_classes={num_classes}")
        return k
    if num_classes is not None:
        return int(num_classes)
    tops = [int(t.max()) for t in (labels, test_labels) if t.numel() and not t.is_floating_point()]
    return max(tops) + 1 if tops else 1


def prepare_targets(labels: Tensor, n: int, num_classes: int, what: str = "labels") -> Tensor:
    """Check labels and turn them into training targets: int64 ``(n,)`` or softmax probabilities ``(n, K)``."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(labels).__name__}")
    if labels.is_floating_point() and labels.dim() == 2:
        if labels.shape[0] != n:
            raise ValueError(f"{what} have {labels.shape[0]} rows for {n} images; expected ({n}, {num_classes})")
        if not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{what} contain NaN or infinite logits")
        return F.softmax(labels.detach().float(), dim=1)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(
            f"{what} must be (N,) integer class indices or (N, C) float logits, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    _check_hard(labels, n, num_classes, what)
    return labels.detach().long()


def merge_runs(parts: Sequence[tuple[Sequence[int], Sequence[int], Sequence[float], float]], runs: int) -> GroupResult:
    """One :class:`GroupResult` in run order from every rank's ``(run indices, correct, losses, seconds)``.

    The wall time is the slowest rank's: the ranks train at the same time. Raises ``RuntimeError`` unless
    every run was computed by exactly one rank (a share that is not a partition is a bug, not bad input).
    """
    correct: list[int | None] = [None] * runs
    losses: list[float] = [math.nan] * runs
    for indices, cor, los, _ in parts:
        if not len(indices) == len(cor) == len(los):
            raise RuntimeError(f"a rank returned {len(cor)} results for {len(indices)} runs")
        for i, c, v in zip(indices, cor, los):
            if not 0 <= i < runs or correct[i] is not None:
                raise RuntimeError(f"run {i} of {runs} was computed by no rank or by several")
            correct[i], losses[i] = c, v
    missing = [i for i, c in enumerate(correct) if c is None]
    if missing:
        raise RuntimeError(f"runs {missing} of {runs} were computed by no rank")
    return GroupResult([int(c) for c in correct if c is not None], losses, max((p[3] for p in parts), default=0.0))


def evaluate_prepared(
    data: TrainSet,
    lr: float,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    config: EvalConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    name: str,
    progress: bool,
    distributed: Distributed = SINGLE,
) -> EvalResult:
    """Evaluate an already checked set on the device (the shared core of every public entry point).

    ``data`` holds every run's set (a per-run set may still be on the host: only this rank's share is
    moved to ``device``). With several ranks each trains ``distributed.mine(range(config.runs))`` and
    every rank returns the whole result, in run order.
    """
    if data.per_run and data.images.shape[0] != config.runs:
        raise ValueError(f"{data.images.shape[0]} per-run sets for {config.runs} runs")
    test_x = test_images.detach().to(device, torch.float32)
    test_y = test_labels.detach().to(device, torch.int64)
    # Every rank draws every run's seeds, in the one call a single process makes: run r gets the same
    # generators whichever rank trains it, and ``generator`` ends where one process leaves it (the next
    # model of a pool draws the same seeds too).
    rngs = make_run_rngs(generator, config.runs, device)
    mine = distributed.mine(range(config.runs))
    if len(mine) != config.runs:
        data = data.select_runs(mine)
    data = data.to(device)
    desc = f"eval {config.model}" + (f" ({name})" if name else "")
    with tqdm(
        total=len(mine) * config.num_passes,
        desc=desc + (f" [{distributed}]" if distributed.active else ""),
        unit="ep",
        disable=not progress or not distributed.is_main,  # one bar: the others would overwrite its line
        leave=False,
    ) as bar:
        if mine:
            out = train_and_test(
                config.model,
                num_classes,
                data,
                lr,
                test_x,
                test_y,
                config,
                [rngs[r] for r in mine],
                device,
                lambda k: bar.update(k),
            )
        else:  # more ranks than runs: this one only takes part in the gather
            out = GroupResult([], [], 0.0)
    if distributed.active:
        out = merge_runs(distributed.all_gather_object((mine, out.correct, out.losses, out.seconds)), config.runs)
    m = test_x.shape[0]
    return EvalResult(
        model=config.model,
        accuracies=tuple(c / m for c in out.correct),
        train_losses=tuple(out.losses),
        seconds=out.seconds,
        epochs=config.epochs,
        lr=lr,
        num_images=data.n,
        name=name,
    )


def evaluate_synset(
    images: Tensor,
    labels: Tensor,
    lr: Union[float, Tensor],
    test_images: Tensor,
    test_labels: Tensor,
    config: EvalConfig | None = None,
    *,
    generator: torch.Generator,
    device: DeviceLike = None,
    num_classes: int | None = None,
    name: str = "",
    progress: bool = True,
    distributed: Distributed = SINGLE,
) -> EvalResult:
    """Train ``config.runs`` fresh ``config.model`` networks on a set and test them (DATM's protocol).

    Args:
        images: ``(N, C, H, W)`` float, in the same preprocessing (ZCA, normalisation) as the test split.
        labels: ``(N,)`` integer class indices (cross-entropy) or ``(N, K)`` float logits (soft
            cross-entropy against ``softmax(labels)``), e.g. DATM's learned labels.
        lr: the training lr (the learned lr of a distilled set), a positive number or one-element tensor.
        test_images: ``(M, C, H, W)``, same ``(C, H, W)`` and preprocessing as ``images``.
        test_labels: ``(M,)`` integer.
        config: the protocol and how to run it (:class:`EvalConfig`).
        generator: seeds everything (initial parameters, batch order, DSA) through three draws per
            run; the same generator state gives the same result.
        device: where to train; default ``images.device``. The set and the test split are moved there
            once and stay.
        num_classes: default: ``K`` of logit labels, else the largest label + 1.
        name: free text stored in the result (what was evaluated).
        progress: show a tqdm bar (one tick per run-epoch; rank 0's share when there are several ranks).
        distributed: the ranks that share the runs out (:meth:`~datm_fast.distributed.Distributed.mine`,
            round robin); call on every rank with the same arguments. Each run draws what it draws in
            one process, so the accuracies are those of one process (to the bit on CPU, where each run
            is trained alone either way); every rank returns the whole result. Default: this process.

    Returns:
        :class:`EvalResult` with per-run test accuracies, their mean and std, final training losses and
        the wall time.

    Raises ``ValueError`` naming the bad argument: wrong shapes or dtypes, NaN images or labels,
    labels out of range, a non-positive lr.

    Example::

        res = evaluate_synset(images, labels, lr, ds.test_images, ds.test_labels,
                              EvalConfig(runs=5), generator=torch.Generator().manual_seed(0), device="cuda")
        print(res.format())     # ConvNet  66.80 ± 0.21 %  (5 runs)
    """
    config = config if config is not None else EvalConfig()
    check_models((config.model,))
    images = _check_images(images, "images")
    test_images = _check_images(test_images, "test_images")
    if tuple(images.shape[1:]) != tuple(test_images.shape[1:]):
        raise ValueError(
            f"images are {tuple(images.shape[1:])} per image but test_images are {tuple(test_images.shape[1:])}"
        )
    if not isinstance(test_labels, Tensor) or test_labels.is_floating_point():
        raise ValueError("test_labels must be an integer (M,) tensor")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    k = resolve_num_classes(labels, test_labels, num_classes)
    _check_hard(test_labels, test_images.shape[0], k, "test_labels")
    lr_value = check_lr(lr)
    dev = torch.device(device) if device is not None else images.device
    targets = prepare_targets(labels, images.shape[0], k)
    data = TrainSet(images.detach().to(dev, torch.float32).contiguous(), targets.to(dev))
    return evaluate_prepared(
        data,
        lr_value,
        test_images,
        test_labels,
        k,
        config,
        generator=generator,
        device=dev,
        name=name,
        progress=progress,
        distributed=distributed,
    )


def evaluate_models(
    images: Tensor,
    labels: Tensor,
    lr: Union[float, Tensor],
    test_images: Tensor,
    test_labels: Tensor,
    models: Union[str, Sequence[str]],
    config: EvalConfig | None = None,
    *,
    distributed: Distributed = SINGLE,
    **options: Any,
) -> list[EvalResult]:
    """:func:`evaluate_synset` for each model of a cross-architecture pool, in order.

    ``models`` is a pool name (``"M"``: ConvNet, AlexNet, VGG11, ResNet18; see
    :data:`~datm_fast.evaluate.EVAL_POOLS`), a comma-separated string or a list of names;
    ``config.model`` is replaced by each in turn. ``options`` are :func:`evaluate_synset`'s keywords
    (``generator`` required, ``distributed`` to share each model's runs out over ranks); the models
    draw their seeds from ``generator`` in turn.
    """
    config = config if config is not None else EvalConfig()
    names = check_models(resolve_models(models))
    return [
        evaluate_synset(
            images, labels, lr, test_images, test_labels, config.replace(model=m), distributed=distributed, **options
        )
        for m in names
    ]
