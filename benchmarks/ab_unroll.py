"""Ablation of the exact engine's speed-ups, timed interleaved in one process.

    python benchmarks/ab_unroll.py --config cifar10-ipc10 --steps 4 --rounds 6
    python benchmarks/ab_unroll.py --config cifar10-ipc1 --steps 20 --rounds 8

Each round times one iteration of every variant, in alternating order; the speed-up of a variant is
the median over rounds of (base time / variant time) in the same round, which cancels the development
VM's drift (25% within an hour) that separate runs would attribute to the code. Variants swap one
piece of the engine back to what it was before the change:

- ``base``: PyTorch's ``F.conv2d`` (its own double backward), conv weights in NCHW at every call;
- ``conv``: :func:`datm_fast.ops.conv2d` (derivatives on oneDNN's own backward kernels);
- ``layout``: conv weights and the Hessian-vector direction in channels_last once per step;
- ``both``: the two together (the engine of 2026-12-03);
- ``taps-all``: both, and ``<grad, lam>`` taken through the conv outputs instead of the conv weight
  gradients (``unroll._gradient_dot``) in every layer;
- ``taps``: the same in every layer but the first (the autograd reverse step as of 2026-12-04);
- ``shipped``: the reverse step written out (``datm_fast.distill.explicit_step``), no autograd graph.

The fused norm/ReLU/pool kernels are on in every variant. ``benchmarks/NOTES.md`` section 5 quotes
these runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import datm_fast.ops as ops
from datm_fast.bench import SHAPES, _iteration, _problem, environment

unroll = importlib.import_module("datm_fast.distill.unroll")  # the package attribute is the function


def _aten_conv(x, w, b=None, padding=0):
    return F.conv2d(x, w, b, padding=padding)


def _nchw_layout(parts, channels_last):
    return parts


def _weight_gradient_dot(loss, taps, leaves, lam_parts, kernels):
    gs = torch.autograd.grad(loss, leaves, create_graph=True)
    return sum((g * lp).sum() for g, lp in zip(gs, lam_parts))


def _never(spec, fused):
    return False


VARIANTS = {
    "base": (_aten_conv, _nchw_layout, _weight_gradient_dot, _never),
    "conv": (ops.conv2d, _nchw_layout, _weight_gradient_dot, _never),
    "layout": (_aten_conv, unroll._in_layout, _weight_gradient_dot, _never),
    "both": (ops.conv2d, unroll._in_layout, _weight_gradient_dot, _never),
    "taps-all": (ops.conv2d, unroll._in_layout, functools.partial(unroll._gradient_dot, min_reduction=0), _never),
    "taps": (ops.conv2d, unroll._in_layout, unroll._gradient_dot, _never),
    "shipped": (ops.conv2d, unroll._in_layout, unroll._gradient_dot, unroll.explicit_step_supported),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10-ipc10", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4, help="syn_steps (the full shape's are many minutes)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, base first")
    args = parser.parse_args(argv)
    shape = replace(SHAPES[args.config], syn_steps=args.steps)
    device = torch.device("cpu")
    spec, *problem = _problem(shape, device, torch.float32, 0)
    shipped = VARIANTS["shipped"]

    def timed(variant: str) -> float:
        ops.conv2d, unroll._in_layout, unroll._gradient_dot, unroll.explicit_step_supported = VARIANTS[variant]
        try:
            t0 = time.perf_counter()
            _iteration(spec, problem, shape, "exact", None, 5, device, "auto")
            return time.perf_counter() - t0
        finally:
            ops.conv2d, unroll._in_layout, unroll._gradient_dot, unroll.explicit_step_supported = shipped

    print(f"# {' · '.join(f'{k} {v}' for k, v in environment().items())}")
    chosen = args.variants.split(",")
    for variant in chosen:
        timed(variant)  # warm-up: oneDNN builds its kernels per shape and format
    times: dict[str, list[float]] = {v: [] for v in chosen}
    order = list(chosen)
    for r in range(args.rounds):
        for variant in order if r % 2 == 0 else order[::-1]:
            times[variant].append(timed(variant))
    print(f"| {args.config} at {args.steps} steps | median s | speed-up over {chosen[0]} (median of rounds) | range |")
    print("|---|---|---|---|")
    for variant, ts in times.items():
        ratios = [b / t for b, t in zip(times[chosen[0]], ts)]
        print(
            f"| {variant} | {statistics.median(ts):.3f} | {statistics.median(ratios):.3f}x"
            f" | {min(ratios):.2f}-{max(ratios):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
