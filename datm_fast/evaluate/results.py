"""Reporting evaluation results: a text table and a JSON file written atomically."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..distill.rundir import PathLike
from ..utils import atomic_write
from .config import EvalConfig, EvalResult

__all__ = ["format_table", "environment", "write_results"]


def format_table(results: Sequence[EvalResult]) -> str:
    """A fixed-width table: what, model, runs, mean ± std (%), seconds; one row per result.

    Example::

        name            model     runs  accuracy (%)     seconds
        runs/c10-ipc10  ConvNet      5  66.80 ± 0.21       95.1
    """
    rows = [("name", "model", "runs", "accuracy (%)", "seconds")]
    for r in results:
        acc = f"{100 * r.mean:.2f} ± {100 * r.std:.2f}" + ("  (diverged)" if r.diverged else "")
        rows.append((r.name, r.model, str(r.runs), acc, f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    right = {2, 4}
    return "\n".join(
        "  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    )


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, date and device, for the record."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "datm_fast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": f"{dev.type}: {name}",
        "threads": torch.get_num_threads(),
    }


def write_results(
    path: PathLike,
    results: Sequence[EvalResult],
    *,
    config: EvalConfig | None = None,
    device: torch.device | str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"results": [...], "config": ..., "environment": ..., **meta}`` as JSON, atomically."""
    payload: dict[str, Any] = {
        "results": [r.to_dict() for r in results],
        "config": config.to_dict() if config is not None else None,
        "environment": environment(device),
    }
    if meta:
        clash = set(meta) & set(payload)
        if clash:
            raise ValueError(f"write_results: meta keys {sorted(clash)} collide with reserved keys")
        payload.update(meta)
    out = Path(path)
    with atomic_write(out, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return out
