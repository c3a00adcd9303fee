"""Distilled sets on disk: upstream's ``images_*.pt`` / ``labels_*.pt`` / ``lr_*.pt`` and our run directories.

A **run directory** holds, for a tag (``best`` unless said otherwise):

=====================  ===========================================================================
``images_<tag>.pt``    ``(N, C, H, W)`` float tensor, in the preprocessed space (ZCA or normalised)
``labels_<tag>.pt``    ``(N,)`` integer class indices or ``(N, C)`` float logits (DATM's learned labels)
``lr_<tag>.pt``        the learned lr: a 0-d or one-element tensor (or a Python float)
``run.json``           optional: ``{"dataset": ..., "preprocessing": ..., "model": ...}`` (:class:`RunInfo`)
=====================  ===========================================================================

These are upstream DATM's file names, so an upstream ``logged_files/.../Normal`` folder is a run
directory without ``run.json`` (and a folder whose ``Normal/`` subfolder holds the files works too).
Files are read with ``torch.load(..., weights_only=True)``: no code from the file runs.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from ..data import ImageDataset, load_dataset, long_tailed, preprocess
from ..utils import atomic_write

__all__ = [
    "PREPROCESSING",
    "RUN_INFO_FILE",
    "RunInfo",
    "SyntheticSet",
    "find_synset_files",
    "load_eval_dataset",
    "load_run_dir",
    "load_synset",
    "read_run_info",
    "write_run_info",
]

PathLike = Union[str, "os.PathLike[str]"]

RUN_INFO_FILE = "run.json"
PREPROCESSING: tuple[str, ...] = ("zca", "normalize", "none")


# ----- run.json -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What a run directory's ``run.json`` says about the data a set was distilled from.

    Attributes:
        dataset: a name or path that :func:`datm_fast.data.load_dataset` resolves (``"cifar10"``).
        preprocessing: ``"zca"``, ``"normalize"`` or ``"none"``: the space the images live in; the
            test split is put in the same space (fitted on the train split) before testing.
        model: the network the set was distilled with (the default evaluation model).
        zca_eps: the ZCA regulariser (DATM: 0.1).
        long_tail: imbalance factor of a long-tailed train split (None: balanced). The ZCA is fitted on
            the train split the set was distilled from, so it matters even though the test split is balanced.
        long_tail_seed: seed of the long-tail subsampling.
        ipc: images per class, if known (informative only).

    Unknown keys in ``run.json`` are ignored (the distillation engine may record its whole config there).
    """

    dataset: str
    preprocessing: str = "zca"
    model: str = "ConvNet"
    zca_eps: float = 0.1
    long_tail: float | None = None
    long_tail_seed: int = 0
    ipc: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"RunInfo.dataset must be a dataset name or path, got {self.dataset!r}")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"RunInfo.preprocessing must be one of {PREPROCESSING}, got {self.preprocessing!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"RunInfo.model must be a network name, got {self.model!r}")
        if isinstance(self.zca_eps, bool) or not isinstance(self.zca_eps, numbers.Real) or not self.zca_eps > 0:
            raise ValueError(f"RunInfo.zca_eps must be a positive number, got {self.zca_eps!r}")
        if self.long_tail is not None and (
            isinstance(self.long_tail, bool) or not isinstance(self.long_tail, numbers.Real) or self.long_tail < 1
        ):
            raise ValueError(f"RunInfo.long_tail must be None or a number >= 1, got {self.long_tail!r}")
        if isinstance(self.long_tail_seed, bool) or not isinstance(self.long_tail_seed, int):
            raise ValueError(f"RunInfo.long_tail_seed must be an int, got {self.long_tail_seed!r}")
        if self.ipc is not None and (isinstance(self.ipc, bool) or not isinstance(self.ipc, int) or self.ipc < 1):
            raise ValueError(f"RunInfo.ipc must be None or an int >= 1, got {self.ipc!r}")

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, source: str = "run.json") -> RunInfo:
        """Build from a parsed ``run.json``; unknown keys are ignored. ``ValueError`` names ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        if "dataset" not in data:
            raise ValueError(f"{source}: missing key 'dataset' (a dataset name such as 'cifar10')")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e


def read_run_info(directory: PathLike) -> RunInfo | None:
    """``directory/run.json`` as a :class:`RunInfo`, or None when there is no such file."""
    path = Path(directory) / RUN_INFO_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from e
    return RunInfo.from_json(data, str(path))


def write_run_info(directory: PathLike, info: RunInfo, **extra: Any) -> Path:
    """Write ``directory/run.json`` atomically: ``info``'s fields plus any JSON-ready ``extra`` keys."""
    path = Path(directory) / RUN_INFO_FILE
    overlap = set(extra) & set(info.to_json())
    if overlap:
        raise ValueError(f"write_run_info: extra keys {sorted(overlap)} collide with RunInfo fields")
    with atomic_write(path, "w") as f:
        json.dump({**info.to_json(), **extra}, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


# ----- the set ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class SyntheticSet:
    """A distilled set as stored: ``images`` ``(N, C, H, W)`` float32, ``labels`` ``(N,)`` int64 or
    ``(N, K)`` float32 logits, the learned ``lr`` (None when no lr file was given) and where it came from."""

    images: Tensor
    labels: Tensor
    lr: float | None = None
    source: str = ""

    @property
    def soft(self) -> bool:
        """True for logit labels (soft cross-entropy), False for class indices."""
        return self.labels.dim() == 2

    @property
    def num_images(self) -> int:
        """N."""
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        kind = f"logits {tuple(self.labels.shape)}" if self.soft else f"indices {tuple(self.labels.shape)}"
        return f"SyntheticSet(images={tuple(self.images.shape)}, labels={kind}, lr={self.lr}, source={self.source!r})"


def _load(path: Path, what: str) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, non-tensor payloads refused by weights_only, truncated files
        raise ValueError(f"{path}: cannot read {what} with torch.load(weights_only=True): {e}") from e


def load_synset(images: PathLike, labels: PathLike, lr: PathLike | None = None) -> SyntheticSet:
    """Read a set from upstream-format files.

    Args:
        images: ``images_*.pt``: an ``(N, C, H, W)`` float tensor.
        labels: ``labels_*.pt``: ``(N,)`` integer class indices or ``(N, C)`` float logits.
        lr: ``lr_*.pt``: a 0-d / one-element tensor or a number; optional.

    Raises ``ValueError`` (or ``FileNotFoundError``) naming the file and what was expected: a missing
    file, a payload that is not a tensor, wrong dimensions, a label count that differs from the image
    count, NaN values, a non-positive lr.
    """
    ipath, lpath = Path(images), Path(labels)
    x = _load(ipath, "images")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{ipath}: expected a non-empty float (N, C, H, W) tensor of images, got {got}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{ipath}: images contain NaN or infinite values")
    y = _load(lpath, "labels")
    if not isinstance(y, Tensor):
        raise ValueError(f"{lpath}: expected a tensor of labels, got {type(y).__name__}")
    n = x.shape[0]
    if y.dim() == 2 and y.is_floating_point():
        if y.shape[0] != n:
            raise ValueError(f"{lpath}: {y.shape[0]} label rows for {n} images in {ipath}; expected ({n}, C) logits")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{lpath}: label logits contain NaN or infinite values")
        y = y.detach().float()
    elif y.dim() == 1 and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool:
        if y.shape[0] != n:
            raise ValueError(f"{lpath}: {y.shape[0]} labels for {n} images in {ipath}; expected ({n},) class indices")
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"{lpath}: negative class index {int(y.min())}")
        y = y.detach().long()
    else:
        raise ValueError(
            f"{lpath}: expected ({n},) integer class indices or ({n}, C) float logits, got {y.dtype} {tuple(y.shape)}"
        )
    lr_value: float | None = None
    if lr is not None:
        lp = Path(lr)
        v = _load(lp, "lr")
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"{lp}: expected a scalar lr, got a tensor of shape {tuple(v.shape)}")
            v = float(v.detach().reshape(()).double())
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{lp}: expected a scalar lr (tensor or number), got {type(v).__name__}")
        lr_value = float(v)
        if not math.isfinite(lr_value) or lr_value <= 0:
            raise ValueError(f"{lp}: the learned lr is {lr_value}; it must be positive and finite")
    return SyntheticSet(x.detach().float().contiguous(), y, lr_value, str(ipath))


