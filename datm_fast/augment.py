"""Differentiable Siamese Augmentation (DSA), vectorised and replayable.

This is the augmentation MTT and DATM apply to every batch of synthetic images in the inner loop, to
every expert batch and at evaluation: ``DiffAugment(x, 'color_crop_cutout_flip_scale_rotate',
param=ParamDiffAug())`` in upstream ``utils.py``. Semantics are the same op for op; the
implementation differs in three ways.

* **Drawing is separate from applying.** :func:`sample_dsa_params` draws a :class:`DSAParams`
  (the chosen op group(s) on the host, per-sample values as tensors on the device); :func:`apply_dsa`
  applies it. Applying the same params to the same input is bit-identical, which the distillation
  engine relies on when it replays a step's augmentation in its backward pass. Params slice by sample
  (``params[i:j]``) for micro-batches: ``apply_dsa(x[i:j], params[i:j]) == apply_dsa(x, params)[i:j]``.
* **No global RNG.** Values come from an explicit ``torch.Generator``; the same seed gives the same
  params. (Upstream reseeds or reads the global RNG, so its runs do not reproduce.)
* **No per-sample Python loop and no host synchronisation.** Upstream builds scale/rotate matrices
  one sample at a time in a Python list and calls ``.item()`` on a device tensor to pick the group;
  here the group is drawn from a CPU generator (no GPU sync) and every op is a handful of batched
  kernels whose number does not depend on the batch size: crop is one gather from a 1-pixel
  zero-padded copy, cutout a broadcast comparison mask, scale/rotate one batched ``grid_sample``.
  Every op also gives each sample the same bits whatever the batch size (means are fixed-tree sums,
  sampling grids are built elementwise), so micro-batches reproduce the full batch exactly.

Op groups (``strategy`` is any ``_``-joined subset, applied in the order written; ``"none"`` = identity):

=========  ===================================================================================
color      brightness ``x + (r - 0.5) * brightness``; then saturation
           ``(x - mean_c) * (r * saturation) + mean_c`` (mean over channels); then contrast
           ``(x - mean_chw) * (r + contrast) + mean_chw`` (three independent draws ``r ~ U[0, 1)``)
crop       integer translation ``out[i, j] = x[i + dy, j + dx]``, zero outside the image,
           ``dy ~ randint(-sh, sh + 1)``, ``sh = int(H * ratio_crop_pad + 0.5)`` (rows, drawn first),
           ``dx`` likewise with ``W`` (columns)
cutout     zero the window ``[oy - ch // 2, oy - ch // 2 + ch) x [ox - cw // 2, ox - cw // 2 + cw)``
           clipped to the image, ``ch = int(H * ratio_cutout + 0.5)``,
           ``oy ~ randint(0, H + 1 - ch % 2)`` (rows, drawn first), ``ox`` likewise with ``W``
flip       ``x.flip(3)`` (horizontal) where ``r < prob_flip``
scale      ``grid_sample(x, affine_grid([[sx, 0, 0], [0, sy, 0]]))``, ``sx, sy ~ U[1/s, s)``, ``s = ratio_scale``
rotate     ``grid_sample(x, affine_grid([[cos t, -sin t, 0], [sin t, cos t, 0]]))``,
           ``t ~ U[-ratio_rotate, ratio_rotate)`` degrees (positive = anticlockwise)
=========  ===================================================================================

``grid_sample`` is bilinear with zero padding and ``align_corners=True`` (upstream's settings). In mode
``"S"`` (upstream's default) one group is drawn uniformly per call, for the whole batch; every sample
gets its own values. In mode ``"M"`` every group of the strategy is applied, in order.

Equivalent PyTorch code (mode 'S', one call)::

    group = random.choice(config.groups)
    for op in {"color": [brightness, saturation, contrast]}.get(group, [group]):
        x = op(x)  # per-sample random values, as in the table above

The per-sample loop reference lives in :mod:`datm_fast.reference.augment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DSA_GROUPS",
    "DSAConfig",
    "DSAParams",
    "sample_dsa_params",
    "apply_dsa",
    "dsa",
]

#: Every op group, in upstream's order (``AUGMENT_FNS``).
DSA_GROUPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

# Per-sample tensor fields of DSAParams, in the order they are drawn. Each is None unless its group was drawn.
_TENSOR_FIELDS: tuple[str, ...] = ("brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate")

Index = Union[int, slice, Tensor, Sequence[int]]


@dataclass(frozen=True)
class DSAConfig:
    """DSA settings; the defaults are upstream's ``ParamDiffAug`` and DATM's ``dsa_strategy``.

    Example::

        cfg = DSAConfig()                                   # MTT/DATM default
        cfg = DSAConfig(strategy="crop_flip", mode="M")     # always crop, then flip
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"  # '_'-joined subset of DSA_GROUPS, or 'none'
    mode: Literal["S", "M"] = "S"  # S: one group drawn per call; M: all groups, in order
    brightness: float = 1.0  # additive offset range: (r - 0.5) * brightness
    saturation: float = 2.0  # saturation factor r * saturation, r ~ U[0, 1)
    contrast: float = 0.5  # contrast factor r + contrast, r ~ U[0, 1)
    ratio_crop_pad: float = 0.125  # max translation, as a fraction of the image side
    ratio_cutout: float = 0.5  # cutout side, as a fraction of the image side
    prob_flip: float = 0.5  # probability of a horizontal flip
    ratio_scale: float = 1.2  # sx, sy ~ U[1 / ratio_scale, ratio_scale)
    ratio_rotate: float = 15.0  # angle ~ U[-ratio_rotate, ratio_rotate) degrees

    def __post_init__(self) -> None:
        if self.mode not in ("S", "M"):
            raise ValueError(f"DSAConfig.mode must be 'S' or 'M', got {self.mode!r}")
        groups = self.groups  # validates the strategy
        if len(set(groups)) != len(groups):
            raise ValueError(f"DSAConfig.strategy repeats a group: {self.strategy!r}")
        if self.ratio_scale <= 0:
            raise ValueError(f"DSAConfig.ratio_scale must be > 0, got {self.ratio_scale}")
        if self.ratio_crop_pad < 0 or self.ratio_cutout < 0:
            raise ValueError("DSAConfig.ratio_crop_pad and ratio_cutout must be >= 0")

    @property
    def groups(self) -> tuple[str, ...]:
        """The strategy's op groups, in order; ``()`` for ``'none'`` or ``''``."""
        if self.strategy in ("", "none", "None"):
            return ()
        groups = tuple(self.strategy.split("_"))
        unknown = [g for g in groups if g not in DSA_GROUPS]
        if unknown:
            raise ValueError(f"DSAConfig.strategy has unknown group(s) {unknown}; known: {DSA_GROUPS}")
        return groups

    def crop_shift(self, height: int, width: int) -> tuple[int, int]:
        """Largest translation ``(rows, cols)``: ``int(side * ratio_crop_pad + 0.5)``."""
        return int(height * self.ratio_crop_pad + 0.5), int(width * self.ratio_crop_pad + 0.5)

    def cutout_size(self, height: int, width: int) -> tuple[int, int]:
        """Cutout window ``(rows, cols)``: ``int(side * ratio_cutout + 0.5)``."""
        return int(height * self.ratio_cutout + 0.5), int(width * self.ratio_cutout + 0.5)


