"""``evaluate_run_dir``: evaluate the set stored in a run directory (ours or upstream's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from ..data import ImageDataset
from ..distill.rundir import PathLike, RunDir
from ..distributed import SINGLE, Distributed
from .config import EvalConfig, EvalResult, resolve_models
from .protocol import DeviceLike, evaluate_models

__all__ = ["evaluate_run_dir", "run_dataset"]


def run_dataset(run: RunDir, *, data_root: PathLike | None = None, cache_dir: PathLike | None = None) -> ImageDataset:
    """The data ``run``'s set was distilled from, rebuilt from its ``run.json`` (same draws, same fitted
    preprocessing): the space its images live in. ``data_root`` overrides the recorded root (moved data)."""
    record = run.read_record()
    if record is None or record.data is None:
        what = "no run.json" if record is None else "a run.json that names no data spec"
        raise ValueError(
            f"{run.path}: {what}; pass dataset= (an ImageDataset in the set's preprocessing), or --dataset and "
            "--preprocess to datm-fast eval"
        )
    dataset, _ = record.data.load(root=data_root, cache_dir=cache_dir)
    return dataset


def evaluate_run_dir(
    path: PathLike,
    config: EvalConfig | None = None,
    *,
    generator: torch.Generator,
    dataset: ImageDataset | None = None,
    data_root: PathLike | None = None,
    models: Union[str, Sequence[str], None] = None,
    tag: str = "best",
    lr: float | None = None,
    cache_dir: PathLike | None = None,
    device: DeviceLike = None,
    progress: bool = True,
    distributed: Distributed = SINGLE,
) -> list[EvalResult]:
    """Evaluate ``images_<tag>.pt`` / ``labels_<tag>.pt`` / ``lr_<tag>.pt`` of a run directory.

    Args:
        path: the run directory (see :class:`~datm_fast.distill.rundir.RunDir`).
        config: the protocol (default :class:`EvalConfig`).
        generator: seeds every run (see :func:`evaluate_synset`).
        dataset: the dataset to test on, already in the set's preprocessing. Without it, the data of the
            run's ``run.json`` are rebuilt (:func:`run_dataset`; decoded pixels and fitted transforms
            cached under ``cache_dir``), with ``data_root`` in place of the recorded root when given.
        models: a pool name (``"M"``), names, or None for ``config.model``.
        tag: which files (``best``, an iteration number, ...).
        lr: overrides the learned lr (required when there is no ``lr_<tag>.pt``).
        device: where to train; default CUDA when available, else CPU.
        distributed: the ranks that share each model's runs out (see :func:`evaluate_synset`).

    Returns one :class:`EvalResult` per model, named after the directory.

    Raises ``ValueError``/``FileNotFoundError`` naming the file: missing files, malformed tensors, a
    ``run.json`` whose preprocessing differs from ``dataset.preprocessing``, a set whose image shape or
    class count does not match the dataset.
    """
    config = config if config is not None else EvalConfig()
    run = RunDir(path)
    synset = run.load_set(tag)
    if dataset is None:
        dataset = run_dataset(run, data_root=data_root, cache_dir=cache_dir)
    else:
        record = run.read_record()
        if record is not None and record.data is not None and record.data.preprocessing != dataset.preprocessing:
            raise ValueError(
                f"{run.file(RunDir.RECORD)}: the set is in preprocessing {record.data.preprocessing!r} but the "
                f"dataset given is {dataset.preprocessing!r}; test images must be in the set's space"
            )
    if tuple(synset.images.shape[1:]) != (dataset.channels, *dataset.image_size):
        raise ValueError(
            f"{synset.source}: images are {tuple(synset.images.shape[1:])} but {dataset.name!r} images are "
            f"{(dataset.channels, *dataset.image_size)}"
        )
    if synset.soft and synset.labels.shape[1] != dataset.num_classes:
        raise ValueError(
            f"{synset.source}: labels have {synset.labels.shape[1]} logits per image but {dataset.name!r} has "
            f"{dataset.num_classes} classes"
        )
    lr_value = lr if lr is not None else synset.lr
    if lr_value is None:
        raise ValueError(f"{run.path}: no lr_{tag}.pt; pass lr= (the lr to train with)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_models(
        synset.images,
        synset.labels,
        lr_value,
        dataset.test_images,
        dataset.test_labels,
        resolve_models(models) if models is not None else (config.model,),
        config,
        generator=generator,
        device=device,
        num_classes=dataset.num_classes,
        name=str(run.path),
        progress=progress,
        distributed=distributed,
    )
