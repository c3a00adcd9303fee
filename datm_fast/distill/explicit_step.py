"""The exact engine's reverse step written out: every kernel called in order, no autograd graph.

For the ConvNets whose blocks are the fused instance norm -> ReLU -> 2x2 average pool (upstream's
default), one micro-batch of the reverse step (``datm_fast.distill.unroll``) is

    forward         z_l = conv(h_{l-1}, W_l) + b_l,  h_l = block(z_l),  logits = flat(h_L) Wc^T + bc
    first order     dlog = (softmax(logits) - softmax(Y)) / batch,  dh_L = dlog Wc,
                    dz_l = block'(dh_l),  dh_{l-1} = conv_input_grad(dz_l, W_l)
    dot             <grad_theta l, lam>, the conv terms as <dz_l, conv(h_{l-1}, lam_W) + lam_b>
    second order    the adjoint of both chains: first the first-order chain, layer 1 up to the logits,
                    then the forward chain, the logits down to the images

which is what ``torch.autograd.grad`` of ``dot`` computes through the graph of the create_graph
gradient; here there is no graph: each of the 8 convolutions per layer (5 in the first) and each block
kernel is one call, and nothing is saved that the step does not read again. The gradient is the same
to rounding (``tests/test_explicit_step.py`` compares the steps with autograd, ``tests/test_unroll.py``
the engine on them with the full engine, both in float64 to 1e-10); what it saves is autograd's
bookkeeping, measured at 10-12% of an IPC 1 iteration on CPU (``benchmarks/NOTES.md``), and it is the
shape a CUDA graph can capture. Other architectures keep the autograd step.

Every derivative here is one of three convolution kernels (see ``datm_fast.ops.conv2d``):

    y  = conv(x, w)           d/dx: input_grad(gy, w)      d/dw: weight_grad(gy, x)
    gx = input_grad(gy, w)    d/dgy: conv(u, w)            d/dw: weight_grad(gy, u)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import ConvNetSpec
from ..models.convnet import NORM_EPS
from ..ops import BlockKernels, block_kernels, conv2d_backward

__all__ = ["gradient", "ReverseStepResult", "reverse_step"]


def _forward(spec: ConvNetSpec, params: list[Tensor], x: Tensor, block: BlockKernels):
    """The network's forward pass, keeping what the derivatives read back: every block's input ``hs``,
    conv output ``zs`` and norm statistics, the flattened features and the logits."""
    hs, zs, stats = [x], [], []
    for layer, where in zip(spec.layers, spec.layer_params):
        z = F.conv2d(hs[-1], params[where.conv_weight], params[where.conv_bias], padding=layer.padding)
        h, mean, rstd = block.forward(z, params[where.norm_weight], params[where.norm_bias], NORM_EPS)
        zs.append(z)
        stats.append((mean, rstd))
        hs.append(h)
    head_weight, head_bias = spec.head_params
    flat = hs[-1].reshape(x.shape[0], -1)
    logits = flat @ params[head_weight].t() + params[head_bias]
    return hs, zs, stats, flat, logits


def gradient(
    spec: ConvNetSpec, params: list[Tensor], x: Tensor, labels: Tensor, batch_size: int, *, backend: str = "auto"
) -> list[Tensor]:
    """``grad_theta l(theta; x, labels)`` for one micro-batch (the roll-out's step), per parameter tensor.

    The loss is the soft cross-entropy against ``softmax(labels)``, summed over the micro-batch and
    divided by ``batch_size``; each layer's input and weight gradients come from one library call.
    """
    block = block_kernels(backend, x)
    with torch.no_grad():
        hs, zs, stats, flat, logits = _forward(spec, params, x, block)
        head_weight, head_bias = spec.head_params
        grads: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        dlog = (torch.softmax(logits, dim=1) - torch.softmax(labels, dim=1)) / batch_size
        grads[head_weight], grads[head_bias] = dlog.t() @ flat, dlog.sum(0)
        dh = (dlog @ params[head_weight]).view(hs[-1].shape)
        for index in reversed(range(len(spec.layers))):
            where = spec.layer_params[index]
            gamma, beta = params[where.norm_weight], params[where.norm_bias]
            dz, sum_gn, sum_gn_xhat = block.backward(dh, zs[index], gamma, beta, *stats[index])
            grads[where.norm_weight], grads[where.norm_bias] = sum_gn_xhat.sum(0), sum_gn.sum(0)
            dh, grads[where.conv_weight] = conv2d_backward(
                dz,
                hs[index],
                params[where.conv_weight],
                spec.layers[index].padding,
                need_input=index > 0,
                need_weight=True,
            )
            grads[where.conv_bias] = dz.sum((0, 2, 3))
    return grads


@dataclass
class ReverseStepResult:
    """One micro-batch's share of the reverse step: d dot / d(theta, images after DSA, labels), and dot."""

    hvp: list[Tensor] | None  # per parameter tensor, spec order; None unless asked for
    grad_inputs: Tensor | None  # d dot / d(the network's input), before DSA's adjoint
    grad_labels: Tensor | None
    dot: Tensor  # 0-d


def reverse_step(
    spec: ConvNetSpec,
    params: list[Tensor],
    lam: list[Tensor],
    x: Tensor,
    labels: Tensor,
    batch_size: int,
    *,
    backend: str = "auto",
    need_hvp: bool = True,
    need_inputs: bool = True,
    need_labels: bool = True,
) -> ReverseStepResult:
    """``dot = <grad_theta l(theta; x, labels), lam>`` and its derivatives, for one micro-batch.

    Args:
        spec: a network whose blocks are instance norm -> ReLU -> avg pool (``spec.norm_relu_pool_blocks``).
        params: theta as separate tensors in spec order (conv weights in x's memory format).
        lam: the direction, as ``params``.
        x: (B, C, H, W) the network's input (DSA already applied).
        labels: (B, num_classes) label logits.
        batch_size: the step's whole batch (the loss is a mean over it, micro-batches are parts of it).
    """
    num_layers = len(spec.layers)
    block = block_kernels(backend, x)
    batch, layers = x.shape[0], spec.layer_params
    with torch.no_grad():
        hs, zs, stats, flat, logits = _forward(spec, params, x, block)
        head_weight, head_bias = spec.head_params
        wc = params[head_weight]
        lam_wc, lam_bc = lam[head_weight], lam[head_bias]
        h_last = hs[-1]
        p = torch.softmax(logits, dim=1)
        q = torch.softmax(labels, dim=1)

        # ----- first order, without the conv weight gradients (the dot takes them through dz)
        dlog = (p - q) / batch_size
        dh = (dlog @ wc).view(h_last.shape)
        dzs: list[Tensor] = [None] * num_layers  # type: ignore[list-item]
        dhs: list[Tensor] = [None] * (num_layers + 1)  # type: ignore[list-item]  # dhs[l]: grad of hs[l]
        dhs[num_layers] = dh
        dot = (dlog * (flat @ lam_wc.t() + lam_bc)).sum()  # <gWc, lam_Wc> + <gbc, lam_bc>
        for index in reversed(range(num_layers)):
            where = layers[index]
            gamma, beta = params[where.norm_weight], params[where.norm_bias]
            dz, sum_gn, sum_gn_xhat = block.backward(dhs[index + 1], zs[index], gamma, beta, *stats[index])
            dzs[index] = dz
            dot = (
                dot + (sum_gn_xhat.sum(0) * lam[where.norm_weight]).sum() + (sum_gn.sum(0) * lam[where.norm_bias]).sum()
            )
            if index > 0:
                dhs[index], _ = conv2d_backward(
                    dz,
                    hs[index],
                    params[where.conv_weight],
                    spec.layers[index].padding,
                    need_input=True,
                    need_weight=False,
                )

        # ----- second order, part 1: the adjoint of the first-order chain, layer 1 up to the logits
        hvp = [torch.zeros_like(t) for t in params] if need_hvp else None
        bar_h: list[Tensor | None] = [None] * (num_layers + 1)  # adjoints of hs[l] (forward values)
        bar_zs: list[Tensor] = []  # adjoints of zs[l] through the first-order chain
        bar_dh: Tensor | None = None  # adjoint of dhs[l], carried up one layer
        for index in range(num_layers):
            where = layers[index]
            weight = params[where.conv_weight]
            padding = spec.layers[index].padding
            h_in, dz = hs[index], dzs[index]
            # <gW, lam_W> + <gb, lam_b> = <dz, conv(h_in, lam_W) + lam_b>: the value is also d dot / d dz.
            bar_dz = F.conv2d(h_in, lam[where.conv_weight], lam[where.conv_bias], padding=padding)
            dot = dot + (dz * bar_dz).sum()
            if index > 0 or need_inputs:
                # d/dh_in of <dz, conv(h_in, lam_W)>
                bar_h[index], _ = conv2d_backward(
                    dz, h_in, lam[where.conv_weight], padding, need_input=True, need_weight=False
                )
            if bar_dh is not None:
                # dhs[index] = input_grad(dz, W): its adjoint reaches dz and W
                bar_dz.add_(F.conv2d(bar_dh, weight, None, padding=padding))
                if need_hvp:
                    _, gw = conv2d_backward(dz, bar_dh, weight, padding, need_input=False, need_weight=True)
                    hvp[where.conv_weight] += gw
            # The adjoints of dgamma and dbeta, (C,), are the same for every sample's plane sums.
            bar_dh, bar_z, bar_gamma = block.double_backward(
                bar_dz,
                lam[where.norm_weight].expand(batch, -1),
                lam[where.norm_bias].expand(batch, -1),
                dhs[index + 1],
                zs[index],
                params[where.norm_weight],
                params[where.norm_bias],
                *stats[index],
            )
            bar_zs.append(bar_z)
            if need_hvp:
                hvp[where.norm_weight] += bar_gamma.sum(0)
        del dzs, dhs  # the first-order values are spent: the step's peak memory is in part 2
        # dh_L = dlog Wc, gWc = dlog^T flat, gbc = sum(dlog)
        bar_dh_flat = bar_dh.reshape(flat.shape)
        bar_dlog = bar_dh_flat @ wc.t() + flat @ lam_wc.t() + lam_bc
        bar_flat = dlog @ lam_wc
        if need_hvp:
            hvp[head_weight] += dlog.t() @ bar_dh_flat
        # dlog = (softmax(logits) - softmax(labels)) / batch
        v = bar_dlog / batch_size
        bar_logits = p * (v - (p * v).sum(1, keepdim=True))
        bar_labels = -q * (v - (q * v).sum(1, keepdim=True)) if need_labels else None

        # ----- second order, part 2: the adjoint of the forward chain, the logits down to the input
        bar_flat = bar_flat + bar_logits @ wc
        if need_hvp:
            hvp[head_weight] += bar_logits.t() @ flat
            hvp[head_bias] += bar_logits.sum(0)
        bar_out = bar_flat.view(h_last.shape)
        grad_inputs = None
        for index in reversed(range(num_layers)):
            where = layers[index]
            gamma, beta = params[where.norm_weight], params[where.norm_bias]
            bar_out_z, sum_gn, sum_gn_xhat = block.backward(bar_out, zs[index], gamma, beta, *stats[index])
            bar_z = bar_out_z.add_(bar_zs[index])
            bar_zs[index] = zs[index] = None  # type: ignore[call-overload]
            if need_hvp:
                hvp[where.norm_weight] += sum_gn_xhat.sum(0)
                hvp[where.norm_bias] += sum_gn.sum(0)
                hvp[where.conv_bias] += bar_z.sum((0, 2, 3))
            need_below = index > 0 or need_inputs
            g_in, g_w = conv2d_backward(
                bar_z, hs[index], params[where.conv_weight], spec.layers[index].padding,
                need_input=need_below, need_weight=need_hvp,
            )  # fmt: skip
            if need_hvp:
                hvp[where.conv_weight] += g_w
            if need_below:
                bar_out = g_in if bar_h[index] is None else g_in.add_(bar_h[index])
            bar_h[index] = hs[index + 1] = None  # type: ignore[call-overload]
            if index == 0 and need_inputs:
                grad_inputs = bar_out
    return ReverseStepResult(hvp, grad_inputs, bar_labels, dot)
