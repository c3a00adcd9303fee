"""Loading of the compiled operator library ``datm_fast._C``.

As xformers' _cpp_lib does: try once, on failure remember the exception and warn once; every op then
takes its PyTorch path and :func:`datm_fast.backend_info` reports why the compiled backends are off.
Loading registers the ``torch.ops.datm_fast.*`` operators, their fake (meta) kernels and autograd
formulas. Loading never initialises CUDA.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["ExtensionStatus", "extension_status", "load_extension"]


@dataclass(frozen=True)
class ExtensionStatus:
    """What happened when ``datm_fast._C`` was loaded."""

    module: ModuleType | None  # the loaded module, or None
    error: str | None  # why it is not loaded, or None

    @property
    def loaded(self) -> bool:
        return self.module is not None

    @property
    def with_cuda(self) -> bool:
        return bool(self.module is not None and getattr(self.module, "WITH_CUDA", 0))

    @property
    def with_openmp(self) -> bool:
        return bool(self.module is not None and getattr(self.module, "WITH_OPENMP", 0))


@functools.cache
def extension_status() -> ExtensionStatus:
    """Load ``datm_fast._C`` once and report the outcome (cached: the dispatcher registry is global)."""
    if os.environ.get("DATM_FAST_DISABLE_EXT") == "1":
        return ExtensionStatus(None, "disabled by DATM_FAST_DISABLE_EXT=1")
    try:
        module = importlib.import_module("datm_fast._C")
    except ImportError as exc:
        message = (
            f"datm_fast._C is not available ({exc}); compiled operators are off and every op runs its "
            "PyTorch path. Rebuild with `pip install --no-build-isolation -e .` to enable them."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return ExtensionStatus(None, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # an ABI mismatch raises OSError or RuntimeError, not ImportError
        warnings.warn(f"datm_fast._C failed to load: {exc!r}", RuntimeWarning, stacklevel=3)
        return ExtensionStatus(None, f"{type(exc).__name__}: {exc}")
    _register_python_parts()
    return ExtensionStatus(module, None)


def load_extension() -> ModuleType | None:
    """The loaded ``datm_fast._C`` module, or None when it is not available."""
    return extension_status().module


def _register_python_parts() -> None:
    """Fake kernels (for torch.compile / opcheck) and autograd formulas of the compiled operators."""

    @torch.library.register_fake("datm_fast::param_distance")
    def _param_distance_fake(student, start, target):
        return student.new_empty(()), student.new_empty(())

    @torch.library.register_fake("datm_fast::param_distance_backward")
    def _param_distance_backward_fake(grad_num, grad_den, student, start, target):
        return torch.empty_like(student), torch.empty_like(student), torch.empty_like(student)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_num, grad_den):
        student, start, target = ctx.saved_tensors
        if grad_num is None:
            grad_num = student.new_zeros(())
        if grad_den is None:
            grad_den = student.new_zeros(())
        return torch.ops.datm_fast.param_distance_backward(grad_num, grad_den, student, start, target)

    torch.library.register_autograd("datm_fast::param_distance", _backward, setup_context=_setup_context)
