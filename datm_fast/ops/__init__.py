"""Differentiable operators with a backend choice: each op is one unit and the only way into its kernels.

============================  ==========================================================================
``distance``                  :func:`param_distance`, :func:`matching_loss`: the trajectory-matching
                              distance (C++, CUDA, Triton)
``block``                     :func:`norm_relu_pool`: the ConvNet block after its convolution (C++,
                              CUDA, Triton), its one dispatcher :func:`block_kernels` and check
                              :func:`norm_relu_pool_why_not`
``conv``                      :func:`conv2d`: a convolution whose derivatives of every order are the
                              convolution library's kernels; :func:`conv2d_backward`
``loss``                      :func:`soft_cross_entropy`: DATM's loss of learned labels
============================  ==========================================================================

Each op has a pure-PyTorch reference in :mod:`datm_fast.reference` (or is PyTorch's own op); the
backend is an argument, never a global setting, and ``"auto"`` picks the fastest live one
(:func:`datm_fast.backends.resolve_backend`). The fake kernels and autograd formulas of the compiled
operators are registered by each op's module when ``datm_fast._C`` loads.
"""

from .block import BlockKernels, block_kernels, norm_relu_pool, norm_relu_pool_why_not, resolve_block_backend
from .conv import conv2d, conv2d_backward
from .distance import matching_loss, param_distance
from .loss import soft_cross_entropy

__all__ = [
    "BlockKernels",
    "block_kernels",
    "conv2d",
    "conv2d_backward",
    "matching_loss",
    "norm_relu_pool",
    "norm_relu_pool_why_not",
    "param_distance",
    "resolve_block_backend",
    "soft_cross_entropy",
]
