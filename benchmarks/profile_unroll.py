"""Where one exact-engine iteration spends its time, by direct timing of every kernel call.

    python benchmarks/profile_unroll.py --config cifar10-ipc10 --steps 8
    python benchmarks/profile_unroll.py --config cifar10-ipc1 --steps 80

Every convolution (forward, backward-data, backward-weights) and every fused block call is wrapped in a
``perf_counter`` pair for one iteration after a warm-up; the rest of the wall time is Python, autograd
and the small ops. Unlike ``torch.profiler``, whose own cost inflated per-op times unevenly here (8.5 s
of profiled op time for an iteration that takes 5.4 s), this adds about a microsecond per call.
Convolution rates are the call's FLOPs (2 x batch x C_out x H_out x W_out x C_in x 9) over its time.
"""

from __future__ import annotations

import argparse
import collections
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import datm_fast.ops as ops
from datm_fast.bench import SHAPES, _iteration, _problem, environment
from datm_fast.evaluate import retain_freed_memory


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

    def timed(key, flops, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        entry = calls[key]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        entry[2] += flops
        return out

    conv_backward, conv2d = ops._conv_backward, F.conv2d
    block = {
        name: getattr(ops, name)
        for name in ("_block_forward_impl", "_block_backward_impl", "_block_double_backward_impl")
    }

    def conv_backward_timed(grad_y, x, w, padding, mask):
        kind = {(True, False): "conv input grad", (False, True): "conv weight grad"}.get(
            (mask[0], mask[1]), "conv input + weight grad"
        )
        key = (kind, f"{x.shape[1]}->{w.shape[0]} @{x.shape[2]}px")
        return timed(key, _conv_flops(x, w, padding) * sum(mask[:2]), conv_backward, grad_y, x, w, padding, mask)

    def conv2d_timed(x, w, b=None, stride=1, padding=0, *rest):
        key = ("conv forward", f"{x.shape[1]}->{w.shape[0]} @{x.shape[2]}px")
        return timed(key, _conv_flops(x, w, padding), conv2d, x, w, b, stride, padding, *rest)

    z_position = {"_block_forward_impl": 0, "_block_backward_impl": 1, "_block_double_backward_impl": 4}

    def block_timed(name):
        def run(backend, *a):
            key = (name.strip("_").removesuffix("_impl").replace("_", " "), f"{a[z_position[name]].shape[2]}px")
            return timed(key, 0.0, block[name], backend, *a)

        return run

    def patch(on: bool) -> None:
        ops._conv_backward = conv_backward_timed if on else conv_backward
        F.conv2d = conv2d_timed if on else conv2d
        for name in block:
            setattr(ops, name, block_timed(name) if on else block[name])

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
