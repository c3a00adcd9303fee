"""The trajectory-matching distance ``(||student - target||^2, ||start - target||^2)``, fused.

One unit: the C++ and CUDA kernels (``csrc/distance.h``, ``csrc/ops.cpp``, ``csrc/distance_cuda.cu``)
behind ``torch.ops.datm_fast.param_distance``, the Triton kernels (``kernels/distance.py``), their
autograd and fake kernels (registered here when ``datm_fast._C`` loads), the float64 reference
(:mod:`datm_fast.reference.distance`), ``tests/test_distance.py`` and ``benchmarks/bench_distance.py``.
"""

from __future__ import annotations

import torch

from .._ext import on_load
from ..backends import Backend, resolve_backend
from ..reference.distance import param_distance_reference

__all__ = ["param_distance", "matching_loss"]


class _TritonParamDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, start, target):
        from ..kernels.distance import param_distance_fwd  # triton is imported only when asked for

        ctx.save_for_backward(student, start, target)
        return param_distance_fwd(student, start, target)

    @staticmethod
    def backward(ctx, grad_num, grad_den):
        from ..kernels.distance import param_distance_bwd

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


def _register_compiled_parts() -> None:
    """Fake kernels (for torch.compile / opcheck) and the autograd formula of the compiled op."""

    @torch.library.register_fake("datm_fast::param_distance")
    def _param_distance_fake(student, start, target):
        return student.new_empty(()), student.new_empty(())

    @torch.library.register_fake("datm_fast::param_distance_backward")
    def _param_distance_backward_fake(grad_num, grad_den, student, start, target):
        return torch.empty_like(student), torch.empty_like(student), torch.empty_like(student)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_num, grad_den):
        student, start, target = ctx.saved_tensors
        return torch.ops.datm_fast.param_distance_backward(grad_num, grad_den, student, start, target)

    torch.library.register_autograd("datm_fast::param_distance", backward, setup_context=setup_context)


on_load(_register_compiled_parts)
