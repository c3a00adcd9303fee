"""Counting the convolution library's kernel calls, as the dispatcher sees them (no monkeypatching)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten


class ConvCalls(TorchDispatchMode):
    """Within ``with ConvCalls() as calls:``: ``calls.kernels`` counts convolution kernels run (a forward,
    and each of the input and weight gradients of a ``convolution_backward``); ``calls.input_grads``
    lists the input shapes of the input gradients computed."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.input_grads: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _aten.convolution.default:
            self.kernels += 1
        elif func is _aten.convolution_backward.default:
            mask = args[-1]
            self.kernels += int(mask[0]) + int(mask[1])
            if mask[0]:
                self.input_grads.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))
