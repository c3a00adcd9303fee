"""A distillation run's directory: the one owner of its file names, of what is written there and of the
checks on what is read back.

========================  ==========================================================================
``config.yaml``           the config that ran (flat keys, :meth:`DistillConfig.to_yaml`)
``run.json``              :class:`RunRecord`: the data (a :class:`~datm_fast.data.DataSpec`), model, ipc
``metrics.jsonl``         one JSON row per iteration (loss, lr, start epoch, skipped, seconds, memory, eval)
``checkpoint.pt``         the loop's state, to resume
``images_<tag>.pt``       a set, in upstream DATM's names and layouts: ``(N, C, H, W)`` images in the
``labels_<tag>.pt``       preprocessed space, ``(N, K)`` label logits (or ``(N,)`` class indices), and the
``lr_<tag>.pt``           learned lr; tags: ``best``, and the iteration of each checkpoint
``images_best.png``       the best set as pictures (whitening undone), ``images_latest.png`` the last one
``eval_<tag>.json``       evaluations of a set (``datm-fast eval``)
``eval_best_vs_random_real.json``  the kept set beside random real subsets of its size (the pipelines)
``report.md``             ``datm-fast report`` (with ``curves.png``)
``failure.txt``           why the run stopped without a result (its set diverged, or no update applied)
``tensorboard/``          TensorBoard's event files, when asked for (``wandb_run_id.txt``: wandb's run)
========================  ==========================================================================

A run directory belongs to one run. :meth:`RunDir.start` opens it for a run: it refuses a directory
that holds another run's files unless the run resumes (``--resume``) or starts again (``--overwrite``,
which clears it), refuses a second writer while one holds the directory's lock (a lock left by a
killed process is taken over), and finds a read-only place or a full disk before any work. The
checkpoint carries its sha256: a damaged one is refused by name, and every tensor in it must be
finite.

An upstream ``logged_files/.../Normal`` folder is a run directory without ``run.json`` (and a folder
whose ``Normal/`` subfolder holds the sets works too). Tensors are read with
``torch.load(..., weights_only=True)``: no code from a file runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from ..data import DataSpec, Transform
from ..utils import DirectoryLocked, atomic_write, check_writable, exclusive_lock
from ..viz import save_image_grid
from .config import DistillConfig, load_config

__all__ = ["Metrics", "RunDir", "RunDirError", "RunRecord", "SyntheticSet", "load_synset", "read_metrics"]

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINT_FORMAT = "datm_fast.distill.checkpoint/1"
# checkpoint.pt: this line, the sha256 of the rest (hex) and a newline, then torch.save's bytes.
_CHECKPOINT_MAGIC = b"datm_fast checkpoint sha256 "


class RunDirError(ValueError):
    """A run directory that cannot be used as asked: another run's files, another writer, a damaged
    checkpoint. The message names the directory or the file and what to do."""


# ----- run.json -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """What ``run.json`` says about a run: the data its set lives in, the network, the set's size.

    ``data`` is None for a run distilled from an in-memory dataset that no :class:`DataSpec` describes
    (then ``datm-fast eval`` needs ``--dataset``).
    """

    data: DataSpec | None
    model: str = "ConvNet"
    ipc: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"data": None if self.data is None else self.data.to_json(), "model": self.model, "ipc": self.ipc}

    @classmethod
    def from_json(cls, raw: object, source: str) -> RunRecord:
        """Read ``run.json``; also the flat layout of datm_fast before 2026-12-04 (dataset, preprocessing,
        zca_eps, long_tail, long_tail_seed, model, ipc). ``ValueError`` naming ``source``."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        if "data" in raw:
            data = None if raw["data"] is None else DataSpec.from_json(raw["data"], source)
        elif "dataset" in raw:
            old = {"dataset", "preprocessing", "zca_eps", "long_tail"}
            data = DataSpec.from_json(
                {**{k: raw[k] for k in old if k in raw}, "seed": raw.get("long_tail_seed", 0)}, source
            )
        else:
            raise ValueError(f"{source}: no 'data' (which data the set was distilled from)")
        model, ipc = raw.get("model", "ConvNet"), raw.get("ipc")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{source}: 'model' must be a network name, got {model!r}")
        if ipc is not None and (isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1):
            raise ValueError(f"{source}: 'ipc' must be null or an int >= 1, got {ipc!r}")
        return cls(data, model, ipc)


# ----- sets ---------------------------------------------------------------------------------------
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


