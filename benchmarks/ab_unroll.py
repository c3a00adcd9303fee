"""Engine variants timed interleaved in one process: speed-ups that survive the VM's drift.

    python benchmarks/ab_unroll.py --config cifar10-ipc10 --steps 4 --rounds 6
    python benchmarks/ab_unroll.py --config cifar10-ipc1 --steps 20 --rounds 8 \\
        --variants "exact:step=autograd;exact;exact:fused=false"

Each round times one iteration of every variant, in alternating order; the speed-up of a variant is
the median over rounds of (base time / variant time) in the same round, which cancels the development
VM's drift (25% within an hour) that separate runs would attribute to the code. A variant is an engine
with engine options (:func:`datm_fast.bench.engine_options`): the first is the base. The default set
compares the shipped exact engine with its autograd step and with PyTorch's ops for the blocks.

The ablations of ``benchmarks/NOTES.md`` section 5 (PyTorch's convolution double backward, weights in
NCHW, the conv-output identity) swapped pieces of the engine as it was then; they are the git history
of this script (before 2026-12-04).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from datm_fast.bench import SHAPES, _iteration, _problem, engine_options, environment

DEFAULT_VARIANTS = "exact:step=autograd;exact;exact:fused=false"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10-ipc10", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4, help="syn_steps (the full shape's are many minutes)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated engines with options, base first")
    args = parser.parse_args(argv)
    shape = replace(SHAPES[args.config], syn_steps=args.steps)
    device = torch.device("cpu")
    spec, *problem = _problem(shape, device, torch.float32, 0)
    chosen = [v.strip() for v in args.variants.split(";")]
    options = {v: engine_options(v) for v in chosen}

    def timed(variant: str) -> float:
        t0 = time.perf_counter()
        _iteration(spec, problem, shape, options[variant], 5, device)
        return time.perf_counter() - t0

    print(f"# {' · '.join(f'{k} {v}' for k, v in environment().items())}")
    for variant in chosen:
        timed(variant)  # warm-up: oneDNN builds its kernels per shape and format
    times: dict[str, list[float]] = {v: [] for v in chosen}
    for r in range(args.rounds):
        for variant in chosen if r % 2 == 0 else chosen[::-1]:
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
