"""K ConvNets of one spec evaluated together: grouped convolutions over stacked flat parameters.

Expert ``k`` of a group owns row ``k`` of a ``(K, P)`` parameter matrix and channel block ``k`` of every
activation: a batch of K experts' images is one ``(B, K * C, H, W)`` tensor, each conv is one grouped
convolution (``groups=K``), instance/group/batch norm and pooling are per channel anyway, and the
heads are one batched matmul. Each expert's logits depend on its own parameters and images only, so
``sum_k loss_k`` back-propagates each expert's own gradient into its row (exactly as training it alone,
up to the summation order inside the grouped kernels).

The network is the ConvNet family of :mod:`datm_fast.models` (every norm, activation and pooling);
for K = 1 this computes what :func:`datm_fast.models.convnet_forward` computes.

Speed (CPU, CIFAR ConvNet, batch 256): the convolutions are not the only bottleneck. The memory-bound
instance norm, ReLU and pooling around them took 60% of a training step in eager PyTorch (aten's
``native_group_norm_backward`` alone 26%, each op one pass over a 134 MB activation). Where the spec's
blocks are instance norm -> ReLU -> 2x2 average pool, a block backend other than None runs them as the
fused op :func:`datm_fast.ops.norm_relu_pool` (per channel, so K experts' channels are just more
channels): on CPU the C++ kernels, one pass per channels_last sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import Backend
from ..models import ConvNetSpec, apply_activation, apply_pooling
from ..models.convnet import GROUPNORM_GROUPS, NORM_EPS
from ..ops import norm_relu_pool

__all__ = ["batched_logits", "stack_inputs"]


def _rows(params: Tensor, spec: ConvNetSpec, i: int) -> Tensor:
    """Parameter ``i`` of every expert: ``(K, *shape)`` (a view of ``params``)."""
    p = spec.params[i]
    return params[:, p.offset : p.offset + p.numel].view(params.shape[0], *p.shape)


def stack_inputs(x: Tensor, channels_last: bool) -> Tensor:
    """``(K, B, C, H, W)`` per-expert images -> ``(B, K * C, H, W)``, channel block ``k`` = expert ``k``."""
    k, b, c, h, w = x.shape
    if channels_last:
        # (B, H, W, K, C) contiguous is exactly the channels_last storage of (B, K*C, H, W).
        return x.permute(1, 3, 4, 0, 2).contiguous().view(b, h, w, k * c).permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(b, k * c, h, w)


def _norm(spec: ConvNetSpec, h: Tensor, k: int, gamma: Tensor, beta: Tensor) -> Tensor:
    """Norm of ``h`` ``(B, K*C, H, W)`` with per-expert affine ``gamma``, ``beta`` ``(K, *shape)``."""
    if spec.norm == "instance":
        return F.group_norm(h, h.shape[1], gamma.reshape(-1), beta.reshape(-1), eps=NORM_EPS)
    if spec.norm == "group":
        return F.group_norm(h, k * GROUPNORM_GROUPS, gamma.reshape(-1), beta.reshape(-1), eps=NORM_EPS)
    if spec.norm == "batch":
        return F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True, eps=NORM_EPS)
    # layer norm over each expert's (C, H, W)
    b, kc, hh, ww = h.shape
    h5 = h.reshape(b, k, kc // k, hh, ww)
    out = F.layer_norm(h5, h5.shape[2:], eps=NORM_EPS) * gamma + beta
    return out.reshape(b, kc, hh, ww)


def batched_logits(
    spec: ConvNetSpec,
    params: Tensor,
    x: Tensor,
    *,
    shared_input: bool = False,
    block_backend: Backend | None = None,
) -> Tensor:
    """Logits of K experts: ``(K, B, num_classes)``.

    Args:
        spec: the architecture of every expert.
        params: ``(K, spec.num_params)`` flat parameters, one row per expert.
        x: with ``shared_input=False``, ``(B, K * C, H, W)`` (see :func:`stack_inputs`): expert ``k``
            sees channels ``k*C:(k+1)*C``. With ``shared_input=True``, ``(B, C, H, W)`` images that every
            expert sees (evaluation); the first conv is then one ordinary conv with K*width filters.
        block_backend: run instance norm -> ReLU -> avg pool blocks as the fused op on this backend
            (``datm_fast.ops.norm_relu_pool``), or None for PyTorch's separate ops.

    Equivalent PyTorch code::

        torch.stack([convnet_forward(spec, params[k], x_k) for k in range(K)])
    """
    k = params.shape[0]
    fuse = block_backend is not None and spec.norm_relu_pool_blocks
    h = x
    for d, (layer, where) in enumerate(zip(spec.layers, spec.layer_params)):
        w = _rows(params, spec, where.conv_weight)
        w = w.reshape(k * spec.width, *w.shape[2:])
        bias = _rows(params, spec, where.conv_bias).reshape(-1)
        groups = 1 if (d == 0 and shared_input) else k
        h = F.conv2d(h, w, bias, padding=layer.padding, groups=groups)
        if where.norm_weight is not None:
            gamma, beta = _rows(params, spec, where.norm_weight), _rows(params, spec, where.norm_bias)
            if fuse:
                h = norm_relu_pool(h, gamma.reshape(-1), beta.reshape(-1), NORM_EPS, backend=block_backend)
                continue
            h = _norm(spec, h, k, gamma, beta)
        h = apply_pooling(spec, apply_activation(spec, h))
    b = h.shape[0]
    feats = h.reshape(b, k, spec.num_features).transpose(0, 1)  # (K, B, F) in each expert's (C, H, W) order
    head_weight, head_bias = spec.head_params
    weight = _rows(params, spec, head_weight)  # (K, classes, F)
    bias = _rows(params, spec, head_bias)  # (K, classes)
    return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))
