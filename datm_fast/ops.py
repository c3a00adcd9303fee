"""Differentiable fused operators with a backend choice.

Each op here has a pure-PyTorch reference in :mod:`datm_fast.reference` and fast paths: the C++
operators of ``datm_fast._C`` (CPU, CUDA) and the Triton kernels of ``datm_fast.kernels``. The
backend is an argument, never a global setting; ``"auto"`` picks the fastest live one
(:func:`datm_fast.backends.resolve_backend`).
"""

from __future__ import annotations

import torch

from .backends import Backend, resolve_backend
from .reference.block import (
    block_backward_reference,
    block_double_backward_reference,
    block_forward_reference,
)
from .reference.distance import param_distance_reference

__all__ = ["param_distance", "matching_loss", "norm_relu_pool", "conv2d"]


class _TritonParamDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, start, target):
        from .kernels.distance import param_distance_fwd

        ctx.save_for_backward(student, start, target)
        return param_distance_fwd(student, start, target)

    @staticmethod
    def backward(ctx, grad_num, grad_den):
        from .kernels.distance import param_distance_bwd

        student, start, target = ctx.saved_tensors
        return param_distance_bwd(grad_num, grad_den, student, start, target)


def _check_inputs(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> None:
    for name, t in (("student", student), ("start", start), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"param_distance: {name} must be a torch.Tensor, got {type(t).__name__}")
    if student.dim() != 1:
        raise ValueError(
            f"param_distance: student must be a flat 1-D parameter vector, got shape {tuple(student.shape)}"
        )
    if start.shape != student.shape or target.shape != student.shape:
        raise ValueError(
            "param_distance: student, start and target must have the same shape, got "
            f"{tuple(student.shape)}, {tuple(start.shape)} and {tuple(target.shape)}"
        )
    if not (student.dtype == start.dtype == target.dtype):
        raise ValueError(
            f"param_distance: student, start and target must share one dtype, got "
            f"{student.dtype}, {start.dtype} and {target.dtype}"
        )
    if student.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"param_distance: expected float32 or float64 parameters, got {student.dtype}")
    if not (student.device == start.device == target.device):
        raise ValueError(
            f"param_distance: tensors must be on one device, got {student.device}, {start.device} and {target.device}"
        )


def param_distance(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances of trajectory matching, in one fused pass: ``(num, den)``.

    Args:
        student: (n,) theta_N, the student's flat parameters after the unrolled steps.
        start: (n,) theta_0, the flat expert checkpoint the student started from.
        target: (n,) theta*, the flat expert checkpoint ``expert_epochs`` later.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        Two 0-dim tensors of the input dtype, ``||student - target||^2`` and ``||start - target||^2``,
        differentiable with respect to all three inputs. The fused kernels accumulate in float64.

    Equivalent PyTorch code::

        num = ((student - target) ** 2).sum()
        den = ((start - target) ** 2).sum()
    """
    _check_inputs(student, start, target)
    chosen = resolve_backend(backend, student.device)
    if chosen == "torch":
        return param_distance_reference(student, start, target)
    if chosen in ("cpp", "cuda"):
        return torch.ops.datm_fast.param_distance(student, start, target)
    return _TritonParamDistance.apply(student, start, target)


def matching_loss(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """DATM's normalised matching loss ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2`` (0-dim)."""
    num, den = param_distance(student, start, target, backend=backend)
    return num / den


# ----- ConvNet block epilogue: instance norm -> ReLU -> 2x2 average pool -----------------------------
def _block_backend(backend: Backend, z: torch.Tensor) -> str:
    """cpp / cuda where the compiled op can take ``z``; else the closed-form PyTorch formulas.

    No Triton kernel exists for this op: ``auto`` never picks one, an explicit ``"triton"`` is an error.
    """
    if backend == "triton":
        raise ValueError("norm_relu_pool: no Triton kernel for this op; use 'auto', 'torch', 'cpp' or 'cuda'")
    supported = z.dtype in (torch.float32, torch.float64) and z.shape[2] >= 2 and z.shape[3] >= 2
    if backend == "auto":
        chosen = resolve_backend("auto", z.device)
        return chosen if chosen in ("cpp", "cuda") and supported else "torch"
    chosen = resolve_backend(backend, z.device)
    if chosen != "torch" and not supported:
        raise ValueError(
            f"norm_relu_pool: backend {backend!r} takes float32/float64 inputs with H, W >= 2, "
            f"got {z.dtype} of shape {tuple(z.shape)}"
        )
    return chosen


def _block_forward_impl(backend: str, z, gamma, beta, eps: float):
    if backend == "torch":
        return block_forward_reference(z, gamma, beta, eps)
    return torch.ops.datm_fast.block_forward(z, gamma, beta, eps)


def _block_backward_impl(backend: str, gp, z, gamma, beta, mean, rstd):
    if backend == "torch":
        return block_backward_reference(gp, z, gamma, beta, mean, rstd)
    return torch.ops.datm_fast.block_backward(gp, z, gamma, beta, mean, rstd)


def _block_double_backward_impl(backend: str, u, u_gamma, u_beta, gp, z, gamma, beta, mean, rstd):
    if backend == "torch":
        return block_double_backward_reference(u, u_gamma, u_beta, gp, z, gamma, beta, mean, rstd)
    return torch.ops.datm_fast.block_double_backward(u, u_gamma, u_beta, gp, z, gamma, beta, mean, rstd)


class _NormReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, gamma, beta, eps, backend):
        out, mean, rstd = _block_forward_impl(backend, z.detach(), gamma.detach(), beta.detach(), eps)
        ctx.save_for_backward(z, gamma, beta, mean, rstd)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, gamma, beta, mean, rstd = ctx.saved_tensors
        dz, dgamma, dbeta = _NormReluPoolBackward.apply(grad_out, z, gamma, beta, mean, rstd, ctx.backend)
        return dz, dgamma, dbeta, None, None


