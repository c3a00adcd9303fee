"""Datasets that ship inside an installed package, for runs on a fresh machine without network.

``digits``: scikit-learn's bundled copy of the UCI optical-recognition handwritten digits test set
(Alpaydin & Kaynak, 1998): 1,797 grey 8x8 images of 0-9 with values 0..16. Split per class, in the
file's order: the first 80% of each class train, the rest test (1,438 / 359), so the split needs no
seed and never changes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ._dataset import DatasetError, ImageDataset

__all__ = ["BUNDLED", "load_digits"]

TRAIN_FRACTION = 0.8


def load_digits() -> ImageDataset:
    """scikit-learn's 8x8 digits as an :class:`ImageDataset`: (N, 1, 8, 8) float32 in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DatasetError(
            "dataset 'digits' is read from scikit-learn's bundled copy, but scikit-learn is not installed "
            "(pip install scikit-learn)"
        ) from exc
    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        cut = int(round(TRAIN_FRACTION * len(idx)))
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    train, test = np.concatenate(train_idx), np.concatenate(test_idx)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    return ImageDataset(
        name="digits",
        train_images=x[train].contiguous(),
        train_labels=y[train].contiguous(),
        test_images=x[test].contiguous(),
        test_labels=y[test].contiguous(),
        classes=tuple(str(c) for c in range(10)),
        fingerprint=f"sklearn-digits:{digest}",
    )


BUNDLED = {"digits": load_digits, "sklearn-digits": load_digits}
