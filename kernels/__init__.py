"""Triton kernels of datm_fast, installed as ``datm_fast.kernels``.

Kernel modules hold ``@triton.jit`` kernels and their launchers only; autograd and backend choice
live in :mod:`datm_fast.ops`. Importing a kernel module needs triton; on a machine without a GPU the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, set before the import).
"""
