"""The ConvNet block epilogue, instance norm -> ReLU -> 2x2 average pool, in plain PyTorch.

Two references:

* :func:`norm_relu_pool_reference`: the composite of PyTorch ops, differentiable any number of times
  by autograd. It is the ground truth.
* :func:`block_forward_reference`, :func:`block_backward_reference` and
  :func:`block_double_backward_reference`: the closed-form forward, gradient and gradient-of-gradient
  the fused kernels compute (``csrc/block.h`` writes the same formulas per element). They are the
  ``torch`` backend of :func:`datm_fast.ops.norm_relu_pool`, and the tests check them against the
  composite's autograd.

Per (sample, channel) plane of ``M = H * W`` elements, with ``z`` the convolution output:

    mu, r = mean(z), 1 / sqrt(var(z) + eps)          (biased variance, as GroupNorm(C, C))
    xhat = (z - mu) * r,  n = gamma * xhat + beta,  a = relu(n),  p = avgpool2x2(a)

Backward, given ``gp = dL/dp``: ``gn = [n > 0] * upsample(gp) / 4`` (zero outside the pooled
windows when H or W is odd), ``dgamma = sum(gn * xhat)``, ``dbeta = sum(gn)`` (over the batch and the
plane), ``dz = gamma * r * (gn - mean(gn) - xhat * mean(gn * xhat))``.

Double backward, given the adjoints ``u`` of ``dz`` and ``u_gamma``, ``u_beta`` of each plane's
``sum(gn * xhat)`` and ``sum(gn)`` (whose batch sums are ``dgamma`` and ``dbeta``; the Hessian-vector
product of the exact unroll engine goes through here): see
:func:`block_double_backward_reference`, whose comments derive each term. The ReLU mask is piecewise
constant, so no term comes from it, exactly as in autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "norm_relu_pool_reference",
    "block_forward_reference",
    "block_backward_reference",
    "block_double_backward_reference",
]


def norm_relu_pool_reference(z: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """``avg_pool2d(relu(group_norm(z, C, gamma, beta, eps)), 2)``: the ConvNet block after its conv."""
    return F.avg_pool2d(F.relu(F.group_norm(z, z.shape[1], gamma, beta, eps=eps)), kernel_size=2, stride=2)


def _plane_stats(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    zf = z.flatten(2)
    mean = zf.mean(dim=2)
    var = (zf - mean[..., None]).square().mean(dim=2)
    return mean, torch.rsqrt(var + eps)


def _xhat_mask_gn(
    gp: Tensor, z: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """xhat, the ReLU mask and gn = mask * upsample(gp) / 4 (zero outside the pooled windows)."""
    H, W = z.shape[2:]
    Ho, Wo = gp.shape[2:]
    xhat = (z - mean[..., None, None]) * rstd[..., None, None]
    mask = (gamma[:, None, None] * xhat + beta[:, None, None]) > 0
    ga = gp.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) * 0.25
    if (2 * Ho, 2 * Wo) != (H, W):
        ga = F.pad(ga, (0, W - 2 * Wo, 0, H - 2 * Ho))
    return xhat, mask, torch.where(mask, ga, torch.zeros((), dtype=ga.dtype, device=ga.device))


def block_forward_reference(z: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, mean, rstd)``: the pooled output and each plane's statistics, ``(B, C)``."""
    mean, rstd = _plane_stats(z, eps)
    xhat = (z - mean[..., None, None]) * rstd[..., None, None]
    a = F.relu(gamma[:, None, None] * xhat + beta[:, None, None])
    return F.avg_pool2d(a, kernel_size=2, stride=2), mean, rstd


def block_backward_reference(
    gp: Tensor, z: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dz, sum_gn, sum_gn_xhat)``; the batch sums of the last two, ``(B, C)``, are dbeta and dgamma."""
    xhat, _, gn = _xhat_mask_gn(gp, z, gamma, beta, mean, rstd)
    m1 = gn.mean(dim=(2, 3))
    m2 = (gn * xhat).mean(dim=(2, 3))
    M = z.shape[2] * z.shape[3]
    dz = (gamma[:, None, None] * rstd[..., None, None]) * (gn - m1[..., None, None] - xhat * m2[..., None, None])
    return dz, m1 * M, m2 * M


def block_double_backward_reference(
    u: Tensor,
    u_gamma: Tensor,
    u_beta: Tensor,
    gp: Tensor,
    z: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adjoints of the backward's inputs: ``(d gp, d z, d gamma per plane (B, C))``; d beta is zero.

    ``u`` is the adjoint of ``dz``; ``u_gamma`` and ``u_beta``, ``(B, C)``, those of the per-plane sums
    ``sum_gn_xhat`` and ``sum_gn`` of :func:`block_backward_reference` (an adjoint of ``dgamma`` and
    ``dbeta``, ``(C,)``, is the same row for every sample: ``u_gamma.expand(B, C)``).
    """
    M = z.shape[2] * z.shape[3]
    xhat, mask, gn = _xhat_mask_gn(gp, z, gamma, beta, mean, rstd)

    def pmean(t: Tensor) -> Tensor:
        return t.mean(dim=(2, 3))[..., None, None]

    r = rstd[..., None, None]
    g = gamma[:, None, None]
    ug, ub = u_gamma[..., None, None], u_beta[..., None, None]
    ghat = g * gn  # d L / d xhat of the first backward
    A, Bm = pmean(ghat), pmean(ghat * xhat)  # dz = r * (ghat - A - xhat * Bm)
    U1, U2 = pmean(u), pmean(u * xhat)
    # dz is the instance-norm backward applied to ghat, a self-adjoint map: ghat's adjoint is t.
    t = r * (u - U1 - xhat * U2)
    gn_adj = g * t + ug * xhat + ub  # from ghat = gamma * gn, dgamma = sum(gn * xhat), dbeta = sum(gn)
    ga_adj = torch.where(mask, gn_adj, torch.zeros((), dtype=gn_adj.dtype, device=gn_adj.device))
    Ho, Wo = gp.shape[2:]
    d_gp = F.avg_pool2d(ga_adj, kernel_size=2, stride=2)  # ga = upsample(gp) / 4
    d_gamma = (t * gn).sum(dim=(2, 3))
    # xhat enters dz directly (-r * xhat * Bm, with Bm = mean(ghat * xhat)) and dgamma = sum(gn * xhat).
    v = -r * (u * Bm + U2 * ghat) + ug * gn
    # r enters dz as a factor: its adjoint is sum(u * dz) / r.
    rho = (u * (ghat - A - xhat * Bm)).sum(dim=(2, 3), keepdim=True)
    # xhat = (z - mu) * r: the instance-norm backward of v; and dr/dz = -r^2 * xhat / M.
    d_z = r * (v - pmean(v) - xhat * pmean(v * xhat)) - rho * r * r * xhat / M
    assert d_gp.shape[2:] == (Ho, Wo)
    return d_gp, d_z, d_gamma
