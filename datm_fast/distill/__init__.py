"""Distillation: the unrolled inner loop with its exact, full and TESLA gradient engines."""

from .unroll import (
    StepPlan,
    Unroll,
    UnrollPlan,
    estimate_full_unroll_bytes,
    make_unroll_plan,
    soft_cross_entropy,
    trajectory_matching_loss,
)

__all__ = [
    "StepPlan",
    "Unroll",
    "UnrollPlan",
    "estimate_full_unroll_bytes",
    "make_unroll_plan",
    "soft_cross_entropy",
    "trajectory_matching_loss",
]
