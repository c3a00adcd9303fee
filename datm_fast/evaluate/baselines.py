"""Baselines on the evaluation protocol: a random real subset of IPC images per class, and the whole
train split. Both use hard labels and upstream's baseline lr (``lr_teacher`` = 0.01)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from ..data import ImageDataset
from ..distill import EvalOutcome
from ..distributed import SINGLE, Distributed
from ._engine import TrainSet
from .config import EvalConfig, EvalResult
from .protocol import DeviceLike, check_lr, check_models, evaluate_prepared, evaluate_synset
from .results import write_results

__all__ = [
    "BASELINE_LR",
    "random_real_subset",
    "random_real_baseline",
    "whole_dataset_baseline",
    "evaluate_against_random_real",
    "evaluator_on_test_set",
]

BASELINE_LR = 0.01  # upstream baseline.py trains real data with lr_teacher = 0.01


def _check_dataset(dataset: object) -> ImageDataset:
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"dataset must be a datm_fast.data.ImageDataset, got {type(dataset).__name__}")
    return dataset


def random_real_subset(dataset: ImageDataset, ipc: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``ipc`` distinct train images of every class, drawn uniformly without replacement.

    Args:
        dataset: any :class:`~datm_fast.data.ImageDataset` (images in whatever space it is in).
        ipc: images per class.
        generator: the draw (one ``randperm`` per class, in class order); same state, same subset.

    Returns:
        ``images`` ``(num_classes * ipc, C, H, W)`` and ``labels`` ``(num_classes * ipc,)`` int64,
        grouped by class (class 0 first), on the dataset's device.

    Raises ``ValueError`` for ``ipc < 1`` or a class with fewer than ``ipc`` train images (named).
    """
    ds = _check_dataset(dataset)
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"random_real_subset: ipc must be an int >= 1, got {ipc!r}")
    labels = ds.train_labels
    picked: list[Tensor] = []
    for c in range(ds.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < ipc:
            raise ValueError(
                f"random_real_subset: class {c} ({ds.classes[c]!r}) of {ds.name!r} has {idx.numel()} train "
                f"images, fewer than ipc={ipc}"
            )
        order = torch.randperm(idx.numel(), generator=generator, device=generator.device).to(idx.device)
        picked.append(idx[order[:ipc]])
    sel = torch.cat(picked)
    return ds.train_images[sel], labels[sel]


def _evaluate_real(
    dataset: ImageDataset,
    training_set: Callable[[ImageDataset, EvalConfig, torch.device], TrainSet],
    config: EvalConfig | None,
    *,
    generator: torch.Generator,
    lr: float,
    device: DeviceLike,
    name: str,
    progress: bool,
    distributed: Distributed,
) -> EvalResult:
    """A real-data baseline: ``training_set(dataset, config, device)`` (drawn from ``generator`` before
    the runs' seeds) trained with hard labels on the protocol, tested on ``dataset``'s test split.
    Every rank builds the same training set (the same draws) and trains its share of the runs."""
    config = config if config is not None else EvalConfig()
    check_models((config.model,))
    ds = _check_dataset(dataset)
    lr_value = check_lr(lr)
    dev = torch.device(device) if device is not None else ds.train_images.device
    data = training_set(ds, config, dev)
    return evaluate_prepared(
        data, lr_value, ds.test_images, ds.test_labels, ds.num_classes, config,
        generator=generator, device=dev, name=name, progress=progress, distributed=distributed,
    )  # fmt: skip


def random_real_baseline(
    dataset: ImageDataset,
    ipc: int,
    config: EvalConfig | None = None,
    *,
    generator: torch.Generator,
    lr: float = BASELINE_LR,
    device: DeviceLike = None,
    progress: bool = True,
    distributed: Distributed = SINGLE,
) -> EvalResult:
    """Evaluate random real subsets of ``ipc`` images per class (hard labels) on the protocol.

    Every run draws its own subset (from ``generator``, before the runs' seeds), so the std covers
    the choice of images as well as the training noise: the "random" rows of DATM's tables.
    ``dataset`` must already be in the preprocessing the comparison uses (e.g. ZCA, as DATM). The
    test split is ``dataset.test_*``. ``distributed``: the ranks share the runs out, as in
    :func:`~datm_fast.evaluate.evaluate_synset`; every rank draws every run's subset (the same
    ``generator`` draws as one process) and trains on its own runs' only.
    """

    def subsets(ds: ImageDataset, cfg: EvalConfig, dev: torch.device) -> TrainSet:
        drawn = [random_real_subset(ds, ipc, generator=generator) for _ in range(cfg.runs)]
        # Left where the dataset is: the evaluation moves only this rank's runs to ``dev``.
        return TrainSet(torch.stack([x for x, _ in drawn]), torch.stack([y for _, y in drawn]), per_run=True)

    name = f"random-real {getattr(dataset, 'name', '?')} ipc {ipc}"
    return _evaluate_real(
        dataset,
        subsets,
        config,
        generator=generator,
        lr=lr,
        device=device,
        name=name,
        progress=progress,
        distributed=distributed,
    )


def whole_dataset_baseline(
    dataset: ImageDataset,
    config: EvalConfig | None = None,
    *,
    generator: torch.Generator,
    lr: float = BASELINE_LR,
    device: DeviceLike = None,
    progress: bool = True,
    distributed: Distributed = SINGLE,
) -> EvalResult:
    """Evaluate the whole train split (hard labels) on the protocol: the upper reference.

    The protocol's 1000 epochs are many for a whole split (CIFAR-10: 196 steps per epoch at batch
    256); pass a config with fewer (upstream's baseline script was run with 200 and more).
    ``distributed``: the ranks share the runs out, as in :func:`~datm_fast.evaluate.evaluate_synset`.
    """

    def whole(ds: ImageDataset, cfg: EvalConfig, dev: torch.device) -> TrainSet:
        return TrainSet(ds.train_images.to(dev, torch.float32).contiguous(), ds.train_labels.to(dev))

    name = f"whole {getattr(dataset, 'name', '?')}"
    return _evaluate_real(
        dataset,
        whole,
        config,
        generator=generator,
        lr=lr,
        device=device,
        name=name,
        progress=progress,
        distributed=distributed,
    )


def _evaluate_on_test_split(
    images: Tensor,
    labels: Tensor,
    lr: Union[float, Tensor],
    dataset: ImageDataset,
    config: EvalConfig,
    seed: int,
    device: DeviceLike,
    *,
    name: str = "",
    progress: bool,
    distributed: Distributed = SINGLE,
) -> EvalResult:
    """:func:`evaluate_synset` of a candidate set on ``dataset``'s test split, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return evaluate_synset(
        images,
        labels,
        lr,
        dataset.test_images,
        dataset.test_labels,
        config,
        generator=generator,
        device=device,
        name=name,
        progress=progress,
        distributed=distributed,
    )


def evaluate_against_random_real(
    images: Tensor,
    labels: Tensor,
    lr: Union[float, Tensor],
    dataset: ImageDataset,
    ipc: int,
    config: EvalConfig,
    *,
    seed: int,
    results_path: Union[str, Path],
    name: str,
    meta: Mapping[str, Any] | None = None,
    baseline_lr: float = BASELINE_LR,
    device: DeviceLike = None,
    progress: bool = True,
    distributed: Distributed = SINGLE,
) -> tuple[EvalResult, EvalResult]:
    """A distilled set and random real subsets of the same IPC, on one protocol, written side by side.

    What ``datm-fast quickstart`` and ``datm-fast reproduce`` report for every IPC: the distilled set
    (its learned labels and lr) through :func:`evaluate_synset`, then :func:`random_real_baseline`,
    each from a generator seeded with ``seed``; both results go to ``results_path`` (atomically,
    :func:`write_results`) with ``meta`` plus the IPC and the baseline's kind. ``distributed``: the
    ranks share each evaluation's runs out; rank 0 alone writes.

    Returns ``(distilled, baseline)`` (on every rank).
    """
    ds = _check_dataset(dataset)
    distilled = _evaluate_on_test_split(
        images, labels, lr, ds, config, seed, device, name=name, progress=progress, distributed=distributed
    )
    baseline = random_real_baseline(
        ds,
        ipc,
        config,
        generator=torch.Generator().manual_seed(seed),
        lr=baseline_lr,
        device=device,
        progress=progress,
        distributed=distributed,
    )
    if distributed.is_main:
        write_results(
            results_path,
            [distilled, baseline],
            config=config,
            device=device,
            meta={**(meta or {}), "ipc": ipc, "baseline": "random-real"},
        )
    return distilled, baseline


def evaluator_on_test_set(
    dataset: ImageDataset, config: EvalConfig, *, models: Sequence[str] = (), device: DeviceLike = None
) -> Callable[[Tensor, Tensor, float, int], EvalOutcome]:
    """The distillation loop's evaluator (``datm_fast.distill.distill(..., evaluator=)``): trains
    ``config.runs`` fresh ``config.model`` networks on the candidate set and tests them on
    ``dataset``'s test split, seeded by the seed the loop passes, without a progress bar (the loop has
    its own). ``models``: more networks to evaluate the set with (upstream's ``eval_mode`` pool, see
    ``datm_fast.distill.config.eval_models``); their means are reported, the set is chosen by
    ``config.model``'s.

    Example::

        result = distill(data, buffer, cfg, evaluator=evaluator_on_test_set(data, EvalConfig(runs=2)))
    """
    ds = _check_dataset(dataset)
    others = check_models(tuple(m for m in models if m != config.model))

    def evaluator(images: Tensor, labels: Tensor, lr: float, seed: int) -> EvalOutcome:
        result = _evaluate_on_test_split(images, labels, lr, ds, config, seed, device, progress=False)
        means = tuple(
            (
                m,
                _evaluate_on_test_split(
                    images, labels, lr, ds, config.replace(model=m), seed, device, progress=False
                ).mean,
            )
            for m in others
        )
        return EvalOutcome(tuple(result.accuracies), means)

    return evaluator
