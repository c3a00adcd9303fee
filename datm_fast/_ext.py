"""Loading of the compiled operator library ``datm_fast._C``.

As xformers' _cpp_lib does: try once, on failure remember the exception and warn once; every op then
takes its PyTorch path and :func:`datm_fast.backend_info` reports why the compiled backends are off.
Loading registers the ``torch.ops.datm_fast.*`` operators; each op's module in :mod:`datm_fast.ops`
adds their fake (meta) kernels and autograd formulas through :func:`on_load`, so that everything an
op is (kernel, autograd, fake kernel, reference) is found in one place. Loading never initialises CUDA.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

__all__ = ["ExtensionStatus", "extension_status", "load_extension", "on_load"]

# Python parts of the compiled operators (fake kernels, autograd), registered once the library loads.
_ON_LOAD: list[Callable[[], None]] = []


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
    for register in _ON_LOAD:
        register()
    return ExtensionStatus(module, None)


def load_extension() -> ModuleType | None:
    """The loaded ``datm_fast._C`` module, or None when it is not available."""
    return extension_status().module


def on_load(register: Callable[[], None]) -> None:
    """Run ``register`` (a function that registers fake kernels and autograd formulas of compiled
    operators) once ``datm_fast._C`` has loaded: now if it already has, else right after it loads."""
    if extension_status.cache_info().currsize and extension_status().loaded:
        register()
    else:
        _ON_LOAD.append(register)