def find_synset_files(directory: PathLike, tag: str = "best") -> tuple[Path, Path, Path | None]:
    """``(images, labels, lr or None)`` paths of tag ``tag`` in a run directory (or its ``Normal/``)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: run directory not found")
    for base in (d, d / "Normal"):
        images, labels, lr = (base / f"{p}_{tag}.pt" for p in ("images", "labels", "lr"))
        if images.is_file():
            if not labels.is_file():
                raise FileNotFoundError(f"{labels}: labels file not found (beside {images.name})")
            return images, labels, lr if lr.is_file() else None
    tags = sorted({p.stem[len("images_") :] for base in (d, d / "Normal") for p in base.glob("images_*.pt")})
    hint = f"; tags present: {', '.join(tags)}" if tags else "; no images_*.pt files at all"
    raise FileNotFoundError(f"{d}: no images_{tag}.pt (expected images_{tag}.pt, labels_{tag}.pt, lr_{tag}.pt{hint})")


def load_run_dir(directory: PathLike, tag: str = "best") -> tuple[SyntheticSet, RunInfo | None]:
    """The set of tag ``tag`` in a run directory, and its ``run.json`` (None if absent)."""
    images, labels, lr = find_synset_files(directory, tag)
    return load_synset(images, labels, lr), read_run_info(directory)


# ----- the data to test on ----------------------------------------------------------------------
def load_eval_dataset(
    info: RunInfo,
    data_root: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
) -> ImageDataset:
    """The dataset ``info`` names, in ``info.preprocessing`` (fitted on its train split), ready for testing.

    Loads with :func:`datm_fast.data.load_dataset` (decoded pixels and fitted transforms are cached
    under ``cache_dir``), applies the long-tail subsampling if any (the ZCA is fitted on that train
    split), then :func:`datm_fast.data.preprocess`.
    """
    ds = load_dataset(info.dataset, root=data_root, cache_dir=cache_dir)
    if info.long_tail is not None:
        ds = long_tailed(ds, info.long_tail, seed=info.long_tail_seed)
    processed, _ = preprocess(ds, info.preprocessing, eps=info.zca_eps, cache_dir=cache_dir)  # type: ignore[arg-type]
    return processed
