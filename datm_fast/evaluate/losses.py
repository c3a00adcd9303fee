"""The evaluation losses: soft cross-entropy for logit labels, cross-entropy for integer labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_cross_entropy", "train_loss"]


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """DATM's loss for learned (logit) labels: cross-entropy against ``softmax(target_logits)``.

    Args:
        logits: ``(B, C)`` network outputs.
        target_logits: ``(B, C)`` label logits (what DATM stores in ``labels_*.pt``).

    Returns a scalar, the mean over the batch.

    Equivalent PyTorch code (upstream ``SoftCrossEntropy`` in ``DATM.py``)::

        torch.sum(-F.log_softmax(logits, dim=1) * F.softmax(target_logits, dim=1)) / logits.shape[0]
    """
    if logits.dim() != 2 or target_logits.shape != logits.shape:
        raise ValueError(
            f"soft_cross_entropy: logits and target_logits must both be (B, C), got {tuple(logits.shape)} "
            f"and {tuple(target_logits.shape)}"
        )
    return train_loss(logits, F.softmax(target_logits, dim=1))


def train_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch: ``targets`` are ``(B,)`` int64 class indices (cross-entropy)
    or ``(B, C)`` probabilities, i.e. ``softmax`` of logit labels, computed once per set (soft
    cross-entropy, summed then divided by the batch size in upstream's order of operations).

    Works under ``torch.func.vmap`` (one call per run).
    """
    if targets.is_floating_point():
        return torch.sum(-F.log_softmax(logits, dim=1) * targets) / logits.shape[0]
    return F.cross_entropy(logits, targets)
