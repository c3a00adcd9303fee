"""The ConvNet block after its convolution, fused: instance norm (affine) -> ReLU -> 2x2 average pool.

One unit, and the only way into it: the arithmetic is ``csrc/block.h``, shared by the C++ launchers
(``csrc/block_cpu.cpp``: NCHW plane kernels and channels_last sample kernels) and the CUDA kernels
(``csrc/block_cuda.cu``) behind three operators,

    torch.ops.datm_fast.block_forward(z, gamma, beta, eps)             -> (out, mean, rstd)
    torch.ops.datm_fast.block_backward(gp, z, gamma, beta, mean, rstd) -> (dz, sum_gn, sum_gn_xhat)
    torch.ops.datm_fast.block_double_backward(u, u_sum_gn_xhat, u_sum_gn, gp, z, gamma, beta, mean, rstd)
                                                                         -> (d_gp, d_z, d_gamma per plane)

whose fake kernels and autograd formulas are registered here (each operator's derivative is the next
one, so ``create_graph=True`` and Hessian-vector products run on the fused kernels); the closed-form
references are :mod:`datm_fast.reference.block`. The Triton kernels (``kernels/block.py``, imported
only when the ``triton`` backend is asked for) compute the same three functions with the same
signatures; they are not torch operators, so the same autograd formulas wrap them here as
``torch.autograd.Function`` s. ``sum_gn`` and ``sum_gn_xhat`` are per (sample,
channel) plane, ``(B, C)``: their batch sums are ``dbeta`` and ``dgamma``.

* :func:`norm_relu_pool_why_not` says why the compiled kernels cannot take an input (the one check;
  the Triton kernels add a limit on the plane size);
* :func:`block_kernels` is the one dispatcher: the three kernels of the chosen backend, compiled,
  Triton or the closed-form references, for code that calls them one by one (the exact engine's
  written-out steps);
* :func:`norm_relu_pool` is the differentiable op (any order) that networks call.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .._ext import on_load
from ..backends import Backend, resolve_backend
from ..reference.block import (
    block_backward_reference,
    block_double_backward_reference,
    block_forward_reference,
    norm_relu_pool_reference,
)

__all__ = ["BlockKernels", "block_kernels", "norm_relu_pool", "norm_relu_pool_why_not", "resolve_block_backend"]


def norm_relu_pool_why_not(z: Tensor) -> str | None:
    """Why the compiled kernels (C++, CUDA) cannot take ``z``, or None when they can."""
    if z.dtype not in (torch.float32, torch.float64):
        return f"the compiled kernels take float32 or float64, got {z.dtype}"
    if z.dim() != 4 or z.shape[2] < 2 or z.shape[3] < 2:
        return f"the compiled kernels take (B, C, H, W) with H, W >= 2, got shape {tuple(z.shape)}"
    return None


# The Triton kernels hold a plane in one vector of registers: kernels/block.py's MAX_PLANE_ELEMENTS
# (not imported from there: that imports triton).
_TRITON_MAX_PLANE_ELEMENTS = 4096


def _triton_why_not(z: Tensor) -> str | None:
    """Why the Triton kernels cannot take ``z``: the compiled kernels' limits, and the plane size."""
    why = norm_relu_pool_why_not(z)
    if why is None and z.shape[2] * z.shape[3] > _TRITON_MAX_PLANE_ELEMENTS:
        return (
            f"the Triton kernels take planes of at most {_TRITON_MAX_PLANE_ELEMENTS} elements (64 x 64), "
            f"got {z.shape[2]} x {z.shape[3]}"
        )
    return why


def resolve_block_backend(backend: Backend, z: Tensor) -> str:
    """The backend that runs the block on ``z``: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    ``"auto"`` takes the compiled kernels of ``z``'s device (C++ or CUDA) when they are live and can
    take ``z``, else PyTorch; it never takes Triton: on a GPU the CUDA kernels come first and the
    Triton ones have not yet been measured against them. An explicit backend that cannot take ``z``
    (``"triton"`` is live on CPU only in the interpreter, ``TRITON_INTERPRET=1``) is an error that
    says why.
    """
    chosen = resolve_backend(backend, z.device)
    why = _triton_why_not(z) if chosen == "triton" else norm_relu_pool_why_not(z)
    if backend == "auto":
        return chosen if chosen in ("cpp", "cuda") and why is None else "torch"
    if chosen != "torch" and why is not None:
        raise ValueError(f"norm_relu_pool: backend {backend!r} cannot run this input: {why}")
    return chosen


class BlockKernels(NamedTuple):
    """The block's three kernels on one backend (signatures as the operators in the module docstring)."""

    backend: str  # "cpp", "cuda", "triton" or "torch" (the closed-form references)
    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    double_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


