"""Benchmark of the fused ConvNet block epilogue (instance norm -> ReLU -> 2x2 average pool).

Run:  pytest benchmarks/bench_block.py --benchmark-only [--benchmark-json out.json]

Providers: ``aten`` is PyTorch's ops through autograd (group_norm, relu, avg_pool2d: what the
student ran before the fused op), ``torch`` the closed-form formulas in PyTorch (the fused op's
fallback), ``cpp`` / ``cuda`` the compiled kernels, ``triton`` the Triton kernels (on a GPU only: in
the interpreter they are for tests; ``auto`` does not pick them until they beat ``cuda`` here). Three
modes, as the exact unroll engine uses the block: ``forward``; ``backward`` (forward + gradient, as in
the roll-out); ``double_backward`` (forward + create_graph gradient + the gradient of a dot product
with it, as in a Hessian-vector product). Shapes: the three blocks of the CIFAR ConvNet (width 128) at
batch 10 (IPC 1) and 25 (the IPC 10 micro-batch).
"""

from __future__ import annotations

import platform

import pytest
import torch

from datm_fast.backends import backend_info
from datm_fast.ops import norm_relu_pool
from datm_fast.reference.block import norm_relu_pool_reference

INFO = backend_info()


def _providers() -> list[tuple[str, str]]:
    cases = [("aten", "cpu"), ("torch", "cpu")]
    if INFO["cpp"].live:
        cases.append(("cpp", "cpu"))
    if torch.cuda.is_available():
        cases += [("aten", "cuda"), ("torch", "cuda")]
        if INFO["cuda"].live:
            cases.append(("cuda", "cuda"))
        if INFO["triton"].live:
            cases.append(("triton", "cuda"))
    return cases


def _fn(provider: str):
    if provider == "aten":
        return norm_relu_pool_reference
    return lambda z, g, b: norm_relu_pool(z, g, b, backend=provider)


@pytest.mark.parametrize("mode", ["forward", "backward", "double_backward"])
@pytest.mark.parametrize("shape", [(10, 128, 32, 32), (10, 128, 8, 8), (25, 128, 32, 32)], ids=str)
@pytest.mark.parametrize("provider,device", _providers())
def test_norm_relu_pool(benchmark, provider, device, shape, mode):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    z = torch.randn(shape, generator=g).to(device).requires_grad_(mode != "forward")
    gamma = (1 + 0.1 * torch.randn(C, generator=g)).to(device).requires_grad_(mode != "forward")
    beta = (0.1 * torch.randn(C, generator=g)).to(device).requires_grad_(mode != "forward")
    grad_out = torch.randn(B, C, H // 2, W // 2, generator=g).to(device).requires_grad_(mode == "double_backward")
    u = torch.randn(shape, generator=g).to(device)
    fn = _fn(provider)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = fn(z, gamma, beta)
        if mode == "backward":
            torch.autograd.grad(out, (z, gamma, beta), grad_out)
        elif mode == "double_backward":
            dz, dg, db = torch.autograd.grad(out, (z, gamma, beta), grad_out, create_graph=True)
            torch.autograd.grad((dz * u).sum() + dg.sum() + db.sum(), (grad_out, z, gamma))
        sync()

    run()  # warm-up: compiles, and on the triton backend autotunes, outside the timed rounds
    benchmark.pedantic(run, rounds=10, iterations=3, warmup_rounds=1)
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    benchmark.extra_info.update(
        {"device": f"{device_name} ({torch.get_num_threads()} threads)", "torch": torch.__version__}
    )
