"""``datm-fast report RUN_DIR``: a Markdown summary of a distillation run, with its curves and images.

People would rather look at a table and a few plots than read ``metrics.jsonl``. :func:`write_report`
reads a run directory (what ``datm-fast distill --out RUN_DIR`` writes) and writes, atomically:

==================  ===================================================================================
``report.md``       run summary (dataset, ipc, model, iterations, skipped and non-finite counts, time,
                    peak memory), an accuracy table (the best evaluation of ``metrics.jsonl`` and every
                    ``eval_*.json`` of the run directory, baselines apart), the curves, the image grid
                    and the config, section by section
``curves.png``      matching loss per iteration (raw and smoothed; skipped and non-finite iterations
                    marked), the learned lr, the start epochs drawn with their window, and the
                    evaluation accuracy (mean ± std)
image grid          ``images_best.png`` of the run, linked in place (copied when the report is written
                    elsewhere); without it one is drawn from ``images_best.pt`` as ``grid.png``
==================  ===================================================================================

It goes in three steps: :func:`gather` reads the run directory (through its
:class:`~datm_fast.distill.rundir.RunDir`) into a :class:`RunFacts`; :func:`summarize` turns the facts
into the numbers and table rows of a :class:`Summary` (no I/O); :func:`render` draws the pictures and
writes the Markdown.

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
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from ._version import __version__
from .distill.config import SECTIONS, DistillConfig, load_config, start_epoch_upper
from .distill.rundir import Metrics, RunDir, RunRecord, read_metrics
from .utils import atomic_write, check_writable
from .viz import save_image_grid

__all__ = [
    "Metrics",
    "RunFacts",
    "Summary",
    "add_parser",
    "gather",
    "read_metrics",
    "render",
    "run_report",
    "summarize",
    "write_report",
]

_EXPECTED = (
    "a run directory as `datm-fast distill --out RUN_DIR` writes it: metrics.jsonl (one JSON row per iteration), "
    "config.yaml, run.json, images_best.pt / labels_best.pt / lr_best.pt, images_best.png"
)


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


# ----- gather: read the run directory -------------------------------------------------------------
@dataclass
class RunFacts:
    """What a run directory holds, read once (nothing is computed here)."""

    run: RunDir
    metrics: Metrics
    raw_config: dict[str, Any]  # config.yaml as written ({} when absent or unreadable)
    config: DistillConfig | None  # the same, checked (None for a foreign or edited config)
    record: RunRecord | None  # run.json
    eval_files: list[tuple[str, dict[str, Any]]]  # (file name, parsed eval_*.json)
    notes: list[str] = field(default_factory=list)  # what was missing or unreadable
    failure: str | None = None  # why the run stopped without a result (failure.txt)


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"`{path.name}` is not readable JSON ({exc}); left out")
        return None


def _read_config(run: RunDir, notes: list[str]) -> tuple[dict[str, Any], DistillConfig | None]:
    """``config.yaml`` as a plain dict, and as a ``DistillConfig`` when it loads (else None)."""
    path = run.file(RunDir.CONFIG)
    if not path.is_file():
        notes.append(f"no `{RunDir.CONFIG}` in the run directory: the config is not shown")
        return {}, None
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        notes.append(f"`{RunDir.CONFIG}` is not readable YAML ({exc}); the config is not shown")
        return {}, None
    if not isinstance(raw, dict):
        notes.append(f"`{RunDir.CONFIG}` does not hold a mapping of keys to values; the config is not shown")
        return {}, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = load_config(raw)
    except ValueError:  # a foreign or edited config: show its raw values, skip what needs a checked config
        config = None
    return raw, config


def gather(run_dir: str | os.PathLike[str]) -> RunFacts:
    """Read everything the report shows from ``run_dir``; ``ValueError`` naming what is missing when
    there is no such directory or no ``metrics.jsonl`` in it."""
    run = RunDir(run_dir)
    if not run.path.exists():
        raise ValueError(f"run directory {run.path} does not exist; expected {_EXPECTED}")
    if not run.path.is_dir():
        raise ValueError(f"{run.path} is not a directory; expected {_EXPECTED}")
    if not run.file(RunDir.METRICS).is_file():
        raise ValueError(
            f"{run.path}: no {RunDir.METRICS} (one JSON row per distillation iteration); expected {_EXPECTED}. "
            "Was the run started, and is this its --out directory?"
        )
    notes: list[str] = []
    metrics = run.read_metrics()
    if metrics.bad_lines:
        if metrics.partial_last and len(metrics.bad_lines) == 1:
            notes.append(
                f"`{RunDir.METRICS}`: the last line (line {metrics.bad_lines[0]}) is half-written (the run was "
                "killed or is still writing); skipped"
            )
        else:
            shown = ", ".join(map(str, metrics.bad_lines[:10])) + (" …" if len(metrics.bad_lines) > 10 else "")
            notes.append(f"`{RunDir.METRICS}`: {len(metrics.bad_lines)} unreadable line(s) skipped (line {shown})")
    raw_config, config = _read_config(run, notes)
    try:
        record = run.read_record()
    except ValueError as exc:
        notes.append(f"`{RunDir.RECORD}` is not readable ({exc}); left out")
        record = None
    eval_files = []
    for path in run.eval_files():
        data = _read_json(path, notes)
        if data is None:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            notes.append(f"`{path.name}` has no `results` list (the layout `datm-fast eval` writes); left out")
            continue
        eval_files.append((path.name, data))
    return RunFacts(run, metrics, raw_config, config, record, eval_files, notes, run.failure())


# ----- summarize: the numbers and rows, no I/O ----------------------------------------------------
def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "null"
    return str(value)


def _seconds(total: float) -> str:
    if total < 120:
        return f"{total:.1f} s"
    hours, rest = divmod(total, 3600)
    return (f"{int(hours)} h " if hours else "") + f"{int(rest // 60)} min" + f" ({total:.0f} s)"


# The names datm_fast.evaluate.baselines gives its results: "random-real <dataset> ipc <n>", "whole <dataset>".
_BASELINE_NAME = re.compile(r"random-real \S.* ipc \d+|whole \S.*")


@dataclass
class Summary:
    """The report's content, ready to render: identity, summary rows, accuracy tables, config."""

    title: str  # dataset · ipc · model · directory
    dataset: str
    preprocessing: str | None
    ipc: int | None
    model: str
    summary_rows: list[list[str]]
    accuracy_rows: list[list[str]]  # sets: the in-loop best and every evaluated set
    baseline_rows: list[list[str]]
    every_eval: list[list[str]]  # iteration, accuracy of each in-loop evaluation (when more than one)
    config_lines: list[str]  # one per section, or raw key = value pairs
    notes: list[str]


