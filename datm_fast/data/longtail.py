"""Long-tailed variants (CIFAR-10-LT and the like) by exponential subsampling of the train split."""

from __future__ import annotations

import torch

from ._dataset import DatasetError, ImageDataset

__all__ = ["long_tail_counts", "long_tailed"]


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images kept per class: ``n_c = int(n_max * imbalance_factor ** (-c / (C - 1)))``, ``c = 0..C-1``.

    The exponential profile of Cao et al. 2019 (LDAM-DRW), computed exactly as their code does,
    ``int(n_max * (1 / factor) ** (c / (C - 1)))``, so CIFAR-10-LT sizes match the literature:
    factor 100 gives 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images) and factor 10
    gives 20,431 images. Class 0 keeps ``n_max``, class ``C - 1`` keeps ``n_max / imbalance_factor``.

    Raises:
        DatasetError: ``imbalance_factor < 1``, fewer than 2 classes, or a class would get no image.
    """
    if num_classes < 2:
        raise DatasetError(f"long-tail needs at least 2 classes, got {num_classes}")
    if not imbalance_factor >= 1.0:
        raise DatasetError(f"imbalance_factor must be >= 1 (n_max / n_min), got {imbalance_factor}")
    ratio = 1.0 / imbalance_factor
    counts = [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if counts[-1] < 1:
        raise DatasetError(
            f"imbalance factor {imbalance_factor} with {n_max} images in the largest class leaves class "
            f"{num_classes - 1} with {n_max * ratio:.3g} < 1 images; use a factor <= {n_max}"
        )
    return counts


def long_tailed(
    dataset: ImageDataset,
    imbalance_factor: float,
    *,
    seed: int,
    n_max: int | None = None,
) -> ImageDataset:
    """Subsample the train split of ``dataset`` to a long-tailed profile; test (and val) are untouched.

    Class ``c`` keeps ``long_tail_counts(n_max, C, imbalance_factor)[c]`` images, drawn uniformly
    without replacement by a ``torch.Generator`` seeded with ``seed`` (same seed, same subset), and kept
    in their original order. ``n_max`` defaults to the smallest class's train count, so every class
    has enough images (for balanced CIFAR-10 it is 5,000).

    Returns a new :class:`ImageDataset` sharing no train storage with ``dataset``, whose ``fingerprint``
    records the factor, seed and ``n_max`` (so transforms fitted on it are cached apart).

    Raises:
        DatasetError: bad factor, a class that would get fewer than 1 image, or a class with fewer
            train images than its target count.
    """
    if dataset.preprocessing != "none":
        # Statistics of a fitted transform would describe the full train split, not the subsample.
        raise DatasetError(
            f"dataset {dataset.name!r} is already preprocessed ({dataset.preprocessing}); make it long-tailed "
            "first, then preprocess, so the transform is fitted on the long-tailed train split"
        )
    available = dataset.class_counts("train")
    if n_max is None:
        n_max = int(available.min())
    counts = long_tail_counts(n_max, dataset.num_classes, imbalance_factor)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c, n_c in enumerate(counts):
        idx = torch.nonzero(dataset.train_labels == c).flatten()
        if idx.numel() < n_c:
            raise DatasetError(
                f"dataset {dataset.name!r}: class {dataset.classes[c]!r} has {idx.numel()} train images, "
                f"the long-tail profile needs {n_c} (n_max={n_max})"
            )
        keep.append(idx[torch.randperm(idx.numel(), generator=generator)[:n_c]])
    order = torch.cat(keep).sort().values
    fingerprint = None
    if dataset.fingerprint is not None:
        fingerprint = f"{dataset.fingerprint}+lt(factor={imbalance_factor!r},seed={seed},n_max={n_max})"
    return dataset.replace(
        name=f"{dataset.name}-lt{imbalance_factor:g}",
        train_images=dataset.train_images[order],
        train_labels=dataset.train_labels[order],
        fingerprint=fingerprint,
    )
