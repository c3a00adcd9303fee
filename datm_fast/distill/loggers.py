"""Optional experiment trackers for the distillation loop: TensorBoard and Weights & Biases.

:func:`datm_fast.distill.distill` sends every row it writes to ``metrics.jsonl`` (iteration, loss,
start epoch, expert, lr, skipped, seconds, peak memory, and ``eval_mean``/``eval_std`` at the
evaluation iterations) to each logger with ``step = iteration``, and the image grids it saves to the
loggers that have ``log_images``. Neither library is a dependency: each is imported only when its
logger is made (``pip install tensorboard`` / ``pip install wandb``, or ``pip install 'datm-fast[logging]'``).
"""

from __future__ import annotations

import importlib
import numbers
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..utils import atomic_write
from .rundir import RunDir

__all__ = [
    "LOGGER_NAMES",
    "MetricsLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "make_loggers",
    "parse_logger_names",
    "check_logger_names",
]

LOGGER_NAMES = ("tensorboard", "wandb")
_PIP = {"tensorboard": "tensorboard", "wandb": "wandb"}


class MetricsLogger(Protocol):
    """A sink for the loop's metrics rows.

    ``log_images(tag, grid, step)`` is optional: when a logger has it, the loop also sends it each image
    grid it saves (``grid``: an (H, W, 3) uint8 array; tags ``images_latest`` at checkpoints and
    ``images_best`` when the best set changes).
    """

    def log(self, row: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def parse_logger_names(names: str | Sequence[str]) -> list[str]:
    """``"tensorboard,wandb"`` or ``["tensorboard", "wandb"]`` -> the checked names, duplicates dropped."""
    if isinstance(names, str):
        names = names.split(",")
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in LOGGER_NAMES:
            raise ValueError(f"unknown logger {raw!r}: choose from {', '.join(LOGGER_NAMES)}")
        if name not in out:
            out.append(name)
    return out


def _require(name: str) -> None:
    """Import the logger's library, or raise an ImportError that says what to install."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"logging to {name} needs the {_PIP[name]!r} package: pip install {_PIP[name]} "
            f"(or pip install 'datm-fast[logging]')"
        ) from exc


def check_logger_names(names: str | Sequence[str]) -> list[str]:
    """:func:`parse_logger_names`, and each library importable: fails before any work is done."""
    checked = parse_logger_names(names)
    for name in checked:
        _require(name)
    return checked


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a row (booleans as 0/1), without the iteration (that is the step)."""
    out = {}
    for key, value in row.items():
        if key == "iteration":
            continue
        if isinstance(value, (bool, np.bool_)):
            out[key] = float(value)
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    """Scalars (one tag per row key: ``loss``, ``lr``, ``start_epoch``, ``skipped``, ``seconds``,
    ``peak_memory_gb``, ``eval_mean``, ...) and image grids into ``log_dir`` (a run's ``tensorboard/``).

    ``purge_step``: on a resume, the first iteration of this call; events a killed run logged at or
    after it are hidden by TensorBoard, so each iteration shows once.
    """

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_images(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, grid, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """``wandb.init(project, name, config, dir=run_dir, id, resume="allow")``; each row is ``run.log(row, step)``.

    The run id is kept in the run directory (``RunDir.WANDB_ID``): with ``resume=True`` the same wandb
    run goes on. Rows a killed run logged after its last checkpoint are logged again by the resumed run at the
    same steps; wandb drops those (its steps only increase), and they hold the same values anyway (the
    loop is deterministic), except ``seconds`` and ``peak_memory_gb``. Offline runs:
    ``WANDB_MODE=offline``.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        project: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        _require("wandb")
        import wandb

        self._wandb = wandb
        run_id = None
        if run_dir is not None:
            id_path = RunDir(run_dir).file(RunDir.WANDB_ID)
            if resume and id_path.exists():
                run_id = id_path.read_text().strip() or None
            if run_id is None:
                run_id = secrets.token_hex(4)  # wandb ids: lower-case letters and digits
                with atomic_write(id_path, "w") as f:
                    f.write(run_id + "\n")
        self.run_id = run_id
        self.run = wandb.init(
            project=project,
            name=name,
            config=dict(config) if config is not None else None,
            dir=str(run_dir) if run_dir is not None else None,
            id=run_id,
            resume="allow" if run_id is not None else None,
        )

    def log(self, row: Mapping[str, Any], step: int) -> None:
        # NaN/inf losses are logged as they are: wandb shows them as gaps.
        self.run.log({k: v for k, v in row.items() if k != "iteration"}, step=step)

    def log_images(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.run.log({tag: self._wandb.Image(grid)}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_loggers(
    names: str | Sequence[str],
    run_dir: str | Path | None,
    config: Any = None,
    *,
    resume_from: int | None = None,
) -> list[MetricsLogger]:
    """The loggers named in ``names`` (``"tensorboard"``, ``"wandb"``, or a comma-separated string).

    Args:
        names: which loggers; an unknown name is a ValueError naming the valid ones, a missing library
            an ImportError naming the package to install.
        run_dir: the run directory; TensorBoard writes ``<run_dir>/tensorboard`` and needs one.
        config: the run's :class:`~datm_fast.distill.config.DistillConfig` (or a mapping): wandb's config,
            and ``config.project`` its project.
        resume_from: the first iteration of a resumed run (None: a fresh run).
    """
    checked = check_logger_names(names)
    if "tensorboard" in checked and run_dir is None:
        raise ValueError("tensorboard logging needs a run directory (run_dir or config.out_dir)")
    config_dict = config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config is not None else None)
    loggers: list[MetricsLogger] = []
    try:
        for name in checked:
            if name == "tensorboard":
                assert run_dir is not None
                loggers.append(TensorBoardLogger(RunDir(run_dir).file(RunDir.TENSORBOARD), purge_step=resume_from))
            else:
                project = getattr(config, "project", None) or (config_dict or {}).get("project")
                loggers.append(
                    WandbLogger(
                        run_dir,
                        project=project,
                        name=Path(run_dir).name if run_dir is not None else None,
                        config=config_dict,
                        resume=resume_from is not None,
                    )
                )
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers
