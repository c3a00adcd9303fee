"""Process-level CPU tuning for training loops, for command-line entry points to opt into."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    Why: a CPU training step allocates activations of tens to hundreds of MB (CIFAR ConvNet, batch
    256: 134 MB for one conv output) and frees them at the end of the step. glibc serves blocks above
    32 MB with a fresh ``mmap`` and unmaps them on free, so every step page-faults all of its memory
    in again (measured: about 600,000 minor faults per CIFAR IPC 50 epoch; a fresh zeroed 52 MB tensor
    costs 10 ms against 1 ms for a reused one). With mmap off and trimming out of reach, freed
    blocks are reused: 1.6x per eager evaluation epoch, 1.2-1.3x compiled, on 2 cores (benchmarks/RESULTS.md).

    This is process-wide and permanent: resident memory stays at its peak. Library functions never
    call it; ``datm-fast eval`` does on CPU. The same from the shell:
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.

    Returns True if applied (Linux with glibc), False otherwise.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
