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

from .. import ops  # by attribute, so that benchmarks/profile_unroll.py can time each kernel call
from ..models import ConvNetSpec
from ..models.convnet import NORM_EPS

__all__ = ["explicit_step_supported", "gradient", "ReverseStepResult", "reverse_step"]


def explicit_step_supported(spec: ConvNetSpec, fused: bool) -> bool:
    """Whether :func:`reverse_step` covers this network: fused instance norm -> ReLU -> avg-pool blocks."""
    return fused and spec.norm == "instance" and spec.activation == "relu" and spec.pooling == "avg"


def _conv_grads(grad_y: Tensor, x: Tensor, w: Tensor, padding: int, need_x: bool, need_w: bool):
    """input_grad(grad_y, w) and weight_grad(grad_y, x) in one library call (either may be skipped)."""
    gx, gw, _ = ops._conv_backward(grad_y, x, w, padding, [need_x, need_w, False])
    return gx, gw


def _forward(spec: ConvNetSpec, params: list[Tensor], x: Tensor, block_backend: str):
    """The network's forward pass, keeping what the derivatives read back: every block's input ``hs``,
    conv output ``zs`` and norm statistics, the flattened features and the logits."""
    hs, zs, stats = [x], [], []
    i = 0
    for layer in spec.layers:
        z = F.conv2d(hs[-1], params[i], params[i + 1], padding=layer.padding)
        h, mean, rstd = ops._block_forward_impl(block_backend, z, params[i + 2], params[i + 3], NORM_EPS)
        zs.append(z)
        stats.append((mean, rstd))
        hs.append(h)
        i += 4
    flat = hs[-1].reshape(x.shape[0], -1)
    logits = flat @ params[i].t() + params[i + 1]
    return hs, zs, stats, flat, logits


