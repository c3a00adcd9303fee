"""The decoded-pixel cache: fingerprints of sources and atomic ``.npz`` files of uint8 arrays.

Layout of a cache directory (``datm_fast.utils.default_cache_dir()`` unless one is given)::

    <cache>/datasets/<name>-<layout>-<fingerprint[:24]>.npz    decoded pixels (uint8) and labels
    <cache>/transforms/<kind>-<key[:24]>.pt                     fitted transforms (see transforms.py)

A fingerprint covers everything the decoded arrays depend on: the cache format version, the layout,
the source's absolute path and, for every file it reads, its relative path, size and mtime (in ns).
A change to any file gives a new fingerprint, hence a new cache file, so stale pixels are never
served. When a source has only a few files (archives, CIFAR pickles) the bytes of each file up to
4 MiB are hashed as well: mtime has coarse granularity on some filesystems, and a small file rewritten
with the same size within one tick would otherwise keep its fingerprint. Large files and folder trees
(Tiny ImageNet: 110,000 files) are fingerprinted by metadata only, which costs a ``stat`` per file.

Files are written with :func:`datm_fast.utils.atomic_write`, so a killed process never leaves a
truncated cache file; an unreadable one is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from ..utils import atomic_write
from ._dataset import DatasetError
from ._layouts import RawDataset, Source

__all__ = [
    "CACHE_VERSION",
    "content_fingerprint",
    "dataset_cache_path",
    "read_cached",
    "source_fingerprint",
    "write_cached",
]

# Bump when the decoded form changes (channel order, class order, label rules): old entries then miss.
CACHE_VERSION = 1

_HASH_CONTENT_MAX_FILES = 16  # sources with at most this many files also get their small files' bytes hashed
_HASH_CONTENT_MAX_BYTES = 4 << 20

_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def source_fingerprint(source: Source) -> str:
    """Hex SHA-256 over the layout, the absolute path and each file's (relative path, size, mtime_ns)."""
    h = hashlib.sha256()
    root = source.path.resolve()
    h.update(f"datm_fast.data cache v{CACHE_VERSION}\0{source.layout}\0{root}\0".encode())
    hash_content = len(source.files) <= _HASH_CONTENT_MAX_FILES
    for f in source.files:
        try:
            st = f.stat()
        except OSError as e:
            raise DatasetError(f"{f}: cannot read ({e})") from e
        rel = f.name if source.path.is_file() else os.path.relpath(f, source.path)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if hash_content and st.st_size <= _HASH_CONTENT_MAX_BYTES:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def content_fingerprint(raw: RawDataset) -> str:
    """Hex SHA-256 over the decoded arrays (dtype, shape and bytes of every split) and the class names:
    the same for every copy of the data, wherever it lies and whatever its file times (CIFAR-10's
    180 MB of pixels and labels: 0.10 s on the 2-core VM, 2026-12-05). Computed when the source is
    decoded and stored in its cache entry, so a cache hit reads it rather than hashing again."""
    h = hashlib.sha256(b"datm_fast.data content v1\0")
    for key in (*_ARRAYS, "val_x", "val_y"):
        a = getattr(raw, key)
        if a is None:
            continue
        # Labels as int64 whatever the decoder or platform made them (int32 on some): the same content.
        a = np.ascontiguousarray(a, dtype=np.int64 if key.endswith("_y") else None)
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    h.update("\0".join(raw.classes).encode())
    return h.hexdigest()


def dataset_cache_path(cache_dir: Path, source: Source, fingerprint: str) -> Path:
    """Where the decoded arrays of ``source`` live in ``cache_dir``."""
    return cache_dir / "datasets" / f"{source.name}-{source.layout}-{fingerprint[:24]}.npz"


def write_cached(path: Path, raw: RawDataset, content: str) -> None:
    """Store ``raw`` uncompressed (loading 150 MB of CIFAR-10 pixels then takes a fraction of a second)
    with its :func:`content_fingerprint` ``content``, so that a cache hit need not hash the arrays again."""
    arrays: dict[str, np.ndarray] = {
        "train_x": raw.train_x,
        "train_y": raw.train_y,
        "test_x": raw.test_x,
        "test_y": raw.test_y,
        "classes": np.array(raw.classes, dtype=np.str_),
        "name": np.array(raw.name, dtype=np.str_),
        "version": np.array(CACHE_VERSION, dtype=np.int64),
        "content": np.array(content, dtype=np.str_),
    }
    if raw.val_x is not None and raw.val_y is not None:
        arrays["val_x"], arrays["val_y"] = raw.val_x, raw.val_y
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def read_cached(path: Path) -> tuple[RawDataset, str] | None:
    """The cached arrays at ``path`` and their content fingerprint, or ``None`` when absent or unreadable
    (then the caller re-decodes). An entry written before the fingerprint was stored has it computed."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or not all(k in z.files for k in _ARRAYS):
                return None
            has_val = "val_x" in z.files
            raw = RawDataset(
                name=str(z["name"]),
                train_x=z["train_x"],
                train_y=z["train_y"],
                test_x=z["test_x"],
                test_y=z["test_y"],
                classes=tuple(str(c) for c in z["classes"].tolist()),
                val_x=z["val_x"] if has_val else None,
                val_y=z["val_y"] if has_val else None,
            )
            content = str(z["content"]) if "content" in z.files else content_fingerprint(raw)
            return raw, content
    except Exception as e:  # a damaged cache entry must never stop a load: decode again instead
        warnings.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}: {e})", stacklevel=3)
        return None