class _NormReluPoolBackward(torch.autograd.Function):
    """The gradient of :class:`_NormReluPool` as a function of (grad_out, z, gamma, beta): differentiable
    once more, which is what ``create_graph=True`` and the exact engine's Hessian-vector products need.
    mean and rstd are passed as constants: the double-backward formulas account for their dependence on z."""

    @staticmethod
    def forward(ctx, grad_out, z, gamma, beta, mean, rstd, backend):
        dz, sum_gn, sum_gn_xhat = _block_backward_impl(
            backend, grad_out.detach(), z.detach(), gamma.detach(), beta.detach(), mean, rstd
        )
        ctx.save_for_backward(grad_out, z, gamma, beta, mean, rstd)
        ctx.backend = backend
        return dz, sum_gn_xhat.sum(0), sum_gn.sum(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u, u_gamma, u_beta):
        grad_out, z, gamma, beta, mean, rstd = ctx.saved_tensors
        u = torch.zeros_like(z) if u is None else u
        u_gamma = torch.zeros_like(gamma) if u_gamma is None else u_gamma
        u_beta = torch.zeros_like(beta) if u_beta is None else u_beta
        d_grad_out, d_z, d_gamma = _block_double_backward_impl(
            ctx.backend, u, u_gamma, u_beta, grad_out, z, gamma, beta, mean, rstd
        )
        # beta reaches the gradient only through the ReLU mask, whose derivative is zero.
        return d_grad_out, d_z, d_gamma.sum(0), None, None, None, None


def norm_relu_pool(
    z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5, *, backend: Backend = "auto"
) -> torch.Tensor:
    """The ConvNet block after its convolution, fused: instance norm (affine) -> ReLU -> 2x2 average pool.

    Args:
        z: (B, C, H, W) convolution output, float32 or float64 for the compiled backends.
        gamma, beta: (C,) the norm's affine weight and bias.
        eps: added to the variance, as ``nn.GroupNorm(C, C, eps=eps)``.
        backend: ``"auto"`` (C++ on CPU, CUDA on GPU where built, else PyTorch), ``"torch"``, ``"cpp"``
            or ``"cuda"``.

    Returns (B, C, H // 2, W // 2). Differentiable twice in z, gamma and beta (``create_graph=True``
    works; the second derivative is the fused double-backward kernel), as the unroll engines need.

    Equivalent PyTorch code::

        F.avg_pool2d(F.relu(F.group_norm(z, C, gamma, beta, eps)), 2)
    """
    if z.dim() != 4:
        raise ValueError(f"norm_relu_pool: z must be (B, C, H, W), got shape {tuple(z.shape)}")
    C = z.shape[1]
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t.shape != (C,):
            raise ValueError(f"norm_relu_pool: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.dtype != z.dtype or t.device != z.device:
            raise ValueError(f"norm_relu_pool: {name} must have z's dtype and device ({z.dtype}, {z.device})")
    return _NormReluPool.apply(z, gamma, beta, float(eps), _block_backend(backend, z))


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
        gx = _ConvInputGrad.apply(grad_y, w, x, ctx.padding) if need_x else None
        gw = _ConvWeightGrad.apply(grad_y, x, w, ctx.padding) if need_w else None
        gb = grad_y.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb, None


class _ConvInputGrad(torch.autograd.Function):
    """``input_grad(gy, w)``: the gradient of conv(x, w) in x, linear in gy and in w (x gives the shape)."""

    @staticmethod
    def forward(ctx, grad_y, w, x, padding):
        ctx.save_for_backward(grad_y, w, x)
        ctx.padding = padding
        return _conv_backward(grad_y, x, w, padding, [True, False, False])[0]

    @staticmethod
    def backward(ctx, u):
        grad_y, w, x = ctx.saved_tensors
        d_grad_y = _Conv.apply(u, w, None, ctx.padding) if ctx.needs_input_grad[0] else None
        d_w = _ConvWeightGrad.apply(grad_y, u, w, ctx.padding) if ctx.needs_input_grad[1] else None
        return d_grad_y, d_w, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """``weight_grad(gy, x)``: the gradient of conv(x, w) in w, bilinear in gy and x (w gives the shape)."""

    @staticmethod
    def forward(ctx, grad_y, x, w, padding):
        ctx.save_for_backward(grad_y, x, w)
        ctx.padding = padding
        return _conv_backward(grad_y, x, w, padding, [False, True, False])[1]

    @staticmethod
    def backward(ctx, v):
        grad_y, x, w = ctx.saved_tensors
        d_grad_y = _Conv.apply(x, v, None, ctx.padding) if ctx.needs_input_grad[0] else None
        d_x = _ConvInputGrad.apply(grad_y, v, x, ctx.padding) if ctx.needs_input_grad[1] else None
        return d_grad_y, d_x, None, None


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
    return _Conv.apply(x, weight, bias, padding)
