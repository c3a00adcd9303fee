"""Decode encoded images (JPEG, PNG, ...) with Pillow into one uint8 ``(N, C, H, W)`` array.

Pillow releases the GIL while it decodes, so a thread pool scales with cores: the 60,000 CIFAR-10
JPEGs take about 15 s on 2 cores. Each worker decodes a contiguous chunk straight into the shared
output array, so peak memory is the output plus one image per thread.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._dataset import DatasetError

__all__ = ["decode_images", "num_workers"]

# An image source: encoded bytes in memory (npz archives) or a file path (folders).
Source = Union[bytes, memoryview, np.ndarray, str, os.PathLike]

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def num_workers() -> int:
    """Threads to decode with: the CPUs this process may run on, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _open(src: Source) -> Image.Image:
    if isinstance(src, (str, os.PathLike)):
        return Image.open(src)
    return Image.open(io.BytesIO(src if isinstance(src, (bytes, memoryview)) else src.tobytes()))


def _to_array(img: Image.Image) -> np.ndarray:
    """``(H, W, 1)`` for grey images, ``(H, W, 3)`` for everything else (palette, RGBA and CMYK -> RGB)."""
    if img.mode in _GREY_MODES:
        if img.mode != "L":
            # 16-bit and float grey: rescale to 8 bits the way Pillow's convert does.
            img = img.convert("L")
        return np.asarray(img, dtype=np.uint8)[:, :, None]
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def decode_images(
    sources: Sequence[Source],
    *,
    describe: Callable[[int], str],
    workers: int | None = None,
) -> np.ndarray:
    """Decode ``sources`` into a uint8 ``(N, C, H, W)`` array.

    Every image must have the size of the first. Channels: 1 if every image is grey, else 3 (grey
    images are then repeated into RGB). ``describe(i)`` names image ``i`` in error messages
    (e.g. ``"/data/x.npz: train image 17"``), since a bad image must be findable.
    """
    n = len(sources)
    if n == 0:  # callers report empty classes and splits themselves, with the folder or key to blame
        raise ValueError("decode_images: no images given")
    first = _decode_one(sources[0], describe, 0)
    h, w = first.shape[:2]
    # Decode as RGB-capable (H, W, 3) storage; collapse to 1 channel at the end if all were grey.
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    grey = np.zeros(n, dtype=bool)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a = first if i == 0 else _decode_one(sources[i], describe, i)
            if a.shape[:2] != (h, w):
                raise DatasetError(
                    f"{describe(i)}: image is {a.shape[1]}x{a.shape[0]} (WxH), expected {w}x{h} like the first "
                    "image; all images of a dataset must have one size"
                )
            out[i] = a  # broadcasts (H, W, 1) over 3 channels
            grey[i] = a.shape[2] == 1

    workers = workers or num_workers()
    chunk = max(1, min(2048, -(-n // (workers * 4))))
    bounds = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    if workers == 1 or len(bounds) == 1:
        for lo, hi in bounds:
            work(lo, hi)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(work, lo, hi) for lo, hi in bounds]:
                fut.result()  # re-raises the first DatasetError
    if grey.all():
        return np.ascontiguousarray(out[:, :, :, :1].transpose(0, 3, 1, 2))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _decode_one(src: Source, describe: Callable[[int], str], i: int) -> np.ndarray:
    try:
        with _open(src) as img:
            img.load()
            return _to_array(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # SyntaxError is what some Pillow plugins raise on a malformed header.
        raise DatasetError(f"{describe(i)}: cannot decode image ({type(e).__name__}: {e})") from e
