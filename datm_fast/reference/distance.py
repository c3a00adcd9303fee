"""Reference trajectory-matching distance: the PyTorch code every fused distance kernel must match."""

from __future__ import annotations

import torch

__all__ = ["param_distance_reference"]


def param_distance_reference(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(||student - target||^2, ||start - target||^2)``.

    Args:
        student: (n,) theta_N, the student's parameters after the unrolled steps.
        start: (n,) theta_0, the expert checkpoint the student started from.
        target: (n,) theta*, the expert checkpoint ``expert_epochs`` later.

    The DATM matching loss is ``num / den``. Differentiable with ordinary autograd; run it on float64
    copies to get the ground truth the fused kernels are tested against.

    Equivalent PyTorch code (this is it)::

        num = ((student - target) ** 2).sum()
        den = ((start - target) ** 2).sum()
    """
    num = (student - target).pow(2).sum()
    den = (start - target).pow(2).sum()
    return num, den
