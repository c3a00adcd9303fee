"""The data contract: which data a run used, and the space its images live in, in one record.

A :class:`DataSpec` names a dataset, where it is, its long-tail and subset draws and its preprocessing
(with the preprocessing's parameters), and :meth:`DataSpec.load` rebuilds exactly that data, always in
the same order: load -> long tail -> subset -> fit the preprocessing on the train split that is left ->
apply it to every split. Every stage writes its spec where its output lives (a buffer's
``manifest.json``, a run's ``run.json``) and every later command (distill, eval, report, resume) loads
the data from it, so that a set is always tested in the space it was distilled in.

Example::

    spec = DataSpec("cifar10", root="../shared/data", preprocessing="zca", max_train=500, max_test=1000)
    data, transform = spec.load()          # ZCA fitted on the 500 train images drawn
    DataSpec.from_json(spec.to_json()) == spec
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Union

from ._dataset import ImageDataset
from .loading import _looks_like_path, load_dataset
from .longtail import long_tailed
from .subset import subset_dataset
from .transforms import TRANSFORMS, Transform, preprocess

__all__ = ["DataSpec"]

PathLike = Union[str, "os.PathLike[str]"]
Preprocessing = Literal["zca", "normalize", "none"]


def _absolute(path: PathLike) -> str:
    return str(Path(path).expanduser().resolve())


def _whole(name: str, value: object, minimum: int, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        null = " or None" if optional else ""
        raise ValueError(f"DataSpec.{name} must be an int >= {minimum}{null}, got {value!r}")


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides which images a run sees and in which space.

    Attributes:
        dataset: a name or path that :func:`datm_fast.data.load_dataset` resolves (``"cifar10"``,
            ``"digits"``, ``"data/x.npz"``); a relative path is made absolute.
        root: the folder dataset names resolve against (made absolute), or None.
        preprocessing: ``"zca"``, ``"normalize"`` or ``"none"``, fitted on the train split as drawn.
        zca_eps: the ZCA regulariser (DATM: 0.1).
        long_tail: imbalance factor of a long-tailed train split (None: as it is).
        max_train, max_test: random subsets of at most this many images (None: the whole split).
        seed: seeds the long-tail and subset draws.
    """

    dataset: str
    root: str | None = None
    preprocessing: Preprocessing = "zca"
    zca_eps: float = 0.1
    long_tail: float | None = None
    max_train: int | None = None
    max_test: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.dataset, os.PathLike):
            object.__setattr__(self, "dataset", os.fspath(self.dataset))
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError(f"DataSpec.dataset must be a dataset name or path, got {self.dataset!r}")
        if self.root is not None:
            object.__setattr__(self, "root", _absolute(self.root))
        if _looks_like_path(self.dataset) and not Path(self.dataset).expanduser().is_absolute():
            base = Path(self.root) if self.root is not None else Path.cwd()
            object.__setattr__(self, "dataset", _absolute(base / self.dataset))
        if self.preprocessing not in TRANSFORMS:
            raise ValueError(
                f"DataSpec.preprocessing must be one of {', '.join(map(repr, TRANSFORMS))}, got {self.preprocessing!r}"
            )
        eps = self.zca_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"DataSpec.zca_eps must be a positive number, got {eps!r}")
        lt = self.long_tail
        if lt is not None and (isinstance(lt, bool) or not isinstance(lt, numbers.Real) or not lt >= 1):
            raise ValueError(f"DataSpec.long_tail must be None or a number >= 1, got {lt!r}")
        _whole("max_train", self.max_train, 1, optional=True)
        _whole("max_test", self.max_test, 1, optional=True)
        _whole("seed", self.seed, 0, optional=False)

    def load(
        self, *, root: PathLike | None = None, cache_dir: PathLike | None = None
    ) -> tuple[ImageDataset, Transform]:
        """The data this spec names, preprocessed: ``(dataset, transform)`` (``transform.inverse`` maps back).

        ``root`` overrides the recorded root (the data moved); ``cache_dir``: decoded pixels and fitted
        transforms (default ``datm_fast.utils.default_cache_dir()``).
        """
        ds = load_dataset(self.dataset, root=root if root is not None else self.root, cache_dir=cache_dir)
        if self.long_tail is not None:
            ds = long_tailed(ds, self.long_tail, seed=self.seed)
        ds = subset_dataset(ds, self.max_train, self.max_test, seed=self.seed)
        return preprocess(ds, self.preprocessing, eps=self.zca_eps, cache_dir=cache_dir)

    def replace(self, **changes: Any) -> DataSpec:
        """A copy with some fields changed, checked again."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict; :meth:`from_json` reads it back to an equal spec."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, source: str = "the record") -> DataSpec:
        """Read a :meth:`to_json` dict; ``ValueError`` naming ``source`` for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a data spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown data spec keys {unknown} (known: {sorted(known)})")
        if "dataset" not in data:
            raise ValueError(f"{source}: the data spec has no 'dataset'")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e
