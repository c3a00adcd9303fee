"""The arithmetic a stage runs its float32 network in, stated explicitly: one setting for every stage.

Precisions (``ExpertConfig.precision``, ``EvalConfig.precision``, the distill engine's ``precision``):
    float32   IEEE float32 in every convolution and matmul: TF32 off in cuBLAS and cuDNN. PyTorch's own
              default is not this: it lets cuDNN convolutions use TF32 on Ampere and later GPUs
              (``torch.backends.cudnn.conv.fp32_precision == "tf32"``), which upstream DATM ran under.
    tf32      TF32 allowed in the convolutions and matmuls of float32 tensors (10-bit mantissa inputs,
              float32 accumulation) on GPUs that have it; the same as float32 on a CPU.
    bfloat16  the network's forward (and so its backward and Hessian-vector products) under bfloat16
              autocast: convolutions and matmuls in bfloat16, norms, softmax and every parameter,
              gradient and update in float32. The set, the trajectory and the learned lr stay float32.

float64 tensors are never touched by either mode (TF32 and autocast apply to float32 only), so the
float64 exactness tests hold under every setting.

Both modes are process-wide switches in PyTorch (the TF32 flags are global, autocast is per thread);
:func:`precision_scope` and :func:`forward_autocast` set them for a ``with`` block and restore what was
there, so nothing leaks out of a stage. The TF32 flags are read and written through the
``fp32_precision`` API where this torch has it (2.9 and later), else through ``allow_tf32``: the two
must not be mixed in one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch

__all__ = [
    "PRECISIONS",
    "Precision",
    "check_precision",
    "forward_autocast",
    "precision_scope",
    "precision_summary",
    "tf32_enabled",
]

Precision = Literal["float32", "tf32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(owner: str, value: object) -> Precision:
    """``value`` as a :data:`Precision`, or a ValueError that names ``owner`` and the choices."""
    if value not in PRECISIONS:
        raise ValueError(f"{owner}: precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value  # type: ignore[return-value]


def _new_api() -> bool:
    return hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")


def _read_tf32() -> tuple[object, object]:
    if _new_api():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _write_tf32(matmul: object, conv: object) -> None:
    if _new_api():
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


def tf32_enabled() -> bool:
    """Whether float32 convolutions and matmuls may use TF32 now (both must, for True)."""
    matmul, conv = _read_tf32()
    if _new_api():
        return matmul == "tf32" and conv == "tf32"
    return bool(matmul) and bool(conv)


@contextlib.contextmanager
def precision_scope(precision: Precision) -> Iterator[None]:
    """The TF32 switches for ``precision`` (on for ``"tf32"``, off otherwise) inside the block, restored
    after it. Autocast is not entered here: it belongs around forward passes only
    (:func:`forward_autocast`), so that backward passes run in the dtypes their forward recorded."""
    check_precision("precision_scope", precision)
    saved = _read_tf32()
    value: object = precision == "tf32"
    if _new_api():
        value = "tf32" if precision == "tf32" else "ieee"
    _write_tf32(value, value)
    try:
        yield
    finally:
        _write_tf32(*saved)


def forward_autocast(precision: Precision, device_type: str) -> contextlib.AbstractContextManager[object]:
    """bfloat16 autocast on ``device_type`` for ``precision == "bfloat16"``, else nothing (the
    datm_fast ops follow it: :func:`datm_fast.ops.conv2d` in bfloat16, the fused block in float32).

    The cast cache is off: a CUDA graph cannot capture a forward under a caching autocast (PyTorch's
    CUDA-graph notes), and every weight is cast once per forward in our networks, so it saves nothing."""
    if check_precision("forward_autocast", precision) == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def precision_summary() -> str:
    """One line for ``datm-fast info``: what datm_fast's stages run in by default, and what this process's
    PyTorch would do outside them (its TF32 switches as they are now; reading them starts no CUDA)."""
    matmul, conv = _read_tf32()
    if _new_api():  # "none": inherit torch.backends.fp32_precision, whose "none" is IEEE
        process = f"matmul {matmul if matmul != 'none' else 'ieee'}, cuDNN conv {conv if conv != 'none' else 'ieee'}"
    else:
        process = f"matmul {'tf32' if matmul else 'ieee'}, cuDNN conv {'tf32' if conv else 'ieee'}"
    return (
        f"precision: datm_fast stages run float32 as IEEE unless given --precision tf32 or bfloat16 "
        f"(torch's own defaults here: {process})"
    )
