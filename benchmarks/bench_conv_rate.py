"""The convolution rate this machine gives the student ConvNet: the divisor of every floor in NOTES.md.

    python benchmarks/bench_conv_rate.py [--batches 10,25,100] [--device cpu]

Times forward and forward + backward (input and weight gradients) of the three 3x3 convolutions of
the CIFAR ConvNet (width 128: 3 -> 128 at 32 px, 128 -> 128 at 16 and 8 px), NCHW and channels_last,
and prints GFLOP/s (a 3x3 convolution costs 2 * B * Cout * Cin * 9 * H * W FLOPs forward, twice that
backward). Median of the repeats after two warm-up calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

LAYERS = [(3, 32), (128, 16), (128, 8)]  # (input channels, spatial size) of ConvNet-3 width 128, CIFAR


def _median_ms(fn, repeats: int, sync) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="10,25,100")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cpu":
        from datm_fast.utils import retain_freed_memory

        retain_freed_memory()
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print("| batch | layout | layer (Cin, px) | forward ms | GFLOP/s | fwd+bwd ms | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            total_flops = total_ms = 0.0
            for cin, px in LAYERS:
                x = torch.randn(batch, cin, px, px, device=device).contiguous(memory_format=fmt).requires_grad_()
                w = torch.randn(128, cin, 3, 3, device=device).contiguous(memory_format=fmt).requires_grad_()
                b = torch.randn(128, device=device)
                gy = torch.randn(batch, 128, px, px, device=device).contiguous(memory_format=fmt)
                fwd = _median_ms(lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1), args.repeats, sync)
                both = _median_ms(
                    lambda x=x, w=w, b=b, gy=gy: torch.autograd.grad(F.conv2d(x, w, b, padding=1), (x, w), gy),
                    args.repeats,
                    sync,
                )
                flops = 2 * batch * 128 * cin * 9 * px * px
                total_flops += 3 * flops
                total_ms += both
                print(
                    f"| {batch} | {layout} | {cin}, {px} | {fwd:.2f} | {flops / fwd / 1e6:.0f} | {both:.2f} | "
                    f"{3 * flops / both / 1e6:.0f} |"
                )
            print(f"| {batch} | {layout} | all three | | | {total_ms:.2f} | **{total_flops / total_ms / 1e6:.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
