"""Benchmark of the fused trajectory-matching distance: PyTorch against C++ / CUDA against Triton.

Run:  pytest benchmarks/bench_distance.py --benchmark-only [--benchmark-json out.json]
CPU runs time the PyTorch path and the C++ operator; a GPU adds the CUDA operator and Triton. The
Triton interpreter is not timed on CPU (it measures numpy, not the kernel) unless
DATM_FAST_BENCH_INTERPRETER=1. Each row records the achieved memory bandwidth: the op reads 12 bytes
per float32 element forward, and 12 read + 12 written backward.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from datm_fast.backends import backend_info
from datm_fast.ops import param_distance

INFO = backend_info()


def _providers() -> list[tuple[str, str]]:
    cases = [("torch", "cpu")]
    if INFO["cpp"].live:
        cases.append(("cpp", "cpu"))
    if torch.cuda.is_available():
        cases.append(("torch", "cuda"))
        if INFO["cuda"].live:
            cases.append(("cuda", "cuda"))
        if INFO["triton"].live:
            cases.append(("triton", "cuda"))
    elif INFO["triton"].live and os.environ.get("DATM_FAST_BENCH_INTERPRETER") == "1":
        cases.append(("triton", "cpu"))
    return cases


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("n", [300_000, 1_000_000])
@pytest.mark.parametrize("provider,device", _providers())
def test_param_distance(benchmark, provider, device, n, mode):
    g = torch.Generator().manual_seed(0)
    start = (0.1 * torch.randn(n, generator=g)).to(device)
    target = start + 0.01 * torch.randn(n, generator=g).to(device)
    student = (start + 0.01 * torch.randn(n, generator=g).to(device)).requires_grad_(mode == "forward_backward")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        num, den = param_distance(student, start, target, backend=provider)
        if mode == "forward_backward":
            (num / den).backward()
            student.grad = None
        sync()

    run()  # warm-up: compiles Triton kernels, loads the extension
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)
    moved = 12 * n if mode == "forward" else 36 * n  # bytes (float32): 3 reads; + 3 reads, 3 writes
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "device": _device_name(device),
            "torch": torch.__version__,
            "GB/s": round(moved / median / 1e9, 2),
        }
    )