@dataclass(frozen=True, eq=False)
class DSAParams:
    """One draw of DSA for a batch of ``batch_size`` images of ``height x width``.

    ``groups`` (host-side) are the op groups to apply, in order. Per-sample fields are ``None`` unless
    their group is in ``groups``; all live on one device (``B = batch_size``):

    - ``brightness``: ``(B,)`` float, additive offset ``(r - 0.5) * config.brightness``
    - ``saturation``: ``(B,)`` float, factor ``r * config.saturation``
    - ``contrast``: ``(B,)`` float, factor ``r + config.contrast``
    - ``crop``: ``(B, 2)`` int64 ``(dy, dx)``: ``out[:, i, j] = x[:, i + dy, j + dx]``, zero outside
    - ``cutout``: ``(B, 2)`` int64 window centres ``(oy, ox)``; the window side is ``cutout_size``
    - ``flip``: ``(B,)`` bool, flip horizontally where True
    - ``scale``: ``(B, 2)`` float ``(sx, sy)``: ``sx`` scales the x (width) coordinate
    - ``rotate``: ``(B,)`` float angle in radians, positive = anticlockwise

    Index it by sample (``params[i:j]``, ``params.select(index_tensor)``) for micro-batches, move it
    with ``params.to(device)``. Build one by hand with :func:`dataclasses.replace` on a drawn one, or
    with the constructor.
    """

    groups: tuple[str, ...]
    batch_size: int
    height: int
    width: int
    cutout_size: tuple[int, int] = (0, 0)
    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    crop: Tensor | None = None
    cutout: Tensor | None = None
    flip: Tensor | None = None
    scale: Tensor | None = None
    rotate: Tensor | None = None

    def __post_init__(self) -> None:
        needed = {
            "color": ("brightness", "saturation", "contrast"),
            "crop": ("crop",),
            "cutout": ("cutout",),
            "flip": ("flip",),
            "scale": ("scale",),
            "rotate": ("rotate",),
        }
        for g in self.groups:
            if g not in needed:
                raise ValueError(f"DSAParams: unknown group {g!r}")
            for name in needed[g]:
                t = getattr(self, name)
                if t is None:
                    raise ValueError(f"DSAParams: group {g!r} needs field {name!r}")
                if t.shape[0] != self.batch_size:
                    raise ValueError(f"DSAParams.{name} has {t.shape[0]} rows, batch_size is {self.batch_size}")

    def tensors(self) -> dict[str, Tensor]:
        """The per-sample tensor fields that are set, by name."""
        return {n: getattr(self, n) for n in _TENSOR_FIELDS if getattr(self, n) is not None}

    @property
    def device(self) -> torch.device | None:
        """Device of the per-sample tensors (None when there are none)."""
        ts = self.tensors()
        return next(iter(ts.values())).device if ts else None

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> DSAParams:
        """A copy with every per-sample tensor on ``device``."""
        moved = {n: t.to(device, non_blocking=non_blocking) for n, t in self.tensors().items()}
        return replace(self, **moved)

    def select(self, index: Index) -> DSAParams:
        """The params of samples ``index`` (an int, a slice, an index or bool-mask tensor, or a list).

        An int ``i`` selects a batch of one (``i:i+1``). ``apply_dsa(x[index], p.select(index))``
        equals ``apply_dsa(x, p)[index]`` bit for bit.
        """
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"sample {index} out of range for batch_size {self.batch_size}")
            index %= self.batch_size
            index = slice(index, index + 1)
        if isinstance(index, slice):
            n = len(range(*index.indices(self.batch_size)))
            picked = {name: t[index] for name, t in self.tensors().items()}
        else:
            idx = torch.as_tensor(index)
            if idx.dtype == torch.bool:
                if idx.shape != (self.batch_size,):
                    raise IndexError(f"bool mask of shape {tuple(idx.shape)} for batch_size {self.batch_size}")
            elif idx.dim() != 1 or idx.is_floating_point():
                raise IndexError("select: index tensor must be 1-d integer or bool")
            picked = {name: t[idx.to(t.device)] for name, t in self.tensors().items()}
            if picked:
                n = next(iter(picked.values())).shape[0]
            else:  # no tensors to take the length from: count on the host (identity params only)
                n = int(idx.count_nonzero()) if idx.dtype == torch.bool else idx.numel()
        return replace(self, batch_size=n, **picked)

    __getitem__ = select


