"""GSAM (surrogate-gap guided sharpness-aware minimisation) and SGD on flat parameter vectors.

GSAM (Zhuang et al., ICLR 2022) is the optimiser FTD (Du et al., CVPR 2023) and DATM train their
experts with ("flat trajectories"). One step, for parameters ``w`` and loss ``L`` on one batch:

1. ``g = grad L(w)``.
2. Perturb: ``e = rho * g / (||g|| + eps)``; the *adaptive* variant (upstream's default, ASAM's
   scaling) uses ``e = rho * w^2 * g / (|| |w| * g || + eps)`` (elementwise products).
3. ``g_p = grad L(w + e)`` on the same batch (same augmentation).
4. Decompose ``g`` into its components parallel and orthogonal to ``g_p``:
   ``g_orth = g - (<g, g_p> / (||g|| ||g_p|| + eps)) * ||g|| * g_p / (||g_p|| + eps)``.
5. Update direction ``d = g_p - alpha * g_orth``, then an ordinary SGD step from ``w`` (not ``w + e``)
   with ``d`` as the gradient: ``d += weight_decay * w``; ``buf = momentum * buf + d``; ``w -= lr * buf``.

This follows the reference implementation (juntang-zhuang/GSAM ``gsam.py``, which DATM's
``buffer_FTD.py`` imports) detail for detail: every norm is global over all parameters of one network
(upstream takes the norm of per-tensor norms, the same value up to rounding), ``eps = 1e-12`` in the
same three places, the adaptive norm weights ``g`` by ``|w|`` while the perturbation weights it by
``w^2``, and the norms of step 4 are unweighted. ``rho`` is constant: DATM runs
``ProportionScheduler`` with ``rho_max == rho_min == 0.01`` and a constant learning rate. One
difference: upstream returns from ``w + e`` by subtracting ``e`` again (``(w + e) - e``, which can
differ from ``w`` in the last bit); here ``w`` is kept, so the step starts exactly from ``w``.

Every function works on one network (``(P,)`` tensors) or on ``K`` networks at once (``(K, P)``):
norms and inner products are then per row, so each expert's step is its own.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["GSAM_EPS", "gsam_perturbation", "gsam_direction", "sgd_step", "gsam_step"]

GSAM_EPS = 1e-12  # upstream's perturb_eps


def _rownorm(x: Tensor) -> Tensor:
    """L2 norm over the last dim, keepdim: ``(..., P) -> (..., 1)``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def gsam_perturbation(params: Tensor, grad: Tensor, rho: float, *, adaptive: bool, eps: float = GSAM_EPS) -> Tensor:
    """The ascent step ``e`` of GSAM/SAM: shape of ``params`` (``(P,)`` or ``(K, P)``).

    Equivalent PyTorch code (one network)::

        if adaptive:
            e = rho * params**2 * grad / ((params.abs() * grad).norm() + eps)
        else:
            e = rho * grad / (grad.norm() + eps)
    """
    if params.shape != grad.shape:
        raise ValueError(f"gsam_perturbation: params {tuple(params.shape)} and grad {tuple(grad.shape)} differ")
    if adaptive:
        scale = rho / (_rownorm(params.abs() * grad) + eps)
        return grad * scale * params.square()
    return grad * (rho / (_rownorm(grad) + eps))


def gsam_direction(grad: Tensor, grad_perturbed: Tensor, alpha: float, *, eps: float = GSAM_EPS) -> Tensor:
    """GSAM's update direction ``g_p - alpha * g_orth`` (see the module docstring), shape of ``grad``.

    Args:
        grad: ``g``, the gradient at ``w``; ``(P,)`` or ``(K, P)``.
        grad_perturbed: ``g_p``, the gradient at ``w + e``, same shape.
        alpha: weight of the orthogonal component (DATM: 0.3).

    Equivalent PyTorch code (one network)::

        cos = (g @ g_p) / (g.norm() * g_p.norm() + eps)
        g_orth = g - cos * g.norm() * g_p / (g_p.norm() + eps)
        d = g_p - alpha * g_orth
    """
    if grad.shape != grad_perturbed.shape:
        raise ValueError(f"gsam_direction: grad {tuple(grad.shape)} and grad_perturbed differ in shape")
    inner = (grad * grad_perturbed).sum(dim=-1, keepdim=True)
    new_norm = _rownorm(grad_perturbed)
    old_norm = _rownorm(grad)
    cosine = inner / (new_norm * old_norm + eps)
    vertical = grad - cosine * old_norm * grad_perturbed / (new_norm + eps)
    return grad_perturbed.add(vertical, alpha=-alpha)  # as upstream's p.grad.add_(vertical, alpha=-alpha)


def sgd_step(
    params: Tensor,
    direction: Tensor,
    lr: float,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_buffer: Tensor | None = None,
) -> Tensor:
    """One step of PyTorch's SGD (no dampening, no Nesterov) with ``direction`` as the gradient.

    Returns the new parameters (a new tensor). With ``momentum > 0``, ``momentum_buffer`` (zeros before
    the first step) is updated in place: ``buf = momentum * buf + d``, which on the first step equals
    PyTorch's ``buf = d``.

    Equivalent PyTorch code::

        d = direction + weight_decay * params
        buf = momentum * buf + d if momentum else d
        params - lr * buf
    """
    d = direction
    if weight_decay != 0.0:
        d = d.add(params, alpha=weight_decay)
    if momentum != 0.0:
        if momentum_buffer is None:
            raise ValueError("sgd_step: momentum > 0 needs a momentum_buffer (zeros before the first step)")
        momentum_buffer.mul_(momentum).add_(d)
        d = momentum_buffer
    return params.add(d, alpha=-lr)


def gsam_step(
    params: Tensor,
    grad_fn: Callable[[Tensor], Tensor],
    *,
    lr: float,
    rho: float,
    alpha: float,
    adaptive: bool,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_buffer: Tensor | None = None,
    grad: Tensor | None = None,
) -> Tensor:
    """One full GSAM step: ``grad_fn(w) -> grad L(w)`` evaluated at ``w`` and at ``w + e``.

    ``grad`` may be passed when ``grad_fn(params)`` is already known. Returns the new parameters.
    This is the composition the trainer uses (its ``grad_fn`` also returns logits, so it inlines it).
    """
    g = grad_fn(params) if grad is None else grad
    e = gsam_perturbation(params, g, rho, adaptive=adaptive)
    g_p = grad_fn(params + e)
    d = gsam_direction(g, g_p, alpha)
    return sgd_step(params, d, lr, momentum=momentum, weight_decay=weight_decay, momentum_buffer=momentum_buffer)
