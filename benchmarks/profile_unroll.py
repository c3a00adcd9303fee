"""Where one exact-engine iteration spends its time, by direct timing of every kernel call.

    python benchmarks/profile_unroll.py --config cifar10-ipc10 --steps 8
    python benchmarks/profile_unroll.py --config cifar10-ipc1 --steps 80

The exact engine's written-out step (``datm_fast.distill.explicit_step``) calls every kernel by name:
the convolutions (``F.conv2d`` and ``conv2d_backward``: forward, backward-data, backward-weights) and
the fused block's kernels (from the dispatcher ``block_kernels``). For one iteration after a warm-up
each of those names is wrapped in a ``perf_counter`` pair; the rest of the wall time is Python,
autograd (DSA's adjoint) and the small ops. Unlike ``torch.profiler``, whose own cost inflated per-op
times unevenly here (8.5 s of profiled op time for an iteration that takes 5.4 s), or a
``TorchDispatchMode`` (a Python call for every operator: twice the wall time of an IPC 1 iteration,
2026-12-04), this adds about a microsecond per call. Convolution rates are the call's FLOPs
(2 x batch x C_out x H_out x W_out x C_in x 9) over its time.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from datm_fast.bench import SHAPES, _iteration, _problem, environment
from datm_fast.ops import BlockKernels
from datm_fast.utils import retain_freed_memory

explicit_step = importlib.import_module("datm_fast.distill.explicit_step")


def _conv_flops(x: torch.Tensor, w: torch.Tensor, padding: int) -> float:
    b, _, h, wd = x.shape
    out_h, out_w = h + 2 * padding - w.shape[2] + 1, wd + 2 * padding - w.shape[3] + 1
    return 2.0 * b * w.shape[0] * out_h * out_w * w.shape[1] * w.shape[2] * w.shape[3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10-ipc10", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    shape = replace(SHAPES[args.config], syn_steps=args.steps)
    device = torch.device("cpu")
    # As the CPU commands and `datm-fast bench` run: without it, every fresh activation of a few MB is
    # page-faulted in, which inflates the kernels that write one (the block kernels' outputs) by up to 3x.
    retain_freed_memory()
    spec, *problem = _problem(shape, device, torch.float32, 0)

    calls: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])  # count, seconds, flops

    def timed(key, flops, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        entry = calls[key]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        entry[2] += flops
        return out

    conv2d, conv2d_backward, block_kernels = F.conv2d, explicit_step.conv2d_backward, explicit_step.block_kernels

    def conv2d_timed(x, w, b=None, padding=0):
        key = ("conv forward", f"{x.shape[1]}->{w.shape[0]} @{x.shape[2]}px")
        return timed(key, _conv_flops(x, w, padding), conv2d, x, w, b, padding=padding)

    def conv2d_backward_timed(grad_y, x, w, padding, *, need_input, need_weight):
        kind = {(True, False): "conv input grad", (False, True): "conv weight grad"}.get(
            (need_input, need_weight), "conv input + weight grad"
        )
        key = (kind, f"{x.shape[1]}->{w.shape[0]} @{x.shape[2]}px")
        flops = _conv_flops(x, w, padding) * (need_input + need_weight)
        return timed(key, flops, conv2d_backward, grad_y, x, w, padding, need_input=need_input, need_weight=need_weight)

    def block_kernels_timed(backend, z):
        kernels = block_kernels(backend, z)

        def wrap(name, fn, z_position):
            return lambda *a: timed((f"block {name}", f"{a[z_position].shape[2]}px"), 0.0, fn, *a)

        return BlockKernels(
            kernels.backend,
            wrap("forward", kernels.forward, 0),
            wrap("backward", kernels.backward, 1),
            wrap("double backward", kernels.double_backward, 4),
        )

    def patch(on: bool) -> None:
        F.conv2d = conv2d_timed if on else conv2d
        explicit_step.conv2d_backward = conv2d_backward_timed if on else conv2d_backward
        explicit_step.block_kernels = block_kernels_timed if on else block_kernels

    _iteration(spec, problem, shape, "exact", None, 0, device, "auto")  # warm-up
    patch(True)
    try:
        t0 = time.perf_counter()
        _iteration(spec, problem, shape, "exact", None, 0, device, "auto")
        wall = time.perf_counter() - t0
    finally:
        patch(False)

    print(f"# {' · '.join(f'{k} {v}' for k, v in environment().items())}")
    print(f"{args.config} at {args.steps} steps, exact engine: {wall:.2f} s wall\n")
    print("| kernel | layer | calls | total s | share of wall | ms / call | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    timed_total = 0.0
    for (kind, layer), (n, seconds, flops) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
        timed_total += seconds
        rate = f"{flops / seconds / 1e9:.0f}" if flops else "–"
        print(f"| {kind} | {layer} | {n} | {seconds:.3f} | {seconds / wall:.1%} | {seconds / n * 1e3:.2f} | {rate} |")
    conv = sum(s for (kind, _), (_, s, _) in calls.items() if kind.startswith("conv"))
    print(
        f"\nconvolutions {conv:.2f} s ({conv / wall:.0%}), block kernels {timed_total - conv:.2f} s "
        f"({(timed_total - conv) / wall:.0%}), everything else {wall - timed_total:.2f} s "
        f"({(wall - timed_total) / wall:.0%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
