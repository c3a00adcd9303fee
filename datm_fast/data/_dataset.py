"""The in-memory dataset type shared by every loader, and the one error type they raise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..utils import tensor_digest

__all__ = ["DatasetError", "ImageDataset", "from_uint8"]


class DatasetError(ValueError):
    """A dataset file or folder is missing, malformed or inconsistent.

    The message always names the offending file (or folder) and says what was expected, e.g.
    ``/data/x.npz: y_train has 999 labels but x_train has 1000 images``.
    """


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """An image-classification dataset held in memory as float tensors.

    Attributes:
        name: short name (``"cifar10"``, ``"mnist"``, the file or folder stem for other sources).
        train_images: ``(N, C, H, W)`` float32. In ``[0, 1]`` as loaded; in the transformed space after
            :func:`datm_fast.data.preprocess` (see ``preprocessing``).
        train_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        test_images: ``(M, C, H, W)`` float32, same space as ``train_images``.
        test_labels: ``(M,)`` int64.
        classes: ``num_classes`` human-readable class names; label ``k`` is ``classes[k]``.
        val_images, val_labels: an optional third split (MedMNIST ships one). It is never merged into
            train or test silently; use :meth:`with_val_merged` to train on train + val.
        fingerprint: identifies the decoded source's content (a sha256 of its pixels, labels and class
            names: the same for a copy anywhere) and every derivation applied (long-tail subsampling,
            subsets, preprocessing), as ``root+derivation+...``. Used as a cache key for fitted
            transforms and as :meth:`identity`; ``None`` disables that cache.
        preprocessing: ``"none"`` for raw pixels, else the preprocess that produced these tensors.
        source_fingerprint: the fingerprint's root as datm_fast wrote it before 2026-12-05, from the
            source files' path, sizes and times (what the decoded-pixel cache is keyed by): buffers
            written then recorded ``legacy_fingerprint``, and are still recognised by it.

    Constructing one checks shapes, dtypes and label ranges and raises :class:`DatasetError`.
    Tensors are not copied; treat them as read-only (the dataclass is frozen, the tensors are not).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    fingerprint: str | None = None
    preprocessing: str = "none"
    source_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) < 1:
            raise DatasetError(f"dataset {self.name!r}: no classes")
        splits = [("train", self.train_images, self.train_labels), ("test", self.test_images, self.test_labels)]
        if (self.val_images is None) != (self.val_labels is None):
            raise DatasetError(f"dataset {self.name!r}: val_images and val_labels must be given together")
        if self.val_images is not None:
            splits.append(("val", self.val_images, self.val_labels))
        shape = None
        for split, images, labels in splits:
            if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
                raise DatasetError(
                    f"dataset {self.name!r}: {split}_images must be a floating (N, C, H, W) tensor, got "
                    f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}"
                )
            if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
                raise DatasetError(f"dataset {self.name!r}: {split}_labels must be an int64 (N,) tensor")
            if labels.shape[0] != images.shape[0]:
                raise DatasetError(
                    f"dataset {self.name!r}: {labels.shape[0]} {split} labels for {images.shape[0]} {split} images"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
                raise DatasetError(
                    f"dataset {self.name!r}: {split} labels span [{int(labels.min())}, {int(labels.max())}], "
                    f"expected [0, {len(self.classes) - 1}] for {len(self.classes)} classes"
                )
            if shape is None:
                shape = tuple(images.shape[1:])
            elif tuple(images.shape[1:]) != shape:
                raise DatasetError(
                    f"dataset {self.name!r}: {split} images are {tuple(images.shape[1:])}, train images {shape}"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Image channels C (1 for grey, 3 for RGB)."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """``(num_classes,)`` int64: images per class in ``split`` (``"train"``, ``"test"`` or ``"val"``)."""
        labels = {"train": self.train_labels, "test": self.test_labels, "val": self.val_labels}[split]
        if labels is None:
            raise DatasetError(f"dataset {self.name!r} has no {split} split")
        return torch.bincount(labels, minlength=self.num_classes)

    def replace(self, **changes: object) -> ImageDataset:
        """A copy with some fields replaced (``dataclasses.replace``); validation runs again.

        Replacing any tensor field (images or labels of any split) drops the fingerprint to ``None``
        unless ``fingerprint`` is passed too: the old one describes the old tensors, and a fit cached
        under it (ZCA, see :func:`datm_fast.data.preprocess`) would be served for the new ones.
        """
        # None, not a hash of the new tensors: a fingerprint names the source files plus each derivation
        # applied (every derivation in this package extends it, e.g. "+subset(...)", and maps None to
        # None), so for an unnamed change "unknown provenance, not cacheable" is the honest value.
        # Hashing would also cost a pass over every pixel on each replace.
        if "fingerprint" not in changes and any(f in changes for f in _TENSOR_FIELDS):
            changes["fingerprint"] = None
        if changes.get("fingerprint", self.fingerprint) is None:
            changes["source_fingerprint"] = None  # it names a root of the fingerprint, now gone
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def legacy_fingerprint(self) -> str | None:
        """The fingerprint as written before content roots (2026-12-05): the same derivations on the
        source files' metadata root. None when either is unknown."""
        if self.fingerprint is None or self.source_fingerprint is None:
            return None
        _root, plus, derivations = self.fingerprint.partition("+")
        return self.source_fingerprint + plus + derivations

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """Every fingerprint that names this dataset in a record: its own, then its legacy one (buffers and
        results written before 2026-12-05 name it so); empty when it has none."""
        return tuple(f for f in (self.fingerprint, self.legacy_fingerprint) if f is not None)

    def identity(self) -> str:
        """What tells datasets apart wherever they are: the fingerprint (content and derivations, so a
        copy at another path or with other file times has the same one), else, for a dataset built in
        memory, a digest of every split's tensors. The ranks of a job compare it before any work."""
        if self.fingerprint is not None:
            return self.fingerprint
        splits = [self.train_images, self.train_labels, self.test_images, self.test_labels]
        if self.val_images is not None and self.val_labels is not None:
            splits += [self.val_images, self.val_labels]
        return "tensors:" + tensor_digest(*splits, extra=repr(self.classes))

    def with_val_merged(self) -> ImageDataset:
        """Train on train + val (val appended after train), the usual final-run policy for MedMNIST.

        The test split stays the official test split; ``val_*`` become ``None``.
        Returns ``self`` when there is no val split.
        """
        if self.val_images is None or self.val_labels is None:
            return self
        return self.replace(
            train_images=torch.cat([self.train_images, self.val_images]),
            train_labels=torch.cat([self.train_labels, self.val_labels]),
            val_images=None,
            val_labels=None,
            fingerprint=None if self.fingerprint is None else f"{self.fingerprint}+valmerged",
        )

    def __repr__(self) -> str:
        # The default dataclass repr would print every pixel.
        c, (h, w) = self.channels, self.image_size
        val = "" if self.val_labels is None else f", val={self.val_labels.shape[0]}"
        return (
            f"ImageDataset(name={self.name!r}, train={self.train_labels.shape[0]}, test={self.test_labels.shape[0]}"
            f"{val}, image=({c}, {h}, {w}), classes={self.num_classes}, preprocessing={self.preprocessing!r})"
        )


# The fields whose contents the fingerprint describes (ImageDataset.replace drops it when one changes), read
# off the annotations so that a split added later is covered without touching replace.
_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(ImageDataset) if "torch.Tensor" in str(f.type))


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 array -> float32 tensor in ``[0, 1]`` (a new tensor; the array is not kept)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
