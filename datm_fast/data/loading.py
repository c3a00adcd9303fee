"""``load_dataset``: resolve a name or path, decode once through the cache, return an :class:`ImageDataset`."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import MappingProxyType
from typing import Union

import numpy as np
import torch

from ..utils import default_cache_dir
from ._dataset import DatasetError, ImageDataset, from_uint8
from ._layouts import RawDataset, Source, canonical_name, detect_source, read_source
from .bundled import BUNDLED
from .cache import content_fingerprint, dataset_cache_path, read_cached, source_fingerprint, write_cached

__all__ = ["DATASET_NAMES", "load_dataset", "resolve_source"]

PathLike = Union[str, "os.PathLike[str]"]

# What a dataset name looks for under a root, in order. Other names try <name>/, <name>.npz, <name>-jpeg.npz.
_CANDIDATES = MappingProxyType(
    {
        "cifar10": ("cifar-10-batches-py", "cifar10-jpeg.npz", "cifar10.npz"),
        "cifar100": ("cifar-100-python", "cifar100-jpeg.npz", "cifar100.npz"),
        "tinyimagenet": ("tiny-imagenet-200", "tinyimagenet-jpeg.npz", "tinyimagenet.npz"),
        "mnist": ("mnist.npz",),
        "fashion_mnist": ("fashion_mnist.npz", "fashion-mnist.npz", "fashionmnist.npz"),
    }
)
_ALIASES = MappingProxyType(
    {
        "cifar-10": "cifar10",
        "cifar_10": "cifar10",
        "cifar-100": "cifar100",
        "cifar_100": "cifar100",
        "tiny": "tinyimagenet",
        "tiny-imagenet": "tinyimagenet",
        "tiny_imagenet": "tinyimagenet",
        "tiny-imagenet-200": "tinyimagenet",
        "tinyimagenet200": "tinyimagenet",
        "fashionmnist": "fashion_mnist",
        "fashion-mnist": "fashion_mnist",
    }
)
# torchvision class that downloads each name into torchvision's on-disk layout.
_DOWNLOADABLE = MappingProxyType({"cifar10": "CIFAR10", "cifar100": "CIFAR100"})

DATASET_NAMES = tuple(_CANDIDATES) + tuple(_ALIASES)


def _candidates(name: str) -> tuple[str, ...]:
    return _CANDIDATES.get(name, (name, f"{name}.npz", f"{name}-jpeg.npz"))


def _looks_like_path(s: str) -> bool:
    return os.sep in s or (os.altsep is not None and os.altsep in s) or s.lower().endswith(".npz")


def resolve_source(name_or_path: PathLike, root: PathLike | None = None, *, download: bool = False) -> Source:
    """Find the dataset that ``name_or_path`` means and recognise its layout (no decoding).

    - A ``Path`` (or a string containing a path separator or ending in ``.npz``) is a file or folder;
      a relative one is taken relative to ``root`` when ``root`` is given.
    - Any other string is a dataset name, looked up under ``root`` (default:
      ``default_cache_dir() / "raw"``, where downloads go): ``cifar10`` -> ``cifar-10-batches-py/``,
      ``cifar10-jpeg.npz`` or ``cifar10.npz``; ``mnist`` -> ``mnist.npz``; ``fashion_mnist`` (or
      ``fashionmnist``) -> ``fashion_mnist.npz``; ``cifar100`` -> ``cifar-100-python/``; ``tinyimagenet``
      (or ``tiny``) -> ``tiny-imagenet-200/``; any other name ``n`` -> ``n/``, ``n.npz`` or ``n-jpeg.npz``
      (``breastmnist`` -> ``breastmnist.npz``). Without ``root``, an existing folder or file named ``n``
      in the working directory is used as a path.
    - ``download=True`` fetches CIFAR-10/100 with torchvision into ``root`` when nothing is found.
    """
    base = Path(root).expanduser() if root is not None else None
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        return detect_source(path)

    requested = name_or_path.strip()
    name = _ALIASES.get(requested.lower(), canonical_name(requested))
    if base is None:
        if Path(requested).exists():
            return detect_source(Path(requested), name=name)
        base = default_cache_dir() / "raw"
    tried = [base / c for c in _candidates(name)]
    for p in tried:
        if p.exists():
            return detect_source(p, name=name)
    if download:
        _download(name, base)
        for p in tried:
            if p.exists():
                return detect_source(p, name=name)
    if not base.is_dir():
        hint = "" if root is not None else " (no root given: this is where downloads go; pass root=...)"
        raise DatasetError(f"{base}: dataset root not found, looking for {name!r}{hint}")
    how = (
        " or pass download=True (needs torchvision)"
        if name in _DOWNLOADABLE
        else "; download=True only supports " + ", ".join(_DOWNLOADABLE)
    )
    raise DatasetError(
        f"{base}: no {name!r} dataset found; looked for {', '.join(p.name for p in tried)}. "
        f"Pass a path to the files{how}."
    )


def _download(name: str, root: Path) -> None:
    cls_name = _DOWNLOADABLE.get(name)
    if cls_name is None:
        raise DatasetError(
            f"{root}: cannot download {name!r}: only {', '.join(_DOWNLOADABLE)} can be downloaded "
            "(through torchvision); place the files under the root yourself"
        )
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError as e:
        raise DatasetError(
            f"{root}: {name!r} not found and download=True needs torchvision, which is not importable ({e}). "
            "Install torchvision, or get the 'python version' archive from https://www.cs.toronto.edu/~kriz/cifar.html "
            f"and extract it into {root}"
        ) from e
    cls = getattr(datasets, cls_name)
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _check_cache_outside(cache: Path, source: Source) -> None:
    # The loader writes only under the cache directory. A cache inside a folder source would put files
    # into the data folder (and could change an ImageFolder's contents); refuse it. A file source's
    # parent is not checked: data files often sit under $HOME, which also holds ~/.cache.
    if not source.path.is_dir():
        return
    data_dir = source.path.resolve()
    c = cache.resolve()
    if c == data_dir or data_dir in c.parents:
        raise DatasetError(f"{cache}: cache directory is inside the data directory {data_dir}; choose another")


def load_dataset(
    name_or_path: PathLike,
    root: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    cache: bool = True,
    download: bool = False,
) -> ImageDataset:
    """Load a dataset as float32 tensors in ``[0, 1]``, decoding it once and caching the pixels.

    Args:
        name_or_path: a dataset name (``"cifar10"``, ``"mnist"``, ``"fashion_mnist"``, ``"breastmnist"``,
            ``"cifar100"``, ``"tinyimagenet"``, ...) resolved against ``root``, or a path to an ``.npz``
            archive or a dataset folder; or ``"digits"``, scikit-learn's bundled 8x8 digits
            (:mod:`datm_fast.data.bundled`), which needs no root. See :func:`resolve_source` and
            ``datm_fast.data._layouts``.
        root: folder that names are resolved against.
        cache_dir: where decoded uint8 arrays are cached (default ``datm_fast.utils.default_cache_dir()``).
            The cache entry is keyed by a fingerprint of the source files, so changed files are decoded again.
        cache: ``False`` decodes every time and writes nothing.
        download: fetch CIFAR-10/100 with torchvision when not found under ``root``. This is the one
            case that writes outside the cache: torchvision's files go into ``root`` (default
            ``default_cache_dir() / "raw"``), as asked. Otherwise data folders are only ever read.

    Returns:
        :class:`ImageDataset` with ``train_images`` ``(N, C, H, W)`` float32, ``train_labels`` ``(N,)``
        int64, the same for test (and val for MedMNIST), and class names.

    Raises:
        DatasetError: missing path, unknown layout, an empty class, labels that do not match the images,
            or a corrupted file. The message names the file.

    Example::

        ds = load_dataset("cifar10", root="/work/shared/data")
        ds.train_images.shape  # torch.Size([50000, 3, 32, 32])
    """
    if isinstance(name_or_path, str) and name_or_path.lower() in BUNDLED:
        return BUNDLED[name_or_path.lower()]()  # ships inside a package: nothing to resolve or cache
    source = resolve_source(name_or_path, root, download=download)
    fingerprint = source_fingerprint(source)  # the cache key: a stat per file, no decoding
    cached: tuple[RawDataset, str] | None = None
    cache_path: Path | None = None
    if cache:
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        _check_cache_outside(cache_root, source)
        cache_path = dataset_cache_path(cache_root, source, fingerprint)
        cached = read_cached(cache_path)
    if cached is not None:
        raw, content = cached
    else:
        raw = read_source(source)
        content = content_fingerprint(raw)
        if cache_path is not None:
            write_cached(cache_path, raw, content)
    has_val = raw.val_x is not None
    return ImageDataset(
        name=source.name,
        train_images=from_uint8(raw.train_x),
        train_labels=_labels_tensor(raw.train_y),
        test_images=from_uint8(raw.test_x),
        test_labels=_labels_tensor(raw.test_y),
        classes=raw.classes,
        val_images=from_uint8(raw.val_x) if has_val else None,
        val_labels=_labels_tensor(raw.val_y) if has_val else None,
        fingerprint=content,
        source_fingerprint=fingerprint,
    )


def _labels_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
