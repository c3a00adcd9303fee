"""Distillation: the DATM loop around an unrolled inner loop with exact, full and TESLA gradients.

``settings`` (how a config key is declared) and ``config`` (upstream's YAML keys in sections,
validation, the start-epoch schedule), ``unroll`` (the engines and their :class:`EngineOptions`),
``explicit_step`` (the exact engine's step written out), ``rundir`` (:class:`RunDir`, the run
directory's one owner), ``loggers`` (TensorBoard, wandb) and ``loop`` (:func:`distill`).
"""

from .config import ConfigError, DistillConfig, list_configs, load_config
from .loop import (
    DistillationFailed,
    DistilledSet,
    EvalOutcome,
    Trajectories,
    UpdateCounts,
    distill,
    initialize_synthetic_set,
)
from .rundir import RunDir, RunDirError, RunRecord
from .unroll import (
    EngineOptions,
    StepPlan,
    Unroll,
    UnrollPlan,
    estimate_full_unroll_bytes,
    make_unroll_plan,
    trajectory_matching_loss,
)

__all__ = [
    "ConfigError",
    "DistillConfig",
    "DistillationFailed",
    "DistilledSet",
    "EngineOptions",
    "EvalOutcome",
    "RunDir",
    "RunDirError",
    "RunRecord",
    "StepPlan",
    "Trajectories",
    "Unroll",
    "UnrollPlan",
    "UpdateCounts",
    "distill",
    "estimate_full_unroll_bytes",
    "initialize_synthetic_set",
    "list_configs",
    "load_config",
    "make_unroll_plan",
    "trajectory_matching_loss",
]
