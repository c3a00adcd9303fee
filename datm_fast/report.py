"""``datm-fast report RUN_DIR``: a Markdown summary of a distillation run, with its curves and images.

People would rather look at a table and a few plots than read ``metrics.jsonl``. :func:`write_report`
reads a run directory (what ``datm-fast distill --out RUN_DIR`` writes) and writes, atomically:

==================  ===================================================================================
``report.md``       run summary (dataset, ipc, model, iterations, skipped and non-finite counts, time,
                    peak memory), an accuracy table (the best evaluation of ``metrics.jsonl`` and every
                    ``eval_*.json`` of the run directory, baselines included), the curves, the image
                    grid and the key config values
``curves.png``      matching loss per iteration (raw and smoothed; skipped and non-finite iterations
                    marked), the learned lr, the start epochs drawn with their window, and the
                    evaluation accuracy (mean ± std)
image grid          ``images_best.png`` of the run, linked in place (copied when the report is written
                    elsewhere); without it one is drawn from ``images_best.pt`` as ``grid.png``
==================  ===================================================================================

A report written under another name (``out="reports/c10.md"``) prefixes its pictures with the stem
(``c10_curves.png``), so several reports can share a folder. A run that is still going, or was killed,
reports fine: a half-written last line of ``metrics.jsonl`` is skipped and said so.

Example::

    from datm_fast.report import write_report

    path = write_report("runs/c10-ipc10")  # runs/c10-ipc10/report.md (+ curves.png)

matplotlib is imported only when the curves are drawn, and only its object-oriented API is used
(``matplotlib.figure.Figure`` rendered by Agg): no pyplot, no global backend switch, no display needed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .utils import atomic_write

__all__ = ["Metrics", "read_metrics", "write_report", "add_parser", "run_report"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
GRID_FILE = "images_best.png"
IMAGES_FILE = "images_best.pt"
LABELS_FILE = "labels_best.pt"

_EXPECTED = (
    "a run directory as `datm-fast distill --out RUN_DIR` writes it: metrics.jsonl (one JSON row per iteration), "
    "config.yaml, run.json, images_best.pt / labels_best.pt / lr_best.pt, images_best.png"
)

# Config keys shown in the report, in this order; any other key that differs from the default follows.
_CONFIG_KEYS = (
    "dataset",
    "ipc",
    "model",
    "zca",
    "syn_steps",
    "expert_epochs",
    "min_start_epoch",
    "current_max_start_epoch",
    "max_start_epoch",
    "sequential_generation",
    "expansion_end_epoch",
    "batch_syn",
    "threshold",
    "lr_img",
    "lr_teacher",
    "lr_lr",
    "lr_y",
    "momentum_y",
    "pix_init",
    "dsa",
    "dsa_strategy",
    "iterations",
    "eval_it",
    "num_eval",
    "epoch_eval_train",
    "eval_mode",
    "seed",
    "unroll",
    "backend",
    "device",
)


# ----- reading -----------------------------------------------------------------------------------------
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
        return [r for r in self.rows if _num(r.get("eval_mean")) is not None]


def read_metrics(path: str | os.PathLike[str]) -> Metrics:
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


def _num(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _float(value: Any) -> float:
    """``value`` as a float (``nan`` for anything that is not a number); infinities are kept."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"`{path.name}` is not readable JSON ({exc}); left out")
        return None


