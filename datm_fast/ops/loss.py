"""The soft cross-entropy of DATM's learned labels, the one definition every stage uses.

The unroll engines sum it over a micro-batch (``reduction="sum"``) and divide by the step's whole batch
themselves, so that micro-batches add up to exactly the step's loss; evaluation averages it over the
batch (``reduction="mean"``), as upstream's ``SoftCrossEntropy``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy"]

Reduction = Literal["mean", "sum"]


def soft_cross_entropy(
    logits: Tensor,
    target_logits: Tensor | None = None,
    *,
    target_probs: Tensor | None = None,
    reduction: Reduction,
) -> Tensor:
    """``sum_n sum_k -log_softmax(logits)[n, k] * p[n, k]``, summed or averaged over the batch.

    Args:
        logits: ``(B, K)`` network outputs.
        target_logits: ``(B, K)`` label logits (what DATM learns and stores); ``p = softmax(target_logits)``.
        target_probs: ``(B, K)`` the probabilities ``p`` themselves (evaluation computes them once per
            set). Give exactly one of the two.
        reduction: ``"sum"`` over the batch, or ``"mean"`` (the sum divided by ``B``).

    Equivalent PyTorch code (upstream ``SoftCrossEntropy`` in ``DATM.py``, ``reduction="mean"``)::

        torch.sum(-F.log_softmax(logits, dim=1) * F.softmax(target_logits, dim=1)) / logits.shape[0]
    """
    if (target_logits is None) == (target_probs is None):
        raise ValueError("soft_cross_entropy: give exactly one of target_logits and target_probs")
    targets = target_probs if target_logits is None else F.softmax(target_logits, dim=1)
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"soft_cross_entropy: logits and targets must both be (B, K), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"soft_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    total = torch.sum(-F.log_softmax(logits, dim=1) * targets)
    return total if reduction == "sum" else total / logits.shape[0]