def _is_baseline(result_name: str, data: dict[str, Any]) -> bool:
    """Whether a result of an ``eval_*.json`` is a real-data baseline rather than an evaluation of a set.

    By its name, as :mod:`datm_fast.evaluate.baselines` writes it (``random-real <dataset> ipc <n>``,
    ``whole <dataset>``), whatever else its file holds (the pipelines write a set and its baseline into
    one file). A bare prefix is not enough: ``datm-fast eval RUN_DIR`` names a set's results after the
    path it was given (its ``source``), and a run called ``random-real-init`` (DATM's ``pix_init: real``)
    or ``whole_c10`` would then be filed as a baseline, leaving the report saying "no evaluation" above
    that very evaluation.
    """
    if "source" in data and "baseline" not in data:
        return False  # written by `datm-fast eval` of a set: every result is that set's
    if result_name == data.get("source"):
        return False
    return _BASELINE_NAME.fullmatch(result_name) is not None


def _eval_rows(
    eval_files: list[tuple[str, dict[str, Any]]], notes: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of the evaluations table and of the baselines table, from every ``eval_*.json`` (a result is a
    baseline by :func:`_is_baseline`)."""
    sets: list[list[str]] = []
    baselines: list[list[str]] = []
    for name, data in eval_files:
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        for r in data["results"]:
            if not isinstance(r, dict) or _num(r.get("mean")) is None:
                notes.append(f"`{name}`: a result without a numeric `mean`; left out")
                continue
            mean, std = float(r["mean"]), _num(r.get("std"))
            runs = r.get("runs", len(r.get("accuracies") or []) or "?")
            losses = r.get("train_losses") or []
            details = []
            if _num(r.get("lr")) is not None:
                details.append(f"lr {r['lr']:.4g}")
            epochs = r.get("epochs", config.get("epochs"))
            if epochs is not None:
                details.append(f"{epochs} epochs")
            if _num(r.get("seconds")) is not None:
                details.append(_seconds(float(r["seconds"])))
            if any(_num(v) is None for v in losses):
                details.append("**diverged in some run**")
            what = str(r.get("name") or "")
            row = [f"`{name}`", "", str(r.get("model", "?")), str(runs), _pct(mean, std), ", ".join(details)]
            if _is_baseline(what, data):
                row[1] = what
                baselines.append(row)
            else:
                row[1] = f"set `{data.get('tag') or name[len('eval_') : -len('.json')]}`"
                sets.append(row)
    return sets, baselines


def _config_lines(facts: RunFacts) -> list[str]:
    """The config, one line per section (all keys); a config that does not load: its raw keys."""
    if facts.config is None:
        return [", ".join(f"`{k}` {_fmt(v)}" for k, v in facts.raw_config.items())] if facts.raw_config else []
    return [
        f"**{name}**: " + " · ".join(f"`{k}` {_fmt(v)}" for k, v in vars(getattr(facts.config, name)).items())
        for name in SECTIONS
    ]


def summarize(facts: RunFacts) -> Summary:
    """Everything the report says, from the facts (pure: no file is read or written)."""
    raw, rows, notes = facts.raw_config, facts.metrics.rows, list(facts.notes)
    data = facts.record.data if facts.record is not None else None
    dataset = (data.dataset if data is not None else None) or raw.get("dataset") or "?"
    preprocessing = data.preprocessing if data is not None else None
    if preprocessing is None and isinstance(raw.get("zca"), bool):
        preprocessing = "zca" if raw["zca"] else "normalize"
    ipc = raw.get("ipc", facts.record.ipc if facts.record is not None else None)
    ipc = ipc if isinstance(ipc, int) and not isinstance(ipc, bool) else None
    model = raw.get("model") or (facts.record.model if facts.record is not None else None) or "?"
    planned = raw.get("iterations")
    known = [str(dataset) if dataset != "?" else "", f"ipc {ipc}" if ipc is not None else "", str(model).strip("?")]
    title = " · ".join([p for p in known if p] + [facts.run.path.resolve().name])

    n_rows = len(rows)
    n_skipped = sum(bool(r.get("skipped")) for r in rows)
    n_nonfinite = sum(bool(r.get("nonfinite")) or ("loss" in r and _num(r.get("loss")) is None) for r in rows)
    seconds = [v for v in (_num(r.get("seconds")) for r in rows) if v is not None]
    peaks = [v for v in (_num(r.get("peak_memory_gb")) for r in rows) if v is not None]
    evals = facts.metrics.eval_rows
    best = max(evals, key=lambda r: float(r["eval_mean"])) if evals else None

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
            notes.append(f"`{RunDir.METRICS}`: {gaps} iteration(s) between {first} and {last} are not logged")
    else:
        summary.append(["iterations run", "0 (metrics.jsonl has no rows yet)"])
    over = n_skipped - sum(bool(r.get("skipped")) and bool(r.get("nonfinite")) for r in rows)
    threshold = raw.get("threshold")
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

    table: list[list[str]] = []
    if best is not None:
        acc = _pct(float(best["eval_mean"]), _num(best.get("eval_std")))
        last_e = evals[-1]
        detail = f"best of {len(evals)} evaluations during distillation, at iteration {best['iteration']}"
        if last_e is not best:
            detail += (
                f"; last ({last_e['iteration']}): {_pct(float(last_e['eval_mean']), _num(last_e.get('eval_std')))}"
            )
        runs = f"{raw['num_eval']} (num_eval)" if "num_eval" in raw else "?"
        table.append([f"`{RunDir.METRICS}`", "set during distillation", str(model), runs, acc, detail])
    sets, baselines = _eval_rows(facts.eval_files, notes)
    every = (
        [[str(r["iteration"]), _pct(float(r["eval_mean"]), _num(r.get("eval_std")))] for r in evals]
        if len(evals) > 1
        else []
    )
    return Summary(
        title=title,
        dataset=str(dataset),
        preprocessing=preprocessing,
        ipc=ipc,
        model=str(model),
        summary_rows=summary,
        accuracy_rows=table + sets,
        baseline_rows=baselines,
        every_eval=every,
        config_lines=_config_lines(facts),
        notes=notes,
    )


# ----- render: pictures and Markdown --------------------------------------------------------------
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
        threshold = config.matching.threshold if config is not None else None
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
        lr0 = config.learning.lr_teacher if config is not None else None
        if lr0 is not None:
            ax_lr.axhline(lr0, color=grey, ls="--", lw=1, label=f"initial (lr_teacher {lr0:g})")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax_lr.set_title("Learned student learning rate")
    ax_lr.set_ylabel("lr")

    # start epochs drawn, and the window they are drawn from
    starts = [(i, _num(r.get("start_epoch"))) for i, r in zip(its, rows)]
    starts = [(i, v) for i, v in starts if v is not None]
    if config is not None and its:
        span = range(its[0], its[-1] + 1, max(1, (its[-1] - its[0]) // 400))
        xs = list(span) + ([its[-1]] if span[-1] != its[-1] else [])
        uppers = [start_epoch_upper(config, i) - 1 for i in xs]
        ax_start.fill_between(
            xs,
            config.matching.min_start_epoch,
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
def _render_grid(run: RunDir, path: Path, *, preprocessing: str | None, ipc: int | None) -> str:
    """Draw ``images_best.pt`` as a grid at ``path``; returns how it was drawn (for the report)."""
    images_file, labels_file, _ = run.set_files("best")
    images = torch.load(images_file, map_location="cpu", weights_only=True)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a tensor of shape (M, 1 or 3, H, W), got {shape}")
    x = images.detach().float()
    m = len(x)
    if ipc is None and labels_file.is_file():
        labels = torch.load(labels_file, map_location="cpu", weights_only=True)
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
def _resolve_out(run: RunDir, out: str | os.PathLike[str] | None) -> Path:
    if out is None:
        return run.file(RunDir.REPORT)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        return out / RunDir.REPORT
    if out.suffix.lower() != ".md":
        raise ValueError(f"out {out}: expected a Markdown file path (*.md) or a directory")
    return out


def render(facts: RunFacts, summary: Summary, md_path: Path) -> str:
    """Draw the pictures beside ``md_path`` and return the report's Markdown (written by the caller)."""
    run, md_dir = facts.run, md_path.parent
    prefix = "" if md_path.stem == "report" else f"{md_path.stem}_"
    notes = list(summary.notes)
    curves_path = md_dir / f"{prefix}curves.png"
    if facts.metrics.rows:
        _plot_curves(facts.metrics, curves_path, config=facts.config, title=summary.title)
    grid_path: Path | None = None
    grid_how = ""
    run_grid, images_file = run.grid("best"), run.set_files("best")[0]
    if run_grid.is_file():
        if md_dir.resolve() == run.path.resolve():
            grid_path = run_grid
        else:
            grid_path = md_dir / f"{prefix}{run_grid.name}"
            with atomic_write(grid_path) as f:
                f.write(run_grid.read_bytes())
        grid_how = "the run's own grid (whitening undone): one row per class, at most 10 images per row"
    elif images_file.is_file():
        try:
            grid_path = md_dir / f"{prefix}grid.png"
            grid_how = _render_grid(run, grid_path, preprocessing=summary.preprocessing, ipc=summary.ipc)
        except Exception as exc:  # a damaged or foreign file must not cost the rest of the report
            grid_path = None
            notes.append(f"`{images_file.name}` could not be drawn ({exc})")
    else:
        notes.append(f"no `{run_grid.name}` or `{images_file.name}` yet: no image grid")

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = run.path.resolve().name
    md: list[str] = [f"# Distillation run `{name}`", ""]
    md += [f"`{run.path.resolve()}` · report written {now} by datm_fast {__version__}", ""]
    if facts.failure is not None:
        md += [f"**This run failed**: {facts.failure}", ""]
    md += ["## Summary", ""] + _table(["", ""], summary.summary_rows) + [""]

    md += ["## Accuracy", ""]
    header = ["source", "what", "model", "runs", "accuracy (%)", "details"]
    if summary.accuracy_rows:
        md += _table(header, summary.accuracy_rows, right=(3, 4)) + [""]
        md += [
            "Accuracy: test accuracy of networks trained from scratch on the set, mean ± std over runs (networks).",
            "",
        ]
    elif summary.baseline_rows:
        md += ["No evaluation of the distilled set yet (`datm-fast eval RUN_DIR`); baselines below.", ""]
    else:
        md += [
            "No evaluation yet: no eval rows in `metrics.jsonl` and no `eval_*.json` (`datm-fast eval RUN_DIR`).",
            "",
        ]
    if summary.baseline_rows:
        md += ["### Baselines", ""] + _table(header, summary.baseline_rows, right=(3, 4)) + [""]
    if summary.every_eval:
        md += ["<details><summary>Every evaluation during distillation</summary>", ""]
        md += _table(["iteration", "accuracy (%)"], summary.every_eval, right=(0, 1))
        md += ["", "</details>", ""]

    md += ["## Curves", ""]
    if facts.metrics.rows:
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
    latest = run.grid("latest")
    if latest.is_file():
        md += [f"The set at the last checkpoint: [{latest.name}]({_link(latest, md_dir)}).", ""]

    md += ["## Config", ""]
    if summary.config_lines:
        md += [f"- {line}" for line in summary.config_lines] + [""]
        md += [f"From [`{RunDir.CONFIG}`]({_link(run.file(RunDir.CONFIG), md_dir)}).", ""]
    else:
        md += ["Not available.", ""]

    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md)


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
    facts = gather(run_dir)
    md_path = _resolve_out(facts.run, out)
    check_writable(md_path.parent)  # a read-only run directory: one OSError naming it, before any picture
    text = render(facts, summarize(facts), md_path)
    with atomic_write(md_path, "w") as f:
        f.write(text)
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
