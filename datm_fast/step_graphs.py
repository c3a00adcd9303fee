"""Static steps: an inner step whose every tensor input lives in a buffer, captured once as a CUDA graph.

A GPU runs DATM's inner steps launch-bound at small IPC: 80 steps of 10 images keep an H200 idle most
of the time (0.56 s per CIFAR-10 IPC 1 iteration, 2026-12-04, where the arithmetic takes a fraction of
that). A CUDA graph replays a step's hundreds of kernel launches as one. Its precondition is that the
step reads every tensor from a fixed address: :class:`StaticStep` holds a step function and the buffers
it reads; calling it copies the step's values (its parameters, its minibatch indices, its DSA draws)
into the buffers and replays the graph captured from the function on the first call. Without CUDA the
same object runs the function on its buffers, so CPU tests exercise the whole structure but the
capture call. The engines never read a tensor's value on the host once the plan is drawn (tested),
the other precondition.

:class:`StepGraphs` keeps the static steps of one run, by key (step kind, micro-batch shape, DSA op
groups), so that each is captured once per run and replayed at every step and iteration after.

Three stages use them, each behind its own ``graphs`` switch: distillation's written-out inner steps
(:class:`~datm_fast.distill.EngineOptions`), a group of experts' GSAM/SGD gradient
(:class:`~datm_fast.experts.ExpertTrainer`), and a group of evaluation runs' training gradient
(:class:`~datm_fast.evaluate.EvalConfig`). A step function returns what it computes and changes no
state, so the warm-up calls before a capture leave the training where it was; the caller applies the
update (a few foreach kernels) from the step's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["StaticStep", "StepGraphs"]

StepFunction = Callable[..., Any]


class StaticStep:
    """A step function over fixed buffers, captured as a CUDA graph when ``capture`` (CUDA only).

    ``fn(**buffers)`` must compute from its keyword tensors and from tensors whose storage stays put
    between calls (the synthetic set, updated in place by the outer optimiser), never read a value
    on the host, and return tensors (or a tuple of tensors and Nones). Calling the step with the
    same names (``step(theta=..., indices=...)``) copies the values into the buffers and returns the
    outputs; on CUDA they are the graph's own output tensors, overwritten by the next call: use them
    (accumulate, copy) before calling the step again.
    """

    def __init__(self, fn: StepFunction, example: Mapping[str, Tensor], *, capture: bool, warmup: int = 2) -> None:
        self.fn = fn
        self.buffers = {name: value.detach().clone() for name, value in example.items()}
        self.graph: Any = None
        self.outputs: Any = None
        if capture:
            self._capture(warmup)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _capture(self, warmup: int) -> None:
        # Lazy initialisation and cuDNN's algorithm search must run before the capture, on a side
        # stream as PyTorch's CUDA-graph notes ask, so that the graph records the steady state.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.fn(**self.buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.fn(**self.buffers)
        self.graph = graph

    def __call__(self, **values: Tensor) -> Any:
        if values.keys() != self.buffers.keys():
            raise ValueError(f"StaticStep: expected the inputs {sorted(self.buffers)}, got {sorted(values)}")
        for name, value in values.items():
            buffer = self.buffers[name]
            if value.shape != buffer.shape or value.dtype != buffer.dtype:
                raise ValueError(
                    f"StaticStep: input {name} of shape {tuple(value.shape)} {value.dtype}, the step was built for "
                    f"{tuple(buffer.shape)} {buffer.dtype}"
                )
            buffer.copy_(value)
        if self.graph is None:
            return self.fn(**self.buffers)
        self.graph.replay()
        return self.outputs


class StepGraphs:
    """The static steps of one run, built on first use and reused by key.

    The step functions may close over state whose storage stays put while its values change: a run's
    synthetic set, updated in place by the outer optimiser; ``owner`` names that storage, and a new
    owner (another set, a resized one) drops every step built for the old one. Experts and evaluation
    make one ``StepGraphs`` per group, whose steps close over that group alone, and pass no owner.
    ``capture``: capture CUDA graphs for steps on a CUDA device (False: run every step eagerly on its
    buffers, on any device).
    """

    def __init__(self, *, capture: bool = True) -> None:
        self.capture = capture
        self._owner: Hashable = None
        self._steps: dict[Hashable, StaticStep] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def step(
        self,
        key: Hashable,
        owner: Hashable,
        build: Callable[[], StepFunction],
        example: Mapping[str, Tensor],
    ) -> StaticStep:
        """The step ``key`` (built by ``build()`` with buffers like ``example`` on first use)."""
        if owner != self._owner:
            self._steps.clear()
            self._owner = owner
        found = self._steps.get(key)
        if found is None:
            device = next(iter(example.values())).device
            found = StaticStep(build(), example, capture=self.capture and device.type == "cuda")
            self._steps[key] = found
        return found