_REFERENCE_KERNELS = BlockKernels(
    "torch", block_forward_reference, block_backward_reference, block_double_backward_reference
)


def block_kernels(backend: Backend, z: Tensor) -> BlockKernels:
    """The dispatcher: the kernels that :func:`resolve_block_backend` picks for ``z``.

    They take and return plain tensors without recording a graph; what calls them is its own autograd.
    """
    chosen = resolve_block_backend(backend, z)
    if chosen == "torch":
        return _REFERENCE_KERNELS
    if chosen == "triton":
        from ..kernels import block  # triton is imported only when asked for

        return BlockKernels("triton", block.block_forward, block.block_backward, block.block_double_backward)
    ops = torch.ops.datm_fast
    return BlockKernels(chosen, ops.block_forward, ops.block_backward, ops.block_double_backward)


def norm_relu_pool(z: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5, *, backend: Backend = "auto") -> Tensor:
    """The ConvNet block after its convolution, fused: instance norm (affine) -> ReLU -> 2x2 average pool.

    Args:
        z: (B, C, H, W) convolution output, float32 or float64 for the compiled and Triton backends,
            any memory format (the C++ kernels keep channels_last; the CUDA and Triton ones are NCHW);
            for Triton, planes of at most 64 x 64 elements.
        gamma, beta: (C,) the norm's affine weight and bias.
        eps: added to the variance, as ``nn.GroupNorm(C, C, eps=eps)``.
        backend: ``"auto"`` (C++ on CPU, CUDA on GPU where built, else PyTorch; never Triton),
            ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (see :func:`resolve_block_backend`).

    Under autocast, a bfloat16 or float16 ``z`` is normalised in float32 and the output is float32.

    Returns (B, C, H // 2, W // 2), differentiable any number of times in z, gamma and beta (the second
    derivative is the fused double-backward kernel, as the unroll engines need; a third one is not
    implemented by the compiled and Triton kernels).

    Equivalent PyTorch code::

        F.avg_pool2d(F.relu(F.group_norm(z, C, gamma, beta, eps)), 2)
    """
    if z.dim() != 4:
        raise ValueError(f"norm_relu_pool: z must be (B, C, H, W), got shape {tuple(z.shape)}")
    if torch.is_autocast_enabled(z.device.type) and z.dtype in (torch.bfloat16, torch.float16):
        # A norm under autocast runs in float32, as aten's own norms do there: its statistics over a
        # plane in bfloat16 (8-bit mantissa) would lose the small variances; the next convolution casts
        # the float32 output back.
        z = z.float()
        gamma, beta = gamma.float(), beta.float()
    channels = z.shape[1]
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t.shape != (channels,):
            raise ValueError(f"norm_relu_pool: {name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.dtype != z.dtype or t.device != z.device:
            raise ValueError(f"norm_relu_pool: {name} must have z's dtype and device ({z.dtype}, {z.device})")
    kernels = block_kernels(backend, z)
    if kernels.backend == "torch":
        return norm_relu_pool_reference(z, gamma, beta, eps)
    if kernels.backend == "triton":
        return _BlockForward.apply(kernels, z, gamma, beta, float(eps))[0]
    return torch.ops.datm_fast.block_forward(z, gamma, beta, float(eps))[0]


# ----- autograd: the derivative of each kernel is the next one ---------------------------------------
# One set of formulas for the compiled operators (registered on them below) and for kernels that are
# not torch operators (the Triton ones, through the autograd.Functions here).
def _grads_of_forward(
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
    grad_out: Tensor,
    z: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """block_forward's derivative, ``(dz, dgamma, dbeta)``: the backward kernel's per-plane sums summed
    over the batch."""
    dz, sum_gn, sum_gn_xhat = backward(grad_out, z, gamma, beta, mean, rstd)
    return dz, sum_gn_xhat.sum(0), sum_gn.sum(0)


def _grads_of_backward(
    double_backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
    u: Tensor,
    u_sum_gn: Tensor,
    u_sum_gn_xhat: Tensor,
    gp: Tensor,
    z: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """block_backward's derivative, ``(d gp, d z, d gamma)``, given the adjoints of its three outputs.
    mean and rstd must be block_forward's statistics of z: the double-backward formulas carry their
    dependence on z, so none flows to them; beta reaches the gradient only through the ReLU mask, whose
    derivative is zero."""
    d_gp, d_z, d_gamma = double_backward(u, u_sum_gn_xhat, u_sum_gn, gp, z, gamma, beta, mean, rstd)
    return d_gp, d_z, d_gamma.sum(0)


_NO_THIRD_ORDER = (
    "norm_relu_pool: the fused kernels give the first and second derivatives; a third one is not "
    "implemented (use backend='torch')"
)


class _BlockForward(torch.autograd.Function):
    """block_forward of kernels that are not torch operators; its derivative is :class:`_BlockBackward`."""

    @staticmethod
    def forward(ctx, kernels: BlockKernels, z: Tensor, gamma: Tensor, beta: Tensor, eps: float):
        out, mean, rstd = kernels.forward(z, gamma, beta, eps)
        ctx.kernels = kernels
        ctx.save_for_backward(z, gamma, beta, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)  # outputs for the backward's sake
        return out, mean, rstd

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean: Tensor, _grad_rstd: Tensor):
        backward = functools.partial(_BlockBackward.apply, ctx.kernels)
        return None, *_grads_of_forward(backward, grad_out, *ctx.saved_tensors), None


class _BlockBackward(torch.autograd.Function):
    """block_backward of kernels that are not torch operators; its derivative is the double backward."""

    @staticmethod
    def forward(
        ctx, kernels: BlockKernels, gp: Tensor, z: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor
    ):
        ctx.kernels = kernels
        ctx.save_for_backward(gp, z, gamma, beta, mean, rstd)
        return kernels.backward(gp, z, gamma, beta, mean, rstd)

    @staticmethod
    def backward(ctx, u: Tensor, u_sum_gn: Tensor, u_sum_gn_xhat: Tensor):
        double_backward = functools.partial(_BlockDoubleBackward.apply, ctx.kernels)
        grads = _grads_of_backward(double_backward, u, u_sum_gn, u_sum_gn_xhat, *ctx.saved_tensors)
        return None, *grads, None, None, None


class _BlockDoubleBackward(torch.autograd.Function):
    """block_double_backward of kernels that are not torch operators: its derivative is not implemented."""

    @staticmethod
    def forward(ctx, kernels: BlockKernels, *tensors: Tensor):
        return kernels.double_backward(*tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise NotImplementedError(_NO_THIRD_ORDER)


# ----- fake kernels and autograd of the compiled operators ------------------------------------------
def _like(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An empty output as the launchers make it: channels_last for a channels_last CPU input, else NCHW."""
    channels_last = (
        t.device.type == "cpu" and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.new_empty(shape).contiguous(memory_format=fmt)


def _register_compiled_parts() -> None:
    @torch.library.register_fake("datm_fast::block_forward")
    def _forward_fake(z, gamma, beta, eps):
        b, c, h, w = z.shape
        return _like(z, (b, c, h // 2, w // 2)), z.new_empty(b, c), z.new_empty(b, c)

    @torch.library.register_fake("datm_fast::block_backward")
    def _backward_fake(gp, z, gamma, beta, mean, rstd):
        b, c = z.shape[:2]
        return _like(z, tuple(z.shape)), z.new_empty(b, c), z.new_empty(b, c)

    @torch.library.register_fake("datm_fast::block_double_backward")
    def _double_backward_fake(u, u_gamma, u_beta, gp, z, gamma, beta, mean, rstd):
        b, c = z.shape[:2]
        return _like(z, tuple(gp.shape)), _like(z, tuple(z.shape)), z.new_empty(b, c)

    # block_forward: the statistics are outputs for the backward's sake, not differentiable.
    def forward_setup(ctx, inputs, output):
        z, gamma, beta, _eps = inputs
        _out, mean, rstd = output
        ctx.save_for_backward(z, gamma, beta, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def forward_backward(ctx, grad_out, _grad_mean, _grad_rstd):
        return *_grads_of_forward(torch.ops.datm_fast.block_backward, grad_out, *ctx.saved_tensors), None

    torch.library.register_autograd("datm_fast::block_forward", forward_backward, setup_context=forward_setup)

    # block_backward: its derivative is the double backward.
    def backward_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_backward(ctx, u, u_sum_gn, u_sum_gn_xhat):
        double_backward = torch.ops.datm_fast.block_double_backward
        return *_grads_of_backward(double_backward, u, u_sum_gn, u_sum_gn_xhat, *ctx.saved_tensors), None, None, None

    torch.library.register_autograd("datm_fast::block_backward", backward_backward, setup_context=backward_setup)

    def double_backward_setup(ctx, inputs, output):
        pass

    def double_backward_backward(ctx, *grads):
        raise NotImplementedError(_NO_THIRD_ORDER)

    torch.library.register_autograd(
        "datm_fast::block_double_backward", double_backward_backward, setup_context=double_backward_setup
    )


on_load(_register_compiled_parts)
