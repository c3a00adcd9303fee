"""Random subsets of a dataset's splits, for quick runs."""

from __future__ import annotations

from typing import Any

import torch

from ._dataset import ImageDataset

__all__ = ["subset_dataset"]


def subset_dataset(
    dataset: ImageDataset, max_train: int | None = None, max_test: int | None = None, *, seed: int = 0
) -> ImageDataset:
    """A random subset of at most ``max_train`` train and ``max_test`` test images (for quick runs).

    The images are drawn with a generator seeded ``seed`` (CIFAR files are stored class by class, so
    the first N would be one class) and kept in their original order. The fingerprint records the
    subset, so a buffer trained on it never passes for one trained on the whole split.
    """

    def pick(n: int, k: int | None, salt: int) -> torch.Tensor | None:
        if k is None or k >= n:
            return None
        if k < 1:
            raise ValueError(f"subset_dataset: subset sizes must be >= 1, got {k}")
        g = torch.Generator().manual_seed(seed * 2 + salt)
        return torch.randperm(n, generator=g)[:k].sort().values

    tr = pick(int(dataset.train_labels.shape[0]), max_train, 0)
    te = pick(int(dataset.test_labels.shape[0]), max_test, 1)
    if tr is None and te is None:
        return dataset
    changes: dict[str, Any] = {}
    if tr is not None:
        changes.update(train_images=dataset.train_images[tr], train_labels=dataset.train_labels[tr])
    if te is not None:
        changes.update(test_images=dataset.test_images[te], test_labels=dataset.test_labels[te])
    if dataset.fingerprint is not None:
        changes["fingerprint"] = f"{dataset.fingerprint}+subset(train={max_train},test={max_test},seed={seed})"
    return dataset.replace(**changes)