def _host_choice(n: int, host_generator: torch.Generator | None) -> int:
    """Draw an int in ``[0, n)`` on the CPU: reading it back never waits for a GPU."""
    return int(torch.randint(0, n, (1,), generator=host_generator))


def sample_dsa_params(
    config: DSAConfig,
    batch_size: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    host_generator: torch.Generator | None = None,
    device: Union[str, torch.device] | None = None,
    dtype: torch.dtype = torch.float32,
) -> DSAParams:
    """Draw DSA params for a batch of ``batch_size`` images of ``height x width``.

    Args:
        config: the DSA settings.
        batch_size, height, width: the shape the params are for (``x.shape[0], x.shape[2], x.shape[3]``).
        generator: draws the per-sample values, on its own device. ``None`` uses PyTorch's default
            generator of ``device``.
        host_generator: a CPU generator that draws the group in mode 'S'. Defaults to ``generator``
            when that is a CPU generator (or ``None``: PyTorch's default CPU generator). Required in
            mode 'S' with a CUDA ``generator``, so that choosing the group never syncs the GPU.
        device: where the returned tensors live; defaults to the generator's device (values are
            drawn there and copied over if different).
        dtype: floating dtype of the float fields (applied in the input's dtype).

    Returns:
        A :class:`DSAParams`. Generators seeded alike give identical params.
    """
    if batch_size < 0 or height < 1 or width < 1:
        raise ValueError(f"sample_dsa_params: bad shape batch={batch_size} height={height} width={width}")
    if not dtype.is_floating_point:
        raise ValueError(f"sample_dsa_params: dtype must be floating, got {dtype}")
    groups = config.groups
    if config.mode == "S" and len(groups) > 1:
        if host_generator is None:
            if generator is not None and generator.device.type != "cpu":
                raise ValueError(
                    "sample_dsa_params: mode 'S' with a non-CPU generator needs host_generator (a CPU "
                    "torch.Generator) to draw the op group without syncing the device"
                )
            host_generator = generator
        elif host_generator.device.type != "cpu":
            raise ValueError(f"sample_dsa_params: host_generator must be a CPU generator, got {host_generator.device}")
        groups = (groups[_host_choice(len(groups), host_generator)],)

    gen_device = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    out_device = torch.device(device) if device is not None else gen_device
    b = batch_size

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype)

    def randint(low: int, high: int) -> Tensor:
        return torch.randint(low, high, (b,), generator=generator, device=gen_device, dtype=torch.int64)

    values: dict[str, Tensor] = {}
    cutout_size = (0, 0)
    for g in groups:
        if g == "color":
            values["brightness"] = (rand(b) - 0.5) * config.brightness
            values["saturation"] = rand(b) * config.saturation
            values["contrast"] = rand(b) + config.contrast
        elif g == "crop":
            sh, sw = config.crop_shift(height, width)
            values["crop"] = torch.stack([randint(-sh, sh + 1), randint(-sw, sw + 1)], dim=1)
        elif g == "cutout":
            cutout_size = config.cutout_size(height, width)
            ch, cw = cutout_size
            values["cutout"] = torch.stack([randint(0, height + 1 - ch % 2), randint(0, width + 1 - cw % 2)], dim=1)
        elif g == "flip":
            values["flip"] = rand(b) < config.prob_flip
        elif g == "scale":
            lo = 1.0 / config.ratio_scale
            sx = rand(b) * (config.ratio_scale - lo) + lo
            sy = rand(b) * (config.ratio_scale - lo) + lo
            values["scale"] = torch.stack([sx, sy], dim=1)
        elif g == "rotate":
            values["rotate"] = (rand(b) - 0.5) * (2 * config.ratio_rotate / 180 * math.pi)
    if out_device != gen_device:
        values = {n: t.to(out_device) for n, t in values.items()}
    return DSAParams(groups=groups, batch_size=b, height=height, width=width, cutout_size=cutout_size, **values)


