"""Per-sample loop reference for DSA: the ground truth for :mod:`datm_fast.augment`.

Deliberately simple and written apart from the fast path: a Python loop over samples, host scalars
(``.tolist()``), explicit index arithmetic with slices for crop, upstream's clamp-each-index rule for
cutout, and one ``affine_grid``/``grid_sample`` call per sample with a matrix built from Python floats,
as upstream ``utils.py`` (``rand_*`` of MTT/DATM) builds it. It takes the same
:class:`~datm_fast.augment.DSAParams` (read by attribute only) so tests and benchmarks can feed both
the same draw. It synchronises with the device on every sample; use it for checking, not training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # the reference depends on the params' fields only, not on the fast module
    from datm_fast.augment import DSAParams

__all__ = [
    "apply_dsa_reference",
    "brightness_one",
    "saturation_one",
    "contrast_one",
    "crop_one",
    "cutout_one",
    "flip_one",
    "scale_one",
    "rotate_one",
]


def brightness_one(img: Tensor, offset: float) -> Tensor:
    """``img + offset`` for one image ``(C, H, W)``."""
    return img + offset


def saturation_one(img: Tensor, factor: float) -> Tensor:
    """Scale each pixel's deviation from its mean over channels by ``factor``; ``img`` is ``(C, H, W)``."""
    mean = img.mean(dim=0, keepdim=True)
    return (img - mean) * factor + mean


def contrast_one(img: Tensor, factor: float) -> Tensor:
    """Scale the deviation from the image's mean (over C, H, W) by ``factor``; ``img`` is ``(C, H, W)``."""
    mean = img.mean()
    return (img - mean) * factor + mean


def crop_one(img: Tensor, dy: int, dx: int) -> Tensor:
    """Translate one image ``(C, H, W)``: ``out[:, i, j] = img[:, i + dy, j + dx]``, 0 where that is outside."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    # Output rows i with 0 <= i + dy < h, and likewise columns.
    i0, i1 = max(0, -dy), min(h, h - dy)
    j0, j1 = max(0, -dx), min(w, w - dx)
    if i0 < i1 and j0 < j1:
        out[:, i0:i1, j0:j1] = img[:, i0 + dy : i1 + dy, j0 + dx : j1 + dx]
    return out


def cutout_one(img: Tensor, oy: int, ox: int, size: tuple[int, int]) -> Tensor:
    """Zero the ``size`` window centred at ``(oy, ox)`` of one image ``(C, H, W)``, upstream's way.

    Upstream clamps every window index ``o - size // 2 + k`` (``k < size``) into ``[0, side - 1]`` and
    zeroes the pixels it lands on; here that rule is followed index by index.
    """
    _, h, w = img.shape
    mask = torch.ones(h, w, dtype=img.dtype, device=img.device)
    rows = sorted({min(max(oy - size[0] // 2 + k, 0), h - 1) for k in range(size[0])})
    cols = sorted({min(max(ox - size[1] // 2 + k, 0), w - 1) for k in range(size[1])})
    for r in rows:
        for c in cols:
            mask[r, c] = 0
    return img * mask


def flip_one(img: Tensor, flip: bool) -> Tensor:
    """Mirror one image ``(C, H, W)`` left to right if ``flip``."""
    if not flip:
        return img
    w = img.shape[-1]
    return img[:, :, [w - 1 - j for j in range(w)]]


def _affine_one(img: Tensor, matrix: list[list[float]]) -> Tensor:
    theta = torch.tensor([matrix], dtype=img.dtype, device=img.device)  # (1, 2, 3)
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=True)
    return F.grid_sample(img.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def scale_one(img: Tensor, sx: float, sy: float) -> Tensor:
    """Resample one image ``(C, H, W)`` through the affine map ``[[sx, 0, 0], [0, sy, 0]]``."""
    return _affine_one(img, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def rotate_one(img: Tensor, angle: float) -> Tensor:
    """Resample one image ``(C, H, W)`` through a rotation by ``angle`` radians (upstream's matrix)."""
    c, s = math.cos(angle), math.sin(angle)
    return _affine_one(img, [[c, math.sin(-angle), 0.0], [s, c, 0.0]])


def apply_dsa_reference(x: Tensor, params: DSAParams) -> Tensor:
    """Reference for :func:`datm_fast.augment.apply_dsa`: ``x`` ``(B, C, H, W)`` -> ``(B, C, H, W)``."""
    if x.dim() != 4 or x.shape[0] != params.batch_size:
        raise ValueError(f"apply_dsa_reference: x shape {tuple(x.shape)} does not fit batch {params.batch_size}")

    def host(name: str) -> list:
        t = getattr(params, name)
        return t.tolist() if t is not None else []

    v = {n: host(n) for n in ("brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate")}
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        for g in params.groups:
            if g == "color":
                img = brightness_one(img, v["brightness"][i])
                img = saturation_one(img, v["saturation"][i])
                img = contrast_one(img, v["contrast"][i])
            elif g == "crop":
                img = crop_one(img, *v["crop"][i])
            elif g == "cutout":
                img = cutout_one(img, *v["cutout"][i], size=params.cutout_size)
            elif g == "flip":
                img = flip_one(img, v["flip"][i])
            elif g == "scale":
                img = scale_one(img, *v["scale"][i])
            elif g == "rotate":
                img = rotate_one(img, v["rotate"][i])
            else:
                raise ValueError(f"apply_dsa_reference: unknown group {g!r}")
        out.append(img)
    if not out:
        return x
    return torch.stack(out)
