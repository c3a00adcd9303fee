"""The pipeline's stages as the apps run them: experts from a data spec, then one IPC end to end.

data -> experts (:func:`prepare_experts`) -> for each IPC (:func:`run_ipc`): distill -> evaluate the best
set and random real subsets of the same size on one protocol -> ``eval_best_vs_random_real.json`` and
``report.md`` in the run directory. ``datm-fast quickstart`` and ``datm-fast reproduce`` are these two calls with their
own budgets; everything they write is recorded where it lives (the buffer's manifest and each run's
``run.json`` name the :class:`~datm_fast.data.DataSpec`), so that ``datm-fast eval`` and ``report``
rebuild the same data later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backends import Backend
from .data import DataSpec, ImageDataset, Transform
from .distill import DistillConfig, DistilledSet, distill
from .distill.config import eval_models
from .distill.rundir import RunDir
from .evaluate import EvalConfig, EvalResult, evaluate_against_random_real, evaluator_on_test_set
from .evaluate.baselines import BASELINE_LR
from .experts import BuildSummary, ExpertBuffer, ExpertConfig, build_buffer
from .models import ConvNetSpec, convnet_spec_from_name
from .report import write_report

__all__ = ["Experts", "IpcResult", "prepare_experts", "run_ipc"]


@dataclass(frozen=True, eq=False)
class Experts:
    """The data and the expert buffer trained on it: what every IPC of a pipeline distils from."""

    data_spec: DataSpec
    data: ImageDataset
    transform: Transform
    spec: ConvNetSpec
    buffer: ExpertBuffer
    summary: BuildSummary


def prepare_experts(
    data_spec: DataSpec,
    buffer_dir: str | Path,
    model: str,
    config: ExpertConfig,
    num_experts: int,
    *,
    device: torch.device,
    backend: Backend = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Experts:
    """Load the data ``data_spec`` names and train (or resume) ``num_experts`` experts of ``model`` on it
    into ``buffer_dir``, which records the spec. A buffer of other settings is refused
    (:class:`~datm_fast.experts.ExpertBufferError`)."""
    data, transform = data_spec.load(cache_dir=cache_dir)
    spec = convnet_spec_from_name(model, data.channels, data.num_classes, data.image_size)
    summary = build_buffer(
        buffer_dir,
        data,
        spec,
        config,
        num_experts,
        model_name=model,
        data_spec=data_spec,
        device=device,
        backend=backend,
        progress=progress,
    )
    buffer = ExpertBuffer.open(buffer_dir, spec=spec, dataset=data)
    return Experts(data_spec, data, transform, spec, buffer, summary)


@dataclass(frozen=True)
class IpcResult:
    """One IPC of a pipeline: the kept set, its evaluation and the random-real baseline beside it."""

    ipc: int
    distilled: EvalResult
    baseline: EvalResult
    result: DistilledSet
    run_dir: Path
    report: Path
    seconds: float  # distillation, evaluation and baseline
    distill_seconds: float

    @property
    def grid(self) -> Path:
        """The kept set as pictures."""
        return RunDir(self.run_dir).grid("best")


def run_ipc(
    experts: Experts,
    config: DistillConfig,
    eval_config: EvalConfig,
    run_dir: str | Path,
    *,
    select_best: bool = False,
    baseline_lr: float = BASELINE_LR,
    name: str,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> IpcResult:
    """Distil ``experts`` at ``config.ipc`` into ``run_dir``, evaluate the kept set and random real
    subsets of the same IPC on ``eval_config`` (seeded by ``config.seed``), write both to
    ``eval_best_vs_random_real.json`` and the run's ``report.md``.

    ``select_best``: evaluate during distillation (the config's ``eval_it``, ``num_eval``,
    ``epoch_eval_train``, ``batch_train`` and ``eval_mode``) and keep the best set; else the last one.
    The run directory is held for the whole call. One holding a checkpoint of this config is resumed,
    one holding the start of this config's run (killed before its first checkpoint) started again;
    one of another config is refused, naming the keys that differ.
    """
    started = time.perf_counter()
    run = RunDir(run_dir)
    resume = run.has_checkpoint()
    # A start of this very run, killed before its first checkpoint: nothing in it can be resumed.
    restart = not resume and run.config_differences(config) == []
    with run.start(config, resume=resume, overwrite=restart):
        return _run_ipc(
            experts, config, eval_config, run, resume, select_best, baseline_lr, name, meta, progress, started
        )


def _run_ipc(
    experts: Experts,
    config: DistillConfig,
    eval_config: EvalConfig,
    run: RunDir,
    resume: bool,
    select_best: bool,
    baseline_lr: float,
    name: str,
    meta: dict[str, Any] | None,
    progress: bool,
    started: float,
) -> IpcResult:
    device = torch.device(config.run.device)
    evaluator = None
    if select_best:
        evaluation = config.evaluation
        select = EvalConfig(
            model=config.matching.model,
            runs=evaluation.num_eval,
            epochs=evaluation.epoch_eval_train,
            batch_size=evaluation.batch_train,
        )
        evaluator = evaluator_on_test_set(experts.data, select, models=eval_models(config), device=device)
    result = distill(
        experts.data,
        experts.buffer,
        config,
        data_spec=experts.data_spec,
        transform=experts.transform,
        evaluator=evaluator,
        run_dir=run,
        resume=resume,
        progress=progress,
    )
    distill_seconds = time.perf_counter() - started
    ipc = config.learning.ipc
    distilled, baseline = evaluate_against_random_real(
        result.images,
        result.labels,
        result.lr,
        experts.data,
        ipc,
        eval_config,
        seed=config.run.seed,
        results_path=run.comparison_results(),
        name=name,
        meta={**(meta or {}), "tag": "best"},
        baseline_lr=baseline_lr,
        device=device,
        progress=progress,
    )
    report = write_report(run.path)
    return IpcResult(ipc, distilled, baseline, result, run.path, report, time.perf_counter() - started, distill_seconds)
