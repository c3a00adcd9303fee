"""Pictures people would rather look at than read: image grids as PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .utils import atomic_write

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images: torch.Tensor, *, nrow: int, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile ``images`` (N, C, H, W) with values in [0, 1] into one (rows*H', nrow*W', 3) uint8 array.

    Values outside [0, 1] are clipped (a de-whitened distilled image often overshoots a little);
    1-channel images are shown in grey; each image is upscaled ``scale`` times (nearest neighbour) so
    that 32 px thumbnails stay visible.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"image_grid: need nrow >= 1, padding >= 0, scale >= 1, got {nrow}, {padding}, {scale}")
    x = images.detach().to("cpu", torch.float32).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, _, h, w = x.shape
    rows = max(1, -(-n // nrow))
    grid = torch.ones(3, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike[str], *, nrow: int, padding: int = 2, scale: int = 1
) -> Path:
    """Write :func:`image_grid` of ``images`` to ``path`` as PNG, atomically. Returns the path."""
    path = Path(path)
    array = image_grid(images, nrow=nrow, padding=padding, scale=scale)
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")
    return path
