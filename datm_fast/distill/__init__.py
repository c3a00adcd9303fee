"""Distillation: the DATM loop around an unrolled inner loop with exact, full and TESLA gradients.

``config`` (upstream's YAML keys, validation, the start-epoch schedule), ``unroll`` (the engines) and
``loop`` (:func:`distill`: initialisation, matching, checkpoints, outputs).
"""

from .config import ConfigError, DistillConfig, list_configs, load_config
from .loop import DistilledSet, EvalOutcome, Trajectories, distill, initialize_synthetic_set
from .unroll import (
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
    "DistilledSet",
    "EvalOutcome",
    "StepPlan",
    "Trajectories",
    "Unroll",
    "UnrollPlan",
    "distill",
    "estimate_full_unroll_bytes",
    "initialize_synthetic_set",
    "list_configs",
    "load_config",
    "make_unroll_plan",
    "trajectory_matching_loss",
]
