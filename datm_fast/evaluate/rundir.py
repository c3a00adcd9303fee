"""``evaluate_run_dir``: evaluate the set stored in a run directory (ours or upstream's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch

from ..data import ImageDataset
from .config import EvalConfig, EvalResult, resolve_models
from .protocol import DeviceLike, evaluate_models
from .synset import PathLike, load_eval_dataset, load_run_dir

__all__ = ["evaluate_run_dir"]


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
) -> list[EvalResult]:
    """Evaluate ``images_<tag>.pt`` / ``labels_<tag>.pt`` / ``lr_<tag>.pt`` of a run directory.

    Args:
        path: the run directory (see :mod:`datm_fast.evaluate.synset` for its layout).
        config: the protocol (default :class:`EvalConfig`).
        generator: seeds every run (see :func:`evaluate_synset`).
        dataset: the dataset to test on, already in the set's preprocessing. Without it, ``run.json``
            must name the dataset and preprocessing, and the dataset is loaded from ``data_root`` (and
            preprocessed, fits cached under ``cache_dir``).
        data_root: where dataset names resolve (see :func:`datm_fast.data.load_dataset`).
        models: a pool name (``"M"``), names, or None for ``config.model``.
        tag: which files (``best``, an iteration number, ...).
        lr: overrides the learned lr (required when there is no ``lr_<tag>.pt``).
        device: where to train; default CUDA when available, else CPU.

    Returns one :class:`EvalResult` per model, named after the directory.

    Raises ``ValueError``/``FileNotFoundError`` naming the file: missing files, malformed tensors, a
    ``run.json`` whose preprocessing differs from ``dataset.preprocessing``, a set whose image shape or
    class count does not match the dataset.
    """
    config = config if config is not None else EvalConfig()
    directory = Path(path)
    synset, info = load_run_dir(directory, tag)
    if dataset is None:
        if info is None:
            raise ValueError(
                f"{directory}: no run.json naming the dataset and preprocessing; pass dataset= (an "
                "ImageDataset in the set's preprocessing) or write run.json with write_run_info"
            )
        dataset = load_eval_dataset(info, data_root, cache_dir=cache_dir)
    elif info is not None and info.preprocessing != dataset.preprocessing:
        raise ValueError(
            f"{directory / 'run.json'}: the set is in preprocessing {info.preprocessing!r} but the dataset "
            f"given is {dataset.preprocessing!r}; test images must be in the set's space"
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
        raise ValueError(f"{directory}: no lr_{tag}.pt; pass lr= (the lr to train with)")
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
        name=str(directory),
        progress=progress,
    )
