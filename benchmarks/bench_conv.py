"""Benchmark of the ConvNet's convolution through the derivatives the unroll engines take.

    python benchmarks/bench_conv.py [--device cuda] [--rounds 6]

Providers: ``aten`` is ``F.conv2d`` with PyTorch's derivatives (its double backward forms two terms as
convolutions over the transposed batch), ``ours`` is :func:`datm_fast.ops.conv2d`, whose derivatives of
every order are the library's forward, backward-data and backward-weights kernels. Modes as in the exact
engine: ``backward`` (forward + input and weight gradients: the roll-out) and ``double_backward``
(forward + create_graph gradients + the gradient of their dot product with a direction: the reverse
step's Hessian-vector product). Shapes: the CIFAR ConvNet's first (3 -> 128, 32 px) and second
(128 -> 128, 16 px) layers at batch 10 (IPC 1) and 25 (the IPC 10 micro-batch), channels_last on CPU.

The two providers run interleaved, round after round, and the speed-up is the median of the per-round
ratios: the development VM's speed drifts by 25% within an hour, which back-to-back runs would report
as a difference between the providers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from datm_fast.bench import environment
from datm_fast.ops import conv2d

PROVIDERS = {"aten": lambda x, w, b: F.conv2d(x, w, b, padding=1), "ours": lambda x, w, b: conv2d(x, w, b, 1)}
SHAPES = [(10, 3, 32), (25, 3, 32), (10, 128, 16), (25, 128, 16)]


def _case(shape, mode, device):
    batch, channels, size = shape
    g = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def tensor(*dims, scale=1.0):
        t = scale * torch.randn(*dims, generator=g)
        return t.to(device).contiguous(memory_format=memory_format if t.dim() == 4 else torch.contiguous_format)

    x = tensor(batch, channels, size, size).requires_grad_(True)
    w = tensor(128, channels, 3, 3, scale=0.1).requires_grad_(True)
    b = torch.zeros(128, device=device, requires_grad=True)
    probe = tensor(batch, 128, size, size)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        loss = (torch.tanh(fn(x, w, b)) * probe).sum()
        if mode == "backward":
            torch.autograd.grad(loss, (x, w, b))
        else:
            gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
            torch.autograd.grad((gx * dx).sum() + (gw * dw).sum(), (x, w, b))
        sync()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="calls timed together in one round")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"# {' · '.join(f'{k} {v}' for k, v in environment().items())}")
    print("| layer (batch, C_in, px) | mode | aten ms | ours ms | speed-up (median of rounds) |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for mode in ("backward", "double_backward"):
            run = _case(shape, mode, device)
            times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
            for fn in PROVIDERS.values():
                run(fn)  # warm-up: oneDNN / cuDNN pick and cache their kernels
            for r in range(args.rounds):
                for name in PROVIDERS if r % 2 == 0 else reversed(PROVIDERS):
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        run(PROVIDERS[name])
                    times[name].append((time.perf_counter() - t0) / args.repeats * 1e3)
            ratios = [a / o for a, o in zip(times["aten"], times["ours"])]
            print(
                f"| {shape} | {mode} | {statistics.median(times['aten']):.2f} | {statistics.median(times['ours']):.2f}"
                f" | {statistics.median(ratios):.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
