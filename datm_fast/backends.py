"""Which backends are live on this machine, and why one is not.

Backends:
    torch   pure PyTorch (the reference); always live.
    cpp     the C++ CPU operators of ``datm_fast._C`` (OpenMP).
    cuda    the CUDA operators of ``datm_fast._C``; needs a CUDA build of torch at install time and a GPU.
    triton  the Triton kernels of ``datm_fast.kernels``; needs triton and a GPU, or the interpreter
            (``TRITON_INTERPRET=1`` set before the kernels are first imported).

Nothing here initialises CUDA: ``torch.cuda.is_available()`` only counts devices.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch

from ._ext import extension_status

__all__ = ["Backend", "BackendStatus", "backend_info", "backend_status", "check_backend", "resolve_backend"]

Backend = Literal["auto", "torch", "cpp", "cuda", "triton"]
BACKENDS: tuple[str, ...] = ("torch", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    live: bool
    detail: str  # what is live, or why it is not

    def __str__(self) -> str:
        return f"{self.name:<7} {'live' if self.live else 'off '}  {self.detail}"


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed (pip install 'datm-fast[triton]')")
    import triton

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available():
        return BackendStatus("triton", True, f"triton {triton.__version__} on {torch.cuda.device_count()} GPU(s)")
    if interpret:
        return BackendStatus("triton", True, f"triton {triton.__version__} in the interpreter (TRITON_INTERPRET=1)")
    return BackendStatus(
        "triton",
        False,
        f"triton {triton.__version__} is installed but there is no GPU; set TRITON_INTERPRET=1 to run its "
        "kernels in the interpreter (slow, for tests)",
    )


def backend_status(name: str) -> BackendStatus:
    """One backend's status. Only what it names is probed: ``triton`` imports triton (about 80 MB of
    resident memory and a second of start-up), which a CPU run on the ``cpp`` backend never needs."""
    check_backend(name)
    if name == "torch":
        return BackendStatus("torch", True, f"torch {torch.__version__}")
    if name == "triton":
        return _triton_status()
    ext = extension_status()
    if name == "cpp":
        if ext.loaded:
            omp = "with OpenMP" if ext.with_openmp else "without OpenMP"
            return BackendStatus("cpp", True, f"datm_fast._C {omp}, {torch.get_num_threads()} threads")
        return BackendStatus("cpp", False, f"datm_fast._C did not load: {ext.error}")
    if torch.version.cuda is None:
        return BackendStatus("cuda", False, f"torch {torch.__version__} is a CPU build")
    if not ext.loaded:
        return BackendStatus("cuda", False, f"datm_fast._C did not load: {ext.error}")
    if not ext.with_cuda:
        return BackendStatus(
            "cuda", False, "datm_fast._C was built without CUDA (no nvcc at install time, or DATM_FAST_CUDA=0)"
        )
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "datm_fast._C has CUDA kernels but no GPU is visible")
    return BackendStatus("cuda", True, f"datm_fast._C CUDA kernels, {torch.cuda.device_count()} GPU(s)")


def backend_info() -> dict[str, BackendStatus]:
    """Report every backend: ``{name: BackendStatus(name, live, detail)}``.

    Example::

        >>> for status in datm_fast.backend_info().values():
        ...     print(status)
        torch   live  torch 2.13.0+cpu
        cpp     live  datm_fast._C with OpenMP, 2 threads
        cuda    off   torch 2.13.0+cpu is a CPU build
        triton  live  triton 3.9.0 in the interpreter (TRITON_INTERPRET=1)
    """
    return {name: backend_status(name) for name in BACKENDS}


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``: ``auto`` picks the fastest live one.

    auto on CUDA: cuda, else triton, else torch. auto on CPU: cpp, else torch (the Triton interpreter
    is for tests, never picked automatically). An explicit backend that is off, or that cannot run on
    ``device``, is an error that says why.
    """
    check_backend(backend)
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
        for name in order:
            if backend_status(name).live:
                return name
        return "torch"
    status = backend_status(backend)
    if not status.live:
        raise RuntimeError(f"backend {backend!r} is not live: {status.detail}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs CPU tensors only in the interpreter (TRITON_INTERPRET=1)")
    return backend