def _read_config(run_dir: Path, notes: list[str]) -> tuple[dict[str, Any], Any]:
    """``config.yaml`` as a plain dict, and as a ``DistillConfig`` when it loads (else None)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        notes.append(f"no `{CONFIG_FILE}` in the run directory: the config is not shown")
        return {}, None
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        notes.append(f"`{CONFIG_FILE}` is not readable YAML ({exc}); the config is not shown")
        return {}, None
    if not isinstance(raw, dict):
        notes.append(f"`{CONFIG_FILE}` does not hold a mapping of keys to values; the config is not shown")
        return {}, None
    from .distill.config import load_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = load_config(raw)
    except ValueError:  # a foreign or edited config: show its raw values, skip what needs a checked config
        config = None
    return raw, config


# ----- formatting --------------------------------------------------------------------------------------
def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "null"
    return str(value)


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _link(target: Path, md_dir: Path) -> str:
    return quote(Path(os.path.relpath(target, md_dir)).as_posix())


def _seconds(total: float) -> str:
    if total < 120:
        return f"{total:.1f} s"
    hours, rest = divmod(total, 3600)
    return (f"{int(hours)} h " if hours else "") + f"{int(rest // 60)} min" + f" ({total:.0f} s)"


# ----- curves ------------------------------------------------------------------------------------------
def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred mean over ``window`` values (fewer at the ends)."""
    n, half = len(values), window // 2
    cum = [0.0]
    for v in values:
        cum.append(cum[-1] + v)
    return [
        (cum[min(n, i + half + 1)] - cum[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
        for i in range(n)
    ]


def _plot_curves(metrics: Metrics, path: Path, *, config: Any, title: str) -> None:
    """Four panels (loss, lr, start epoch, evaluation accuracy) over iterations, written as PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    rows = metrics.rows
    its = [r["iteration"] for r in rows]
    loss = [_float(r.get("loss")) for r in rows]
    skipped = [bool(r.get("skipped")) for r in rows]
    nonfinite = [bool(r.get("nonfinite")) or not math.isfinite(v) for r, v in zip(rows, loss)]
    finite = [(i, v) for i, v, bad in zip(its, loss, nonfinite) if not bad]

    fig = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    ax_loss, ax_lr, ax_start, ax_eval = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    fig.suptitle(title, fontsize=13, fontweight="bold")
    blue, orange, red, green, grey = "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#7f7f7f"

    # matching loss: raw, smoothed, threshold, skipped and non-finite iterations
    if finite:
        fx, fy = zip(*finite)
        window = max(1, len(fy) // 25) | 1
        if window == 1:  # too few points to smooth: draw them plainly
            ax_loss.plot(fx, fy, color=blue, lw=1.5, marker="o" if len(fy) <= 60 else None, ms=3, label="loss")
        else:
            ax_loss.plot(fx, fy, color=blue, alpha=0.3, lw=0.8, label="loss per iteration")
            ax_loss.plot(fx, _moving_average(fy, window), color=blue, lw=2, label=f"smoothed ({window} iterations)")
        lo, hi = min(fy), max(fy)
        if lo > 0 and hi / lo > 30:
            ax_loss.set_yscale("log")
        threshold = getattr(config, "threshold", None)
        if threshold is not None and threshold <= 1.5 * hi:
            ax_loss.axhline(threshold, color=grey, ls="--", lw=1, label=f"threshold {threshold:g}")
    over = [(i, v) for i, v, s, bad in zip(its, loss, skipped, nonfinite) if s and not bad]
    if over:
        ax_loss.scatter(
            *zip(*over),
            marker="x",
            color=orange,
            s=28 if len(over) <= 100 else 14,
            zorder=3,
            label=f"skipped: over threshold ({len(over)})",
        )
    bad_its = [i for i, bad in zip(its, nonfinite) if bad]
    if bad_its:
        top = blended_transform_factory(ax_loss.transData, ax_loss.transAxes)
        for i in bad_its:
            ax_loss.axvline(i, color=red, alpha=0.25, lw=1)
        ax_loss.scatter(
            bad_its, [0.97] * len(bad_its), transform=top, marker="v", color=red, s=40, zorder=3, clip_on=False,
            label=f"non-finite, skipped ({len(bad_its)})",
        )  # fmt: skip
    ax_loss.set_title("Matching loss  ‖θ_N − θ*‖² / ‖θ_0 − θ*‖²")
    ax_loss.set_ylabel("loss")

    # learned lr
    lr = [(i, _num(r.get("lr"))) for i, r in zip(its, rows)]
    lr = [(i, v) for i, v in lr if v is not None]
    if lr:
        ax_lr.plot(*zip(*lr), color=green, lw=1.8, label="learned lr (α)")
        lr0 = getattr(config, "lr_teacher", None)
        if lr0 is not None:
            ax_lr.axhline(lr0, color=grey, ls="--", lw=1, label=f"initial (lr_teacher {lr0:g})")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax_lr.set_title("Learned student learning rate")
    ax_lr.set_ylabel("lr")

    # start epochs drawn, and the window they are drawn from
    starts = [(i, _num(r.get("start_epoch"))) for i, r in zip(its, rows)]
    starts = [(i, v) for i, v in starts if v is not None]
    if config is not None and its:
        from .distill.config import start_epoch_upper

        span = range(its[0], its[-1] + 1, max(1, (its[-1] - its[0]) // 400))
        xs = list(span) + ([its[-1]] if span[-1] != its[-1] else [])
        uppers = [start_epoch_upper(config, i) - 1 for i in xs]
        ax_start.fill_between(
            xs,
            config.min_start_epoch,
            uppers,
            step="post",
            color=orange,
            alpha=0.15,
            label="window drawn from (difficulty alignment)",
        )
        ax_start.step(xs, uppers, where="post", color=orange, lw=1.2)
    if starts:
        ax_start.scatter(
            *zip(*starts), s=9 if len(starts) > 200 else 20, color=blue, alpha=0.6, lw=0, label="start epoch drawn"
        )
    ax_start.set_title("Start epoch (expert checkpoint matched from)")
    ax_start.set_ylabel("epoch")
    ax_start.set_xlabel("iteration")

    # evaluation accuracy
    evals = metrics.eval_rows
    if evals:
        ex = [r["iteration"] for r in evals]
        ey = [100 * float(r["eval_mean"]) for r in evals]
        es = [100 * (_num(r.get("eval_std")) or 0.0) for r in evals]
        ax_eval.errorbar(ex, ey, yerr=es, color=blue, marker="o", ms=4, capsize=3, lw=1.5, label="mean ± std")
        best = max(range(len(ey)), key=lambda k: ey[k])
        ax_eval.scatter([ex[best]], [ey[best]], marker="*", s=220, color=red, zorder=4, label="best")
        ax_eval.annotate(
            f"{ey[best]:.2f} ± {es[best]:.2f} %\nat iteration {ex[best]}",
            (ex[best], ey[best]),
            xytext=(0, -14),
            textcoords="offset points",
            ha="right" if ex[best] > ex[0] + 0.75 * (ex[-1] - ex[0]) else "left" if best == 0 else "center",
            va="top",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": grey, "alpha": 0.9},
        )
        ax_eval.set_ylabel("test accuracy (%)")
    else:
        ax_eval.text(
            0.5, 0.5, "no evaluation rows in metrics.jsonl", ha="center", va="center", transform=ax_eval.transAxes,
            color=grey,
        )  # fmt: skip
        ax_eval.set_yticks([])
    ax_eval.set_title("Evaluation accuracy (networks trained on the set)")
    ax_eval.set_xlabel("iteration")

    ax_start.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_lr, ax_start, ax_eval):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", framealpha=0.85)
        ax.tick_params(labelbottom=True)
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


# ----- image grid --------------------------------------------------------------------------------------
def _render_grid(run_dir: Path, path: Path, *, preprocessing: str | None, ipc: int | None) -> str:
    """Draw ``images_best.pt`` as a grid at ``path``; returns how it was drawn (for the report)."""
    import torch

    from .viz import save_image_grid

    images = torch.load(run_dir / IMAGES_FILE, map_location="cpu", weights_only=True)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a tensor of shape (M, 1 or 3, H, W), got {shape}")
    x = images.detach().float()
    m = len(x)
    if ipc is None and (run_dir / LABELS_FILE).is_file():
        labels = torch.load(run_dir / LABELS_FILE, map_location="cpu", weights_only=True)
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] and m % labels.shape[1] == 0:
            ipc = m // labels.shape[1]
    if ipc is None or ipc < 1 or m % ipc:
        ipc = min(m, 10)
    per_row = min(ipc, 10)
    shown = torch.cat([x[c * ipc : c * ipc + per_row] for c in range(min(m // ipc, 100))])
    if preprocessing == "none":
        how = "drawn from `images_best.pt` (pixel values as stored)"
    else:
        space = {"zca": "ZCA-whitened", "normalize": "normalised"}.get(preprocessing or "", "in an unknown space")
        flat = shown.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        shown = (shown - lo[:, None, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None, None]
        how = (
            f"drawn from `images_best.pt`, which is {space}: the fitted transform is not in the run directory, so "
            "each image is min-max scaled to [0, 1]; colours and contrast are approximate "
            "(`datm-fast distill` writes `images_best.png` with the whitening undone)"
        )
    save_image_grid(shown, path, nrow=per_row, scale=2 if x.shape[-1] <= 32 else 1)
    return how


# ----- the report --------------------------------------------------------------------------------------
def _resolve_out(run_dir: Path, out: str | os.PathLike[str] | None) -> Path:
    if out is None:
        return run_dir / "report.md"
    out = Path(out)
    if out.is_dir() or not out.suffix:
        return out / "report.md"
    if out.suffix.lower() != ".md":
        raise ValueError(f"out {out}: expected a Markdown file path (*.md) or a directory")
    return out


def _eval_file_rows(run_dir: Path, notes: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of the evaluations table and of the baselines table, from every ``eval_*.json``."""
    sets: list[list[str]] = []
    baselines: list[list[str]] = []
    for path in sorted(run_dir.glob("eval_*.json")):
        data = _read_json(path, notes)
        if data is None:
            continue
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            notes.append(f"`{path.name}` has no `results` list (the layout `datm-fast eval` writes); left out")
            continue
        baseline = data.get("baseline")
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        for r in results:
            if not isinstance(r, dict) or _num(r.get("mean")) is None:
                notes.append(f"`{path.name}`: a result without a numeric `mean`; left out")
                continue
            mean, std = float(r["mean"]), _num(r.get("std"))
            runs = r.get("runs", len(r.get("accuracies") or []) or "?")
            losses = r.get("train_losses") or []
            diverged = any(_num(v) is None for v in losses)
            details = []
            if _num(r.get("lr")) is not None:
                details.append(f"lr {r['lr']:.4g}")
            epochs = r.get("epochs", config.get("epochs"))
            if epochs is not None:
                details.append(f"{epochs} epochs")
            if _num(r.get("seconds")) is not None:
                details.append(_seconds(float(r["seconds"])))
            if diverged:
                details.append("**diverged in some run**")
            acc = _pct(mean, std)
            name = str(r.get("name") or "")
            if baseline is not None or name.startswith(("random-real", "whole")):
                what = name or f"{baseline}" + (f" ipc {data['ipc']}" if data.get("ipc") else "")
                baselines.append([f"`{path.name}`", what, str(r.get("model", "?")), str(runs), acc, ", ".join(details)])
            else:
                tag = path.stem[len("eval_") :]
                sets.append(
                    [f"`{path.name}`", f"set `{tag}`", str(r.get("model", "?")), str(runs), acc, ", ".join(details)]
                )
    return sets, baselines


def write_report(run_dir: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None) -> Path:
    """Write a Markdown report of the run directory ``run_dir`` and its pictures; returns the report's path.

    Args:
        run_dir: a distillation run directory (``metrics.jsonl`` required; ``config.yaml``, ``run.json``,
            ``images_best.png`` / ``images_best.pt`` and ``eval_*.json`` used when present).
        out: the report's path (``*.md``), or a directory (existing, or a path without a suffix; created)
            for ``report.md``; default ``run_dir/report.md``.
            Pictures go beside it: ``curves.png`` (``<stem>_curves.png`` for another name than
            ``report.md``) and the image grid.

    Raises ``ValueError`` naming what is missing: no such directory, or no ``metrics.jsonl`` in it.
    Everything else that is missing or unreadable is said in the report's notes.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ValueError(f"run directory {run_dir} does not exist; expected {_EXPECTED}")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory; expected {_EXPECTED}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ValueError(
            f"{run_dir}: no {METRICS_FILE} (one JSON row per distillation iteration); expected {_EXPECTED}. "
            "Was the run started, and is this its --out directory?"
        )
    md_path = _resolve_out(run_dir, out)
    md_dir = md_path.parent
    prefix = "" if md_path.stem == "report" else f"{md_path.stem}_"
    notes: list[str] = []

    metrics = read_metrics(metrics_path)
    if metrics.bad_lines:
        if metrics.partial_last and len(metrics.bad_lines) == 1:
            notes.append(
                f"`{METRICS_FILE}`: the last line (line {metrics.bad_lines[0]}) is half-written (the run was "
                "killed or is still writing); skipped"
            )
        else:
            shown = ", ".join(map(str, metrics.bad_lines[:10])) + (" …" if len(metrics.bad_lines) > 10 else "")
            notes.append(f"`{METRICS_FILE}`: {len(metrics.bad_lines)} unreadable line(s) skipped (line {shown})")
    raw_config, config = _read_config(run_dir, notes)
    info: dict[str, Any] = {}
    if (run_dir / RUN_INFO_FILE).is_file():
        data = _read_json(run_dir / RUN_INFO_FILE, notes)
        info = data if isinstance(data, dict) else {}

    rows = metrics.rows
    dataset = info.get("dataset") or raw_config.get("dataset") or "?"
    preprocessing = info.get("preprocessing")
    if preprocessing is None and isinstance(raw_config.get("zca"), bool):
        preprocessing = "zca" if raw_config["zca"] else "normalize"
    ipc = raw_config.get("ipc", info.get("ipc"))
    ipc = ipc if isinstance(ipc, int) and not isinstance(ipc, bool) else None
    model = raw_config.get("model") or info.get("model") or "?"
    planned = raw_config.get("iterations")

    # ---- numbers
    n_rows = len(rows)
    n_skipped = sum(bool(r.get("skipped")) for r in rows)
    n_nonfinite = sum(bool(r.get("nonfinite")) or ("loss" in r and _num(r.get("loss")) is None) for r in rows)
    seconds = [v for v in (_num(r.get("seconds")) for r in rows) if v is not None]
    peaks = [v for v in (_num(r.get("peak_memory_gb")) for r in rows) if v is not None]
    evals = metrics.eval_rows
    best = max(evals, key=lambda r: float(r["eval_mean"])) if evals else None

    # ---- pictures
    curves_path = md_dir / f"{prefix}curves.png"
    known = [str(dataset) if dataset != "?" else "", f"ipc {ipc}" if ipc is not None else "", str(model).strip("?")]
    title = " · ".join([p for p in known if p] + [run_dir.resolve().name])
    if rows:
        _plot_curves(metrics, curves_path, config=config, title=title)
    grid_path: Path | None = None
    grid_how = ""
    if (run_dir / GRID_FILE).is_file():
        if md_dir.resolve() == run_dir.resolve():
            grid_path = run_dir / GRID_FILE
        else:
            grid_path = md_dir / f"{prefix}{GRID_FILE}"
            with atomic_write(grid_path) as f:
                f.write((run_dir / GRID_FILE).read_bytes())
        grid_how = "the run's own grid (whitening undone): one row per class, at most 10 images per row"
    elif (run_dir / IMAGES_FILE).is_file():
        try:
            grid_path = md_dir / f"{prefix}grid.png"
            grid_how = _render_grid(run_dir, grid_path, preprocessing=preprocessing, ipc=ipc)
        except Exception as exc:  # a damaged or foreign file must not cost the rest of the report
            grid_path = None
            notes.append(f"`{IMAGES_FILE}` could not be drawn ({exc})")
    else:
        notes.append(f"no `{GRID_FILE}` or `{IMAGES_FILE}` yet: no image grid")

    # ---- Markdown
    from . import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md: list[str] = [f"# Distillation run `{run_dir.resolve().name}`", ""]
    md += [f"`{run_dir.resolve()}` · report written {now} by datm_fast {__version__}", ""]

    md += ["## Summary", ""]
    space = f" ({preprocessing})" if preprocessing else ""
    summary: list[list[str]] = [["dataset", f"{dataset}{space}"], ["images per class", str(ipc or "?")]]
    summary.append(["model", str(model)])
    if rows:
        first, last = rows[0]["iteration"], rows[-1]["iteration"]
        of = (
            f" of {planned + 1} planned (`iterations: {planned}`, runs 0 … {planned})"
            if isinstance(planned, int)
            else ""
        )
        summary.append(["iterations run", f"{n_rows}{of}; logged iterations {first} … {last}"])
        gaps = last - first + 1 - n_rows
        if gaps:
            notes.append(f"`{METRICS_FILE}`: {gaps} iteration(s) between {first} and {last} are not logged")
    else:
        summary.append(["iterations run", "0 (metrics.jsonl has no rows yet)"])
    over = n_skipped - sum(bool(r.get("skipped")) and bool(r.get("nonfinite")) for r in rows)
    threshold = raw_config.get("threshold")
    why = f"loss > threshold {threshold:g}" if isinstance(threshold, (int, float)) else "loss > threshold"
    summary.append(["updates skipped", f"{n_skipped} ({over} with {why}, {n_skipped - over} non-finite)"])
    summary.append(["non-finite losses or gradients", str(n_nonfinite)])
    if seconds:
        mean_s = sum(seconds) / len(seconds)
        summary.append(
            ["time", f"{_seconds(sum(seconds))} total, {mean_s:.3g} s per iteration (evaluations not counted)"]
        )
    if peaks:
        summary.append(["peak memory", f"{max(peaks):.2f} GB (CUDA: max allocated; CPU: process peak RSS)"])
    if best is not None:
        acc = _pct(float(best["eval_mean"]), _num(best.get("eval_std")))
        summary.append(["best accuracy", f"**{acc} %** at iteration {best['iteration']} ({len(evals)} evaluations)"])
    if rows:
        last_row = rows[-1]
        loss_v, lr_v = _float(last_row.get("loss")), _num(last_row.get("lr"))
        parts = [f"loss {loss_v:.4g}"] + ([f"lr {lr_v:.4g}"] if lr_v is not None else [])
        parts += [f"start epoch {last_row['start_epoch']}"] if "start_epoch" in last_row else []
        summary.append([f"last iteration ({last_row['iteration']})", ", ".join(parts)])
    md += _table(["", ""], summary) + [""]

    md += ["## Accuracy", ""]
    table: list[list[str]] = []
    if best is not None:
        acc = _pct(float(best["eval_mean"]), _num(best.get("eval_std")))
        last_e = evals[-1]
        detail = f"best of {len(evals)} evaluations during distillation, at iteration {best['iteration']}"
        if last_e is not best:
            detail += (
                f"; last ({last_e['iteration']}): {_pct(float(last_e['eval_mean']), _num(last_e.get('eval_std')))}"
            )
        table.append(
            [
                f"`{METRICS_FILE}`",
                "set during distillation",
                str(model),
                f"{raw_config['num_eval']} (num_eval)" if "num_eval" in raw_config else "?",
                acc,
                detail,
            ]
        )
    sets, baselines = _eval_file_rows(run_dir, notes)
    table += sets
    header = ["source", "what", "model", "runs", "accuracy (%)", "details"]
    if table:
        md += _table(header, table, right=(3, 4)) + [""]
        md += [
            "Accuracy: test accuracy of networks trained from scratch on the set, mean ± std over runs (networks).",
            "",
        ]
    else:
        md += [
            "No evaluation yet: no eval rows in `metrics.jsonl` and no `eval_*.json` (`datm-fast eval RUN_DIR`).",
            "",
        ]
    if baselines:
        md += ["### Baselines", ""] + _table(header, baselines, right=(3, 4)) + [""]
    if len(evals) > 1:
        md += ["<details><summary>Every evaluation during distillation</summary>", ""]
        md += _table(
            ["iteration", "accuracy (%)"],
            [[str(r["iteration"]), _pct(float(r["eval_mean"]), _num(r.get("eval_std")))] for r in evals],
            right=(0, 1),
        )
        md += ["", "</details>", ""]

    md += ["## Curves", ""]
    if rows:
        md += [f"![loss, learned lr, start epoch and accuracy per iteration]({_link(curves_path, md_dir)})", ""]
        md += [
            "Loss: the matching loss of each iteration (faint) and its moving average; orange crosses: updates "
            "skipped because the loss exceeded the threshold; red triangles: non-finite loss or gradient "
            "(update skipped). Start epoch: the expert checkpoint each iteration matches from, and the window it "
            "is drawn from (DATM's difficulty alignment).",
            "",
        ]
    else:
        md += ["No iterations logged yet.", ""]

    md += ["## Distilled images", ""]
    if grid_path is not None:
        md += [f"![distilled images]({_link(grid_path, md_dir)})", "", grid_how[0].upper() + grid_how[1:] + ".", ""]
    else:
        md += ["No image grid.", ""]
    latest = run_dir / "images_latest.png"
    if latest.is_file():
        md += [f"The set at the last checkpoint: [images_latest.png]({_link(latest, md_dir)}).", ""]

    md += ["## Config", ""]
    if raw_config:
        from .distill.config import DistillConfig

        defaults = {name: getattr(DistillConfig(), name) for name in DistillConfig.__dataclass_fields__}
        keys = [k for k in _CONFIG_KEYS if k in raw_config]
        keys += [k for k in raw_config if k not in keys and raw_config[k] != defaults.get(k, object())]
        pairs = [(f"`{k}`", _fmt(raw_config[k])) for k in keys]
        per = 3
        cells = [sum((list(p) for p in pairs[i : i + per]), []) for i in range(0, len(pairs), per)]
        cells = [c + [""] * (2 * per - len(c)) for c in cells]
        md += _table(["key", "value"] * per, cells) + [""]
        md += [
            f"Key values of [`{CONFIG_FILE}`]({_link(run_dir / CONFIG_FILE, md_dir)}), and every other key that "
            "differs from its default.",
            "",
        ]
    else:
        md += ["Not available.", ""]

    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]

    with atomic_write(md_path, "w") as f:
        f.write("\n".join(md))
    return md_path


# ----- command line --------------------------------------------------------------------------------------
def run_report(args: argparse.Namespace) -> int:
    """Carry out ``datm-fast report``; returns the exit status (bad input raises ``ValueError``)."""
    path = write_report(args.run_dir, out=args.out)
    print(f"report: {path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register the ``report`` subcommand on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "report",
        help="write a Markdown report of a run: accuracy table, curves, image grid",
        description="Summarise a distillation run directory in report.md: run summary, accuracy table "
        "(metrics.jsonl and every eval_*.json), loss / lr / start-epoch / accuracy curves (curves.png), "
        "the image grid and the key config values.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (datm-fast distill --out)")
    p.add_argument(
        "--out", type=Path, default=None, help="report path (*.md) or directory (default: RUN_DIR/report.md)"
    )
    p.set_defaults(func=run_report)