def gradient(
    spec: ConvNetSpec, params: list[Tensor], x: Tensor, labels: Tensor, batch_size: int, *, backend: str = "auto"
) -> list[Tensor]:
    """``grad_theta l(theta; x, labels)`` for one micro-batch (the roll-out's step), per parameter tensor.

    The loss is the soft cross-entropy against ``softmax(labels)``, summed over the micro-batch and
    divided by ``batch_size``; each layer's input and weight gradients come from one library call.
    """
    block_backend = ops._block_backend(backend, x)
    with torch.no_grad():
        hs, zs, stats, flat, logits = _forward(spec, params, x, block_backend)
        i = 4 * len(spec.layers)
        grads: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        dlog = (torch.softmax(logits, dim=1) - torch.softmax(labels, dim=1)) / batch_size
        grads[i], grads[i + 1] = dlog.t() @ flat, dlog.sum(0)
        dh = (dlog @ params[i]).view(hs[-1].shape)
        for layer_index in reversed(range(len(spec.layers))):
            k = 4 * layer_index
            mean, rstd = stats[layer_index]
            dz, sum_gn, sum_gn_xhat = ops._block_backward_impl(
                block_backend, dh, zs[layer_index], params[k + 2], params[k + 3], mean, rstd
            )
            grads[k + 2], grads[k + 3] = sum_gn_xhat.sum(0), sum_gn.sum(0)
            padding = spec.layers[layer_index].padding
            dh, grads[k] = _conv_grads(dz, hs[layer_index], params[k], padding, layer_index > 0, True)
            grads[k + 1] = dz.sum((0, 2, 3))
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
        spec: a network :func:`explicit_step_supported` accepts.
        params: theta as separate tensors in spec order (conv weights in x's memory format).
        lam: the direction, as ``params``.
        x: (B, C, H, W) the network's input (DSA already applied).
        labels: (B, num_classes) label logits.
        batch_size: the step's whole batch (the loss is a mean over it, micro-batches are parts of it).
    """
    num_layers = len(spec.layers)
    block_backend = ops._block_backend(backend, x)
    with torch.no_grad():
        hs, zs, stats, flat, logits = _forward(spec, params, x, block_backend)
        i = 4 * num_layers
        wc = params[i]
        lam_wc, lam_bc = lam[i], lam[i + 1]
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
        for layer_index in reversed(range(num_layers)):
            k = 4 * layer_index
            mean, rstd = stats[layer_index]
            dz, sum_gn, sum_gn_xhat = ops._block_backward_impl(
                block_backend, dhs[layer_index + 1], zs[layer_index], params[k + 2], params[k + 3], mean, rstd
            )
            dzs[layer_index] = dz
            dot = dot + (sum_gn_xhat.sum(0) * lam[k + 2]).sum() + (sum_gn.sum(0) * lam[k + 3]).sum()
            if layer_index > 0:
                dhs[layer_index], _ = _conv_grads(
                    dz, hs[layer_index], params[k], spec.layers[layer_index].padding, True, False
                )

        # ----- second order, part 1: the adjoint of the first-order chain, layer 1 up to the logits
        hvp = [torch.zeros_like(t) for t in params] if need_hvp else None
        bar_h: list[Tensor | None] = [None] * (num_layers + 1)  # adjoints of hs[l] (forward values)
        bar_zs: list[Tensor] = []  # adjoints of zs[l] through the first-order chain
        bar_dh: Tensor | None = None  # adjoint of dhs[l], carried up one layer
        for layer_index in range(num_layers):
            k = 4 * layer_index
            padding = spec.layers[layer_index].padding
            h_in, dz = hs[layer_index], dzs[layer_index]
            # <gW, lam_W> + <gb, lam_b> = <dz, conv(h_in, lam_W) + lam_b>: the value is also d dot / d dz.
            bar_dz = F.conv2d(h_in, lam[k], lam[k + 1], padding=padding)
            dot = dot + (dz * bar_dz).sum()
            if layer_index > 0 or need_inputs:
                # d/dh_in of <dz, conv(h_in, lam_W)>
                bar_h[layer_index], _ = _conv_grads(dz, h_in, lam[k], padding, True, False)
            if bar_dh is not None:
                # dhs[layer_index] = input_grad(dz, W): its adjoint reaches dz and W
                bar_dz.add_(F.conv2d(bar_dh, params[k], None, padding=padding))
                if need_hvp:
                    _, gw = _conv_grads(dz, bar_dh, params[k], padding, False, True)
                    hvp[k] += gw
            mean, rstd = stats[layer_index]
            bar_dh, bar_z, bar_gamma = ops._block_double_backward_impl(
                block_backend,
                bar_dz,
                lam[k + 2],
                lam[k + 3],
                dhs[layer_index + 1],
                zs[layer_index],
                params[k + 2],
                params[k + 3],
                mean,
                rstd,
            )
            bar_zs.append(bar_z)
            if need_hvp:
                hvp[k + 2] += bar_gamma.sum(0)
        del dzs, dhs  # the first-order values are spent: the step's peak memory is in part 2
        # dh_L = dlog Wc, gWc = dlog^T flat, gbc = sum(dlog)
        bar_dh_flat = bar_dh.reshape(flat.shape)
        bar_dlog = bar_dh_flat @ wc.t() + flat @ lam_wc.t() + lam_bc
        bar_flat = dlog @ lam_wc
        if need_hvp:
            hvp[i] += dlog.t() @ bar_dh_flat
        # dlog = (softmax(logits) - softmax(labels)) / batch
        v = bar_dlog / batch_size
        bar_logits = p * (v - (p * v).sum(1, keepdim=True))
        bar_labels = -q * (v - (q * v).sum(1, keepdim=True)) if need_labels else None

        # ----- second order, part 2: the adjoint of the forward chain, the logits down to the input
        bar_flat = bar_flat + bar_logits @ wc
        if need_hvp:
            hvp[i] += bar_logits.t() @ flat
            hvp[i + 1] += bar_logits.sum(0)
        bar_out = bar_flat.view(h_last.shape)
        grad_inputs = None
        for layer_index in reversed(range(num_layers)):
            k = 4 * layer_index
            padding = spec.layers[layer_index].padding
            mean, rstd = stats[layer_index]
            bar_out_z, sum_gn, sum_gn_xhat = ops._block_backward_impl(
                block_backend, bar_out, zs[layer_index], params[k + 2], params[k + 3], mean, rstd
            )
            bar_z = bar_out_z.add_(bar_zs[layer_index])
            bar_zs[layer_index] = zs[layer_index] = None  # type: ignore[call-overload]
            if need_hvp:
                hvp[k + 2] += sum_gn_xhat.sum(0)
                hvp[k + 3] += sum_gn.sum(0)
                hvp[k + 1] += bar_z.sum((0, 2, 3))
            need_below = layer_index > 0 or need_inputs
            g_in, g_w = _conv_grads(bar_z, hs[layer_index], params[k], padding, need_below, need_hvp)
            if need_hvp:
                hvp[k] += g_w
            if need_below:
                bar_out = g_in if bar_h[layer_index] is None else g_in.add_(bar_h[layer_index])
            bar_h[layer_index] = hs[layer_index + 1] = None  # type: ignore[call-overload]
            if layer_index == 0 and need_inputs:
                grad_inputs = bar_out
    return ReverseStepResult(hvp, grad_inputs, bar_labels, dot)