# --- the ops: each takes x (B, C, H, W) and per-sample values on x's device -------------------------------


def _col(v: Tensor, x: Tensor) -> Tensor:
    """(B,) values as a (B, 1, 1, 1) column in x's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _fixed_order_sum(x: Tensor) -> Tensor:
    """Sum over the last dim in a fixed order made of elementwise adds: ``(..., N) -> (...)``.

    A reduction kernel splits its work by the number of outputs (on CPU above 32k elements, on CUDA
    at any size), so ``x.mean()`` of one sample can differ in the last bit between a batch and a
    micro-batch. Elementwise adds in a fixed order give the same bits for any batch size, so
    ``apply_dsa(x[i:j], params[i:j]) == apply_dsa(x, params)[i:j]`` holds exactly. With
    ``N = m * 2**k`` (``m`` odd), the ``m`` chunks are added in turn, then the ``2**k`` partial sums in a
    pairwise tree: CIFAR's 3 * 32 * 32 takes 2 + 10 small kernels. An ``m`` above 16 is padded to a
    power of two instead (adding zeros is exact).
    """
    n = x.shape[-1]
    p = n & -n  # largest power of two dividing n
    m = n // p
    if m > 16:
        p = 1 << (n - 1).bit_length()
        x, m = F.pad(x, (0, p - n)), 1
    x = x.reshape(*x.shape[:-1], m, p)
    acc = x[..., 0, :]
    for i in range(1, m):
        acc = acc + x[..., i, :]
    while p > 1:
        p //= 2
        acc = acc[..., :p] + acc[..., p:]
    return acc[..., 0]


def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x + _col(brightness, x)
    m = _fixed_order_sum(x.movedim(1, -1)).unsqueeze(1) / c  # mean over channels, (B, 1, H, W)
    x = (x - m) * _col(saturation, x) + m
    m = (_fixed_order_sum(x.reshape(b, c * h * w)) / (c * h * w)).view(b, 1, 1, 1)  # mean over C, H, W
    return (x - m) * _col(contrast, x) + m


def _crop(x: Tensor, shift: Tensor) -> Tensor:
    # One gather from a 1-pixel zero-padded copy: every source index outside the image is clamped onto
    # the padding (as upstream does), so pixels shifted in from beyond the border are exactly 0.
    b, c, h, w = x.shape
    shift = shift.to(x.device)
    rows = (torch.arange(h, device=x.device) + shift[:, :1] + 1).clamp_(0, h + 1)  # (B, H) padded rows
    cols = (torch.arange(w, device=x.device) + shift[:, 1:] + 1).clamp_(0, w + 1)  # (B, W) padded cols
    flat = (rows.unsqueeze(2) * (w + 2) + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
    xp = F.pad(x, (1, 1, 1, 1)).flatten(2)  # (B, C, (H+2)(W+2))
    return xp.gather(2, flat).view(b, c, h, w)


def _cutout(x: Tensor, centre: Tensor, size: tuple[int, int]) -> Tensor:
    # Upstream clamps each window index into the image and zeroes those pixels; the clamped window is
    # the window clipped to the image (it always overlaps the image for the offsets drawn), so a
    # comparison mask gives the same pixels. Multiply rather than mask-fill, as upstream does.
    b, c, h, w = x.shape
    centre = centre.to(x.device)
    top = centre[:, :1] - size[0] // 2  # (B, 1)
    left = centre[:, 1:] - size[1] // 2
    r = torch.arange(h, device=x.device)
    q = torch.arange(w, device=x.device)
    in_rows = (r >= top) & (r < top + size[0])  # (B, H)
    in_cols = (q >= left) & (q < left + size[1])  # (B, W)
    keep = ~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))  # (B, H, W)
    return x * keep.unsqueeze(1).to(x.dtype)


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def _base_coords(n: int, x: Tensor) -> Tensor:
    # affine_grid's normalised pixel centres with align_corners=True: linspace(-1, 1, n); 0 when n == 1.
    if n == 1:
        return torch.zeros(1, dtype=x.dtype, device=x.device)
    return torch.linspace(-1.0, 1.0, n, dtype=x.dtype, device=x.device)


def _affine(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """``grid_sample(x, affine_grid([[a, b, 0], [c, d, 0]]))`` per sample; ``a..d`` are ``(B,)`` in x's dtype.

    The grid is built with elementwise ops (``gx = a X + b Y``, ``gy = c X + d Y``) rather than
    ``F.affine_grid``, whose batched matmul may pick a different kernel (and summation order) for a
    different batch size; this way micro-batches reproduce the batch bit for bit.
    """
    _, _, h, w = x.shape
    gx = _base_coords(w, x).view(1, 1, w)  # X varies along the width
    gy = _base_coords(h, x).view(1, h, 1)  # Y varies along the height
    a, b, c, d = (t.view(-1, 1, 1) for t in (a, b, c, d))
    grid = torch.stack([a * gx + b * gy, c * gx + d * gy], dim=-1)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: Tensor, scale: Tensor) -> Tensor:
    s = scale.to(device=x.device, dtype=x.dtype)
    z = torch.zeros_like(s[:, 0])
    return _affine(x, s[:, 0], z, z, s[:, 1])


def _rotate(x: Tensor, angle: Tensor) -> Tensor:
    t = angle.to(device=x.device, dtype=x.dtype)
    cos, sin = torch.cos(t), torch.sin(t)
    return _affine(x, cos, -sin, sin, cos)


def apply_dsa(x: Tensor, params: DSAParams) -> Tensor:
    """Apply drawn DSA params to images ``x`` of shape ``(B, C, H, W)``; returns ``(B, C, H, W)``.

    Differentiable in ``x``; deterministic (same ``x`` and ``params`` give a bit-identical output).
    Params on another device are moved to ``x``'s. With no groups, returns ``x`` itself.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_dsa: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if (b, h, w) != (params.batch_size, params.height, params.width):
        raise ValueError(
            f"apply_dsa: x has batch {b} and size {h}x{w}, params are for batch {params.batch_size} "
            f"and size {params.height}x{params.width}"
        )
    if not params.groups:
        return x
    for g in params.groups:
        if g == "color":
            x = _color(x, params.brightness, params.saturation, params.contrast)  # type: ignore[arg-type]
        elif g == "crop":
            x = _crop(x, params.crop)  # type: ignore[arg-type]
        elif g == "cutout":
            x = _cutout(x, params.cutout, params.cutout_size)  # type: ignore[arg-type]
        elif g == "flip":
            x = _flip(x, params.flip)  # type: ignore[arg-type]
        elif g == "scale":
            x = _scale(x, params.scale)  # type: ignore[arg-type]
        elif g == "rotate":
            x = _rotate(x, params.rotate)  # type: ignore[arg-type]
    return x.contiguous()


def dsa(
    x: Tensor,
    config: DSAConfig,
    *,
    generator: torch.Generator | None = None,
    host_generator: torch.Generator | None = None,
) -> Tensor:
    """Draw params for ``x`` (``(B, C, H, W)``) and apply them: upstream's ``DiffAugment(x, strategy, param=...)``.

    Values are drawn with ``generator`` (in ``x``'s floating dtype, at least float32) and moved to
    ``x``'s device; see :func:`sample_dsa_params` for ``host_generator``. To replay, draw with
    :func:`sample_dsa_params` and keep the params instead.
    """
    if x.dim() != 4:
        raise ValueError(f"dsa: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    params = sample_dsa_params(
        config,
        x.shape[0],
        x.shape[2],
        x.shape[3],
        generator=generator,
        host_generator=host_generator,
        device=x.device,
        dtype=dtype,
    )
    return apply_dsa(x, params)
