"""The evaluation training loss: cross-entropy for integer labels, DATM's soft cross-entropy for learned ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import soft_cross_entropy

__all__ = ["train_loss"]


def train_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch: ``targets`` are ``(B,)`` int64 class indices (cross-entropy)
    or ``(B, C)`` probabilities, i.e. ``softmax`` of logit labels, computed once per set (the soft
    cross-entropy of :func:`datm_fast.ops.soft_cross_entropy`, averaged over the batch as upstream).

    Works under ``torch.func.vmap`` (one call per run).
    """
    if targets.is_floating_point():
        return soft_cross_entropy(logits, target_probs=targets, reduction="mean")
    return F.cross_entropy(logits, targets)
