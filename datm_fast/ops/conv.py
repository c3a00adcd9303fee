"""2-D convolution whose derivatives of every order run on the convolution library's own kernels.

One unit: :func:`conv2d` (differentiable any number of times), :func:`conv2d_backward` (its input and
weight gradients in one library call, for code that writes its derivatives out), the reference
``F.conv2d`` with PyTorch's autograd, ``tests/test_conv.py`` and ``benchmarks/bench_conv.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["conv2d", "conv2d_backward"]


# ----- convolution whose derivatives of every order are the library's own forward / backward kernels --
# PyTorch differentiates its convolution backward with ``_convolution_double_backward``, which forms two
# of its four terms as convolutions over the batch axis (input and grad transposed to (C, B, H, W),
# copied, then convolved) and as a transposed convolution. On CPU those ran at about 90 GFLOP/s plus
# the copies, against 270-290 for oneDNN's own backward-data and backward-weights kernels on the same
# shapes (CIFAR-10 IPC 10 micro-batch of 25, 2 threads, 2026-12-03). Written as three functions that
# are each other's derivatives, every derivative is one of those three fast kernels:
#
#   y  = conv(x, w) + b              d/dx: input_grad(gy, w)     d/dw: weight_grad(gy, x)
#   gx = input_grad(gy, w)           d/dgy: conv(u, w)           d/dw: weight_grad(gy, u)
#   gw = weight_grad(gy, x)          d/dgy: conv(x, v)           d/dx: input_grad(gy, v)
def _conv_backward(grad_y, x, w, padding: int, mask: list[bool]):
    return torch.ops.aten.convolution_backward(
        grad_y, x, w, [w.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, mask
    )


def conv2d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, padding: int, *, need_input: bool, need_weight: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``(input_grad(grad_y, weight), weight_grad(grad_y, x))`` of ``conv2d(x, weight, padding=padding)``
    in one library call; a gradient not asked for is not computed (None). No graph is recorded.

    Equivalent PyTorch code::

        torch.autograd.grad(F.conv2d(x, weight, padding=padding), (x, weight), grad_y)
    """
    gx, gw, _ = _conv_backward(grad_y, x, weight, padding, [need_input, need_weight, False])
    return gx, gw


def _will_be_used(t: torch.Tensor) -> bool:
    """Whether the running backward pass needs a gradient for ``t`` (which requires grad).

    ``ctx.needs_input_grad`` says only that an input requires grad; ``torch.autograd.grad(loss, params)``
    with images that require grad (the exact engine's reverse step) would still compute the first
    layer's input gradient, 7% of that layer's work at IPC 10, for nothing. The autograd engine knows;
    where this torch lacks the query, assume it is needed.
    """
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return True
    try:
        node = torch.autograd.graph.get_gradient_edge(t).node
        return bool(will_execute(node))
    except (RuntimeError, AttributeError):  # outside a backward pass, or an API change: be safe
        return True


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, padding):
        ctx.save_for_backward(x, w, b)
        ctx.padding, ctx.has_bias = padding, b is not None
        return torch.nn.functional.conv2d(x, w, b, padding=padding)

    @staticmethod
    def backward(ctx, grad_y):
        x, w, b = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # The exact engine's first derivative asks for the conv outputs' gradients, not the weights'.
        need_x = need_x and _will_be_used(x)
        need_w = need_w and _will_be_used(w)
        need_b = need_b and ctx.has_bias and _will_be_used(b)
        if not torch.is_grad_enabled():
            # A first-order backward (the roll-out): one library call for all three gradients.
            gx, gw, gb = _conv_backward(grad_y, x, w, ctx.padding, [need_x, need_w, need_b])
            return gx, gw, gb, None
        gx = _ConvGrad.apply("input", grad_y, x, w, ctx.padding) if need_x else None
        gw = _ConvGrad.apply("weight", grad_y, x, w, ctx.padding) if need_w else None
        gb = grad_y.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb, None


class _ConvGrad(torch.autograd.Function):
    """``input_grad(gy, w)`` (``wrt="input"``) or ``weight_grad(gy, x)`` (``wrt="weight"``): the gradient of
    ``conv(x, w)`` in one of its operands, linear in ``gy`` and in the other operand (the one it is taken
    in gives only the shape). Each derivative is a convolution or the other gradient (see above)."""

    @staticmethod
    def forward(ctx, wrt, grad_y, x, w, padding):
        ctx.save_for_backward(grad_y, x, w)
        ctx.wrt, ctx.padding = wrt, padding
        if wrt == "input":
            return _conv_backward(grad_y, x, w, padding, [True, False, False])[0]
        return _conv_backward(grad_y, x, w, padding, [False, True, False])[1]

    @staticmethod
    def backward(ctx, adjoint):
        grad_y, x, w = ctx.saved_tensors
        need_grad_y, need_x, need_w = ctx.needs_input_grad[1:4]
        p = ctx.padding
        if ctx.wrt == "input":  # gx = input_grad(gy, w): d/dgy = conv(adjoint, w), d/dw = weight_grad(gy, adjoint)
            d_grad_y = _Conv.apply(adjoint, w, None, p) if need_grad_y else None
            d_w = _ConvGrad.apply("weight", grad_y, adjoint, w, p) if need_w else None
            return None, d_grad_y, None, d_w, None
        # gw = weight_grad(gy, x): d/dgy = conv(x, adjoint), d/dx = input_grad(gy, adjoint)
        d_grad_y = _Conv.apply(x, adjoint, None, p) if need_grad_y else None
        d_x = _ConvGrad.apply("input", grad_y, x, adjoint, p) if need_x else None
        return None, d_grad_y, d_x, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0) -> torch.Tensor:
    """2-D convolution (stride 1, no dilation, one group) whose derivatives of every order run on the
    convolution library's own forward, backward-data and backward-weights kernels (oneDNN, cuDNN).

    Same values and gradients as ``F.conv2d`` to rounding; what differs is the cost of the second
    derivative, which the exact unroll engine takes at every step: PyTorch's convolution double
    backward builds two of its terms from transposed copies of the batch, about 3x slower on CPU.

    Args:
        x: (B, C_in, H, W) input, any memory format (channels_last is fastest on CPU).
        weight: (C_out, C_in, kH, kW).
        bias: (C_out,) or None.
        padding: zero padding on every side.

    Under autocast, float32 operands are cast to the autocast dtype first, as ``F.conv2d``'s are.

    Equivalent PyTorch code::

        F.conv2d(x, weight, bias, padding=padding)
    """
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            "conv2d: x must be (B, C_in, H, W) and weight (C_out, C_in, kH, kW) with the same C_in, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"conv2d: padding must be an int >= 0, got {padding!r}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As autocast treats aten's convolution: float32 operands in the autocast dtype (float64 stays),
        # then no autocast inside, so that every derivative sees the operands its forward saw.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = (_autocast_operand(t, dtype) for t in (x, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return _Conv.apply(x, weight, bias, padding)
    return _Conv.apply(x, weight, bias, padding)


def _autocast_operand(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None and t.dtype == torch.float32 else t