# ----- metrics.jsonl ------------------------------------------------------------------------------
@dataclass
class Metrics:
    """The rows of a ``metrics.jsonl``, one per iteration, sorted by iteration.

    Attributes:
        rows: the parsed rows (dicts with at least ``iteration``); for an iteration logged twice, the last.
        bad_lines: 1-based line numbers that are not a JSON object with an integer ``iteration``.
        partial_last: the last line is bad and has no newline: the half-written line of a killed run.
    """

    rows: list[dict[str, Any]]
    bad_lines: list[int] = field(default_factory=list)
    partial_last: bool = False

    @property
    def eval_rows(self) -> list[dict[str, Any]]:
        """Rows with an evaluation (``eval_mean`` a finite number)."""
        return [r for r in self.rows if _finite(r.get("eval_mean"))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: PathLike) -> Metrics:
    """Parse ``metrics.jsonl``, tolerating a half-written last line (a killed run) and other bad lines.

    ``NaN`` and ``Infinity`` losses (what ``json.dumps`` writes for a non-finite loss) are read as floats.
    Raises ``ValueError`` naming ``path`` when it cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    lines = text.split("\n")
    by_iteration: dict[int, dict[str, Any]] = {}
    bad: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        it = row.get("iteration") if isinstance(row, dict) else None
        if isinstance(it, bool) or not isinstance(it, int):
            bad.append(number)
            continue
        by_iteration[it] = row
    # text.split("\n") ends with "" when the file ends in a newline; otherwise the last element is unterminated
    partial_last = bool(bad) and bad[-1] == len(lines) and not text.endswith("\n")
    return Metrics(rows=[by_iteration[k] for k in sorted(by_iteration)], bad_lines=bad, partial_last=partial_last)


# ----- the directory ------------------------------------------------------------------------------
class RunDir:
    """The files of one run directory (see the module docstring): their names, writes and checks.

    Every write is atomic (:func:`datm_fast.utils.atomic_write`) except the metrics file, which is
    appended to line by line and truncated back to the last checkpoint on resume.
    """

    CONFIG = "config.yaml"
    RECORD = "run.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    REPORT = "report.md"
    TENSORBOARD = "tensorboard"
    WANDB_ID = "wandb_run_id.txt"  # the wandb run a resumed run continues
    FAILURE = "failure.txt"  # why the run stopped without a result (DistillationFailed), while it stands

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._lock: Any = None
        self._created = False

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # ----- ownership --------------------------------------------------------------------------------
    def run_files(self) -> list[str]:
        """The names of what the directory holds (its lock aside), sorted; [] for a new or empty one."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != ".lock")

    @property
    def started(self) -> bool:
        """Whether this object holds the directory for a run (:meth:`start` until :meth:`finish`)."""
        return self._lock is not None

    def start(self, config: DistillConfig | None = None, *, resume: bool, overwrite: bool = False) -> RunDir:
        """Take the directory for one run, before any work: writable, written by no other process and,
        unless the run resumes, holding no other run's files (``overwrite=True`` deletes them first).
        A resume needs a checkpoint and, given ``config``, a config that computes what the run's
        ``config.yaml`` does (:meth:`config_differences`).

        Raises :class:`RunDirError` (another run's files, another writer, nothing to resume, another
        config) or ``OSError`` (a read-only place, a full disk), each naming the directory. Returns the
        run directory, a context manager that calls :meth:`finish` on exit.
        """
        if resume and overwrite:
            raise RunDirError(f"{self.path}: resume and overwrite exclude each other")
        if self.started:
            raise RunDirError(f"{self.path}: already started by this process")
        created = not self.path.exists()
        check_writable(self.path)
        try:
            self._lock = exclusive_lock(self.path, "run directory")
        except DirectoryLocked as exc:
            raise RunDirError(str(exc)) from None
        self._created = created
        try:
            present = self.run_files()
            if resume:
                if not self.has_checkpoint():
                    raise RunDirError(f"{self.path}: nothing to resume: no {self.CHECKPOINT} here")
                if config is not None:
                    self.check_resumable(config)
            elif present and not overwrite:
                shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
                raise RunDirError(
                    f"{self.path}: holds a run already ({shown}); --resume continues it, --overwrite deletes it and "
                    "starts again, or choose another --out"
                )
            elif present:
                for name in present:
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        except BaseException:
            self.finish()
            raise
        return self

    def finish(self) -> None:
        """Release the directory's lock (idempotent). A directory :meth:`start` created and nothing was
        written to is removed again: a run refused before its first write leaves no trace."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        if self._created and not self.run_files():
            (self.path / ".lock").unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:  # something appeared meanwhile: keep it
                pass
        lock.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def read_config(self) -> DistillConfig | None:
        """``config.yaml``: the config the run computes; None when there is none. Its warnings (ignored
        upstream keys) were shown when the run started and are not repeated."""
        path = self.file(self.CONFIG)
        if not path.is_file():
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return load_config(path)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{path}: not a readable run config ({exc})") from None

    def config_differences(self, config: DistillConfig) -> list[str] | None:
        """The keys in which ``config`` computes something else than the run here, as ``"key (old -> new)"``:
        every key but the placement keys (device, backend, micro-batch, ...) and ``iterations`` (a longer
        run goes on as it was). None when the directory holds no config."""
        started = self.read_config()
        if started is None:
            return None
        old, new = started.to_dict(), config.to_dict()
        return [f"{k} ({old[k]!r} -> {new[k]!r})" for k in config.differences(started) if k != "iterations"]

    def check_resumable(self, config: DistillConfig) -> None:
        """:class:`RunDirError` naming each key in which ``config`` computes something else than the run
        here (:meth:`config_differences`), or when the directory says nothing of what it computes."""
        differ = self.config_differences(config)
        if differ is None:
            raise RunDirError(f"{self.path}: cannot resume: no {self.CONFIG} says what the run computes")
        if differ:
            raise RunDirError(
                f"{self.path}: the run was started with another config: {', '.join(differ)}; resume with its config "
                "(placement keys such as device, backend and micro_batch may change) or start another run"
            )

    # ----- names ------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """The path of ``name`` (one of the class's names) in the directory."""
        return self.path / name

    def set_files(self, tag: str) -> tuple[Path, Path, Path]:
        """``images_<tag>.pt``, ``labels_<tag>.pt``, ``lr_<tag>.pt``."""
        return tuple(self.path / f"{kind}_{tag}.pt" for kind in ("images", "labels", "lr"))  # type: ignore[return-value]

    def grid(self, tag: str) -> Path:
        """``images_<tag>.png``: a set as pictures."""
        return self.path / f"images_{tag}.png"

    def eval_results(self, tag: str) -> Path:
        """``eval_<tag>.json``: evaluations of the set ``tag``."""
        return self.path / f"eval_{tag}.json"

    def comparison_results(self) -> Path:
        """``eval_best_vs_random_real.json``: the kept set and random real subsets of the same IPC, on one
        protocol (what quickstart and reproduce report)."""
        return self.path / "eval_best_vs_random_real.json"

    def eval_files(self) -> list[Path]:
        """Every ``eval_*.json``, sorted by name."""
        return sorted(self.path.glob("eval_*.json"))

    # ----- the config and the record ----------------------------------------------------------------
    def write_config(self, config: Any) -> Path:
        """Write ``config.yaml`` (a :class:`~datm_fast.distill.DistillConfig`)."""
        path = self.file(self.CONFIG)
        config.to_yaml(path)
        return path

    def write_record(self, record: RunRecord) -> Path:
        """Write ``run.json``."""
        path = self.file(self.RECORD)
        with atomic_write(path, "w") as f:
            json.dump(record.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    def read_record(self) -> RunRecord | None:
        """``run.json`` as a :class:`RunRecord`, or None when there is none."""
        path = self.file(self.RECORD)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not readable as JSON ({e})") from e
        return RunRecord.from_json(raw, str(path))

    # ----- a failed run -------------------------------------------------------------------------------
    def record_failure(self, message: str) -> None:
        """Say in ``failure.txt`` why the run stopped without a result (the report shows it first)."""
        with atomic_write(self.file(self.FAILURE), "w") as f:
            f.write(message.rstrip() + "\n")

    def clear_failure(self) -> None:
        """A run that goes on (resumed, or started again) is no longer failed."""
        self.file(self.FAILURE).unlink(missing_ok=True)

    def failure(self) -> str | None:
        """Why the run failed, or None."""
        path = self.file(self.FAILURE)
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    # ----- sets ---------------------------------------------------------------------------------------
    def save_set(self, tag: str, images: Tensor, labels: Tensor, lr: float) -> None:
        """Write the set ``tag`` in upstream's names and layouts."""
        for path, value in zip(self.set_files(tag), (images, labels, torch.tensor(float(lr)))):
            with atomic_write(path) as f:
                torch.save(value.detach().cpu(), f)

    def find_set(self, tag: str = "best") -> tuple[Path, Path, Path | None]:
        """``(images, labels, lr or None)`` of ``tag``, here or in ``Normal/`` (upstream's layout)."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: run directory not found")
        for base in (self.path, self.path / "Normal"):
            images, labels, lr = RunDir(base).set_files(tag)
            if images.is_file():
                if not labels.is_file():
                    raise FileNotFoundError(f"{labels}: labels file not found (beside {images.name})")
                return images, labels, lr if lr.is_file() else None
        tags = sorted(
            {p.stem[len("images_") :] for base in (self.path, self.path / "Normal") for p in base.glob("images_*.pt")}
        )
        hint = f"; tags present: {', '.join(tags)}" if tags else "; no images_*.pt files at all"
        raise FileNotFoundError(
            f"{self.path}: no images_{tag}.pt (expected images_{tag}.pt, labels_{tag}.pt, lr_{tag}.pt{hint})"
        )

    def load_set(self, tag: str = "best") -> SyntheticSet:
        """The set ``tag``, checked (see :func:`load_synset`)."""
        return load_synset(*self.find_set(tag))

    def save_grid(self, tag: str, images: Tensor, transform: Transform | None, ipc: int) -> Path:
        """The set as pictures, ``images_<tag>.png``: one row per class (at most 10 images per row),
        the preprocessing undone, thumbnails of at least 64 px."""
        x = images.detach().cpu()
        if transform is not None:
            x = transform.inverse(x)
        per_row = min(ipc, 10)
        k = len(x) // ipc
        shown = torch.cat([x[c * ipc : c * ipc + per_row] for c in range(min(k, 100))])
        # 8 px digits x8, 32 px CIFAR x2, 64 px Tiny ImageNet as they are.
        return save_image_grid(shown, self.grid(tag), nrow=per_row, scale=max(1, 64 // x.shape[-1]))

    # ----- metrics ------------------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl`` (flushed: a killed run loses at most the line being written)."""
        with self.file(self.METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> Metrics:
        """``metrics.jsonl`` (see :func:`read_metrics`)."""
        return read_metrics(self.file(self.METRICS))

    def truncate_metrics(self, next_iteration: int) -> None:
        """Drop rows a killed run logged after its last checkpoint: they will be computed again."""
        path = self.file(self.METRICS)
        if not path.exists():
            return
        keep = [json.dumps(r) for r in self.read_metrics().rows if r["iteration"] < next_iteration]
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))

    # ----- the checkpoint ------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return self.file(self.CHECKPOINT).is_file()

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write the loop's state (tensors, numbers, optimiser state dicts) as ``checkpoint.pt``, with
        the sha256 of its bytes in front of them."""
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
        data = buffer.getvalue()
        with atomic_write(self.file(self.CHECKPOINT)) as f:
            f.write(_CHECKPOINT_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n")
            f.write(data)

    def load_checkpoint(self) -> dict[str, Any]:
        """The state :meth:`save_checkpoint` wrote, verified: its checksum, its format, and every tensor
        in it finite. :class:`RunDirError` naming the file otherwise."""
        path = self.file(self.CHECKPOINT)
        raw = path.read_bytes()
        header, _, data = raw.partition(b"\n")
        if not header.startswith(_CHECKPOINT_MAGIC):
            raise RunDirError(f"{path}: not a datm_fast distillation checkpoint (no checksum line)")
        if hashlib.sha256(data).hexdigest().encode() != header[len(_CHECKPOINT_MAGIC) :]:
            raise RunDirError(
                f"{path}: damaged: its bytes do not match its sha256; it cannot be resumed from (--overwrite starts "
                "again)"
            )
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # refused by weights_only, or written by something else
            raise RunDirError(f"{path}: not a readable datm_fast checkpoint ({exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise RunDirError(f"{path}: not a datm_fast distillation checkpoint")
        bad = [name for name, t in _tensors(payload) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise RunDirError(f"{path}: holds non-finite values in {', '.join(bad[:5])}; it cannot be resumed from")
        return payload


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor in nested dicts and lists, with its path (``opt_images.state.0.momentum_buffer``)."""
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [pair for k, v in obj.items() for pair in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [pair for i, v in enumerate(obj) for pair in _tensors(v, f"{prefix}.{i}")]
    return []
