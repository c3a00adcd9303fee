"""Trajectory-matching distance in Triton: ||student - target||^2 and ||start - target||^2 in one pass.

Design: each program reduces one BLOCK of elements (16384 doubles of arithmetic at most) to two
partial sums and writes them to a (num_blocks, 2) buffer; the partials are then summed in float64 by
torch in a fixed order. No atomics, so results are bit-reproducible. Elements are widened to float64
before squaring, as in the C++/CUDA kernels (csrc/distance.h): a float32 running sum over 1e6 squares
loses about 3 digits of the loss ratio. The op reads 12 bytes per float32 element and is bound by
memory bandwidth at every size from 0.3 to 1 million parameters.

Limits: 1-D contiguous float32/float64 tensors on one device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["param_distance_fwd", "param_distance_bwd"]

# 4096 elements per program: 1M parameters give 245 programs, about 2 waves on a 132-SM H100, and
# in the interpreter (numpy underneath) few enough programs that 1M elements take well under a second.
BLOCK_SIZE = 4096


@triton.jit
def _param_distance_fwd_kernel(
    student_ptr,  # pointer to theta_N, the student's final parameters, (n,)
    start_ptr,  # pointer to theta_0, the start parameters, (n,)
    target_ptr,  # pointer to theta*, the target parameters, (n,)
    partial_ptr,  # pointer to the (num_programs, 2) float64 partial sums
    n,  # number of elements
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    student = tl.load(student_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    start = tl.load(start_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    diff_num = student - target
    diff_den = start - target
    tl.store(partial_ptr + 2 * pid, tl.sum(diff_num * diff_num, axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(diff_den * diff_den, axis=0))


@triton.jit
def _param_distance_bwd_kernel(
    grad_num_ptr,  # pointer to the scalar gradient of num (read on device: no host sync)
    grad_den_ptr,  # pointer to the scalar gradient of den
    student_ptr,
    start_ptr,
    target_ptr,
    grad_student_ptr,  # outputs, (n,) each
    grad_start_ptr,
    grad_target_ptr,
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad_num = tl.load(grad_num_ptr).to(tl.float64)
    grad_den = tl.load(grad_den_ptr).to(tl.float64)
    student = tl.load(student_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    start = tl.load(start_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    grad_student = 2.0 * grad_num * (student - target)
    grad_start = 2.0 * grad_den * (start - target)
    out_ty = grad_student_ptr.dtype.element_ty
    tl.store(grad_student_ptr + offsets, grad_student.to(out_ty), mask=mask)
    tl.store(grad_start_ptr + offsets, grad_start.to(out_ty), mask=mask)
    tl.store(grad_target_ptr + offsets, (-grad_student - grad_start).to(out_ty), mask=mask)


def _check(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> None:
    if student.dim() != 1:
        raise ValueError(f"param_distance: student must be a flat 1-D vector, got shape {tuple(student.shape)}")
    if start.shape != student.shape or target.shape != student.shape:
        raise ValueError(
            "param_distance: student, start and target must have one shape, got "
            f"{tuple(student.shape)}, {tuple(start.shape)} and {tuple(target.shape)}"
        )
    if not (student.dtype == start.dtype == target.dtype) or student.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "param_distance: expected one dtype, float32 or float64, got "
            f"{student.dtype}, {start.dtype}, {target.dtype}"
        )


def param_distance_fwd(
    student: torch.Tensor, start: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (||student - target||^2, ||start - target||^2) as 0-dim tensors of the input dtype."""
    _check(student, start, target)
    student, start, target = student.contiguous(), start.contiguous(), target.contiguous()
    n = student.numel()
    num_programs = max(triton.cdiv(n, BLOCK_SIZE), 1)
    partials = torch.empty((num_programs, 2), dtype=torch.float64, device=student.device)
    _param_distance_fwd_kernel[(num_programs,)](student, start, target, partials, n, BLOCK=BLOCK_SIZE)
    totals = partials.sum(dim=0).to(student.dtype)
    return totals[0], totals[1]


def param_distance_bwd(
    grad_num: torch.Tensor,
    grad_den: torch.Tensor,
    student: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (num, den) with respect to (student, start, target), given scalar grad_num, grad_den."""
    _check(student, start, target)
    student, start, target = student.contiguous(), start.contiguous(), target.contiguous()
    n = student.numel()
    grad_student = torch.empty_like(student)
    grad_start = torch.empty_like(student)
    grad_target = torch.empty_like(student)
    grad_num = grad_num.reshape(1).to(device=student.device, dtype=student.dtype)
    grad_den = grad_den.reshape(1).to(device=student.device, dtype=student.dtype)
    grid = (max(triton.cdiv(n, BLOCK_SIZE), 1),)
    _param_distance_bwd_kernel[grid](
        grad_num, grad_den, student, start, target, grad_student, grad_start, grad_target, n, BLOCK=BLOCK_SIZE
    )
    return grad_student, grad_start, grad_target
