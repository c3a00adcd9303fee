"""The fused ConvNet block epilogue (instance norm -> ReLU -> 2x2 average pool): every backend against
the autograd of PyTorch's composite, in float64 for exactness and float32 for the fast path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import cuda_only

import datm_fast
import datm_fast.ops.block as block_module
from datm_fast.models import ConvNetSpec, convnet_apply, init_flat_params, unflatten_params
from datm_fast.ops import block_kernels, norm_relu_pool, norm_relu_pool_why_not, resolve_block_backend
from datm_fast.reference.block import (
    block_backward_reference,
    block_double_backward_reference,
    block_forward_reference,
    norm_relu_pool_reference,
)

REPO = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ["torch"] + (["cpp"] if datm_fast.backend_info()["cpp"].live else [])
# Odd sizes: avg_pool2d floors, so the last row / column lies outside every window.
SHAPES = [(3, 4, 8, 8), (2, 3, 7, 5), (1, 2, 2, 2), (2, 5, 33, 32), (4, 16, 4, 4)]
# Triton: CUDA tensors on a GPU, else CPU tensors in the interpreter (conftest sets TRITON_INTERPRET=1),
# where a program costs a few milliseconds: few planes per shape, the plane sizes the ConvNet has and
# odd ones (up to the 64 x 64 limit).
TRITON_LIVE = datm_fast.backend_info()["triton"].live
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_SHAPES = [(2, 2, 2, 2), (2, 3, 5, 7), (2, 2, 7, 5), (2, 2, 8, 8), (1, 2, 16, 16), (1, 2, 32, 32), (1, 2, 33, 31)]
needs_triton = pytest.mark.skipif(not TRITON_LIVE, reason="triton is not live (not installed, or no GPU / interpreter)")


def _inputs(shape, dtype, device="cpu", seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    z = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(C, generator=g, dtype=torch.float64)
    beta = torch.randn(C, generator=g, dtype=torch.float64) * 0.3
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (z, gamma, beta)]


def _three_orders(fn, z, gamma, beta, seed=1):
    """Output, gradients (z, gamma, beta) for a random output adjoint, and the second-order adjoints
    (grad_out, z, gamma) of a random combination of those gradients: what the exact engine needs."""
    g = torch.Generator().manual_seed(seed)
    out = fn(z, gamma, beta)
    # Drawn in float64 and cast, so that float32 and float64 calls see the same adjoints.
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out).requires_grad_()
    grads = torch.autograd.grad(out, (z, gamma, beta), grad_out, create_graph=True)
    adjoints = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in grads]
    dot = sum((a * b).sum() for a, b in zip(grads, adjoints))
    second = torch.autograd.grad(dot, (grad_out, z, gamma))
    return [out.detach(), *[t.detach() for t in grads], *second]


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_matches_autograd_of_pytorch_ops_in_float64(backend, shape, layout):
    """Forward, gradient and gradient-of-gradient to 1e-12 relative: the formulas are exact. The C++
    backend has plane kernels (NCHW) and sample kernels (channels_last); outputs keep the layout."""
    z, gamma, beta = _inputs(shape, torch.float64, channels_last=layout == "channels_last")
    ours = _three_orders(lambda *a: norm_relu_pool(*a, backend=backend), z, gamma, beta)
    ref = _three_orders(norm_relu_pool_reference, z, gamma, beta)
    for name, a, b in zip(["out", "dz", "dgamma", "dbeta", "d2 grad_out", "d2 z", "d2 gamma"], ours, ref):
        assert _max_rel(a, b) < 1e-12, (name, _max_rel(a, b))
    if backend == "cpp" and layout == "channels_last" and shape[1] > 1:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_gradcheck_and_gradgradcheck(backend):
    z, gamma, beta = _inputs((2, 3, 6, 4), torch.float64)
    fn = lambda *a: norm_relu_pool(*a, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, gamma, beta))
    assert torch.autograd.gradgradcheck(fn, (z, gamma, beta))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_float32_close_to_float64(backend, layout):
    """float32 kernels (vectorised sums in another order) within 1e-4 of the float64 reference."""
    shape = (4, 32, 32, 32)
    z, gamma, beta = _inputs(shape, torch.float32, seed=3, channels_last=layout == "channels_last")
    ours = _three_orders(lambda *a: norm_relu_pool(*a, backend=backend), z, gamma, beta)
    z64, g64, b64 = (t.detach().double().requires_grad_() for t in (z, gamma, beta))
    ref = _three_orders(norm_relu_pool_reference, z64, g64, b64)
    for a, b in zip(ours, ref):
        assert _max_rel(a.double(), b) < 1e-4


def test_closed_form_references_match_autograd():
    """The reference formulas (the torch backend, and the spec of csrc/block.h) against autograd."""
    z, gamma, beta = _inputs((2, 3, 7, 6), torch.float64)
    out, mean, rstd = block_forward_reference(z.detach(), gamma.detach(), beta.detach())
    assert _max_rel(out, norm_relu_pool_reference(z, gamma, beta).detach()) < 1e-13
    gp = torch.randn_like(out)
    dz, s1, s2 = block_backward_reference(gp, z.detach(), gamma.detach(), beta.detach(), mean, rstd)
    rz, rg, rb = torch.autograd.grad(norm_relu_pool_reference(z, gamma, beta), (z, gamma, beta), gp)
    assert _max_rel(dz, rz) < 1e-13 and _max_rel(s2.sum(0), rg) < 1e-13 and _max_rel(s1.sum(0), rb) < 1e-13
    # The adjoints of the per-plane sums differ from sample to sample, as a graph through them can make them.
    u, ug, ub = torch.randn_like(z), torch.randn_like(s2), torch.randn_like(s1)
    d_gp, d_z, d_gamma = block_double_backward_reference(
        u, ug, ub, gp, z.detach(), gamma.detach(), beta.detach(), mean, rstd
    )
    gp_ = gp.clone().requires_grad_()
    z_, gamma_ = z.detach().requires_grad_(), gamma.detach().requires_grad_()
    out, mean_, rstd_ = block_forward_reference(z_, gamma_, beta.detach())
    gz, s1_, s2_ = block_backward_reference(gp_, z_, gamma_, beta.detach(), mean_, rstd_)
    a_gp, a_z, a_g = torch.autograd.grad((gz * u).sum() + (s2_ * ug).sum() + (s1_ * ub).sum(), (gp_, z_, gamma_))
    assert _max_rel(d_gp, a_gp) < 1e-13 and _max_rel(d_z, a_z) < 1e-13 and _max_rel(d_gamma.sum(0), a_g) < 1e-13


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="datm_fast._C is not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_kernels_equal_the_closed_forms_with_per_plane_adjoints(shape, layout):
    """The three kernels called one by one (as the exact engine's written-out step calls them), with
    adjoints of the per-plane sums that differ from sample to sample, against the closed forms."""
    z, gamma, beta = (t.detach() for t in _inputs(shape, torch.float64, channels_last=layout == "channels_last"))
    cpp, ref = block_kernels("cpp", z), block_kernels("torch", z)
    assert (cpp.backend, ref.backend) == ("cpp", "torch")
    g = torch.Generator().manual_seed(7)
    out, mean, rstd = cpp.forward(z, gamma, beta, 1e-5)
    gp = torch.randn(out.shape, generator=g, dtype=torch.float64)
    u = torch.randn(z.shape, generator=g, dtype=torch.float64)
    ug, ub = torch.randn(2, shape[0], shape[1], generator=g, dtype=torch.float64)
    for ours, want in (
        (cpp.forward(z, gamma, beta, 1e-5), ref.forward(z, gamma, beta, 1e-5)),
        (cpp.backward(gp, z, gamma, beta, mean, rstd), ref.backward(gp, z, gamma, beta, mean, rstd)),
        (
            cpp.double_backward(u, ug, ub, gp, z, gamma, beta, mean, rstd),
            ref.double_backward(u, ug, ub, gp, z, gamma, beta, mean, rstd),
        ),
    ):
        for a, b in zip(ours, want):
            assert _max_rel(a, b) < 1e-12


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="datm_fast._C is not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compiled_block_ops_pass_opcheck(layout):
    """Schema, fake (meta) kernels, autograd registration and torch.compile's view of the three operators."""
    z, gamma, beta = _inputs((2, 3, 6, 4), torch.float32, channels_last=layout == "channels_last")
    ops = torch.ops.datm_fast
    torch.library.opcheck(ops.block_forward.default, (z, gamma, beta, 1e-5))
    out, mean, rstd = ops.block_forward(z.detach(), gamma.detach(), beta.detach(), 1e-5)
    gp = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(ops.block_backward.default, (gp, z, gamma, beta, mean, rstd))
    u, planes = torch.randn_like(z), torch.randn(2, 2, 3)
    args = (u, planes[0], planes[1], gp.detach(), z.detach(), gamma.detach(), beta.detach(), mean, rstd)
    torch.library.opcheck(ops.block_double_backward.default, args)


def test_block_dispatcher_says_why_not():
    z = torch.randn(2, 3, 4, 4)
    assert norm_relu_pool_why_not(z) is None
    assert "float16" in norm_relu_pool_why_not(z.half())
    assert "H, W >= 2" in norm_relu_pool_why_not(torch.randn(2, 3, 1, 4))
    assert resolve_block_backend("auto", z.half()) == "torch"  # auto falls back to PyTorch's ops
    assert resolve_block_backend("torch", z) == "torch"
    if "cpp" in CPU_BACKENDS:
        assert resolve_block_backend("auto", z) == "cpp"
        with pytest.raises(ValueError, match="backend 'cpp' cannot run this input: .*float16"):
            norm_relu_pool(z.half(), torch.ones(3).half(), torch.zeros(3).half(), backend="cpp")


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="datm_fast._C is not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpp_block_is_deterministic_and_thread_count_independent(layout):
    z, gamma, beta = _inputs((3, 8, 16, 16), torch.float32, channels_last=layout == "channels_last")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _three_orders(lambda *a: norm_relu_pool(*a, backend="cpp"), z, gamma, beta)
        torch.set_num_threads(2)
        two = _three_orders(lambda *a: norm_relu_pool(*a, backend="cpp"), z, gamma, beta)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_block_rejects_bad_inputs():
    z, gamma, beta = (t.detach() for t in _inputs((2, 3, 4, 4), torch.float32))
    with pytest.raises(ValueError, match="gamma must have shape"):
        norm_relu_pool(z, gamma[:2], beta)
    with pytest.raises(ValueError, match=r"z must be \(B, C, H, W\)"):
        norm_relu_pool(z[0], gamma, beta)
    with pytest.raises(ValueError, match="dtype"):
        norm_relu_pool(z, gamma.double(), beta)


# ----- Triton ------------------------------------------------------------------------------------------
def _plane_adjoints(z, seed=7):
    """A pooled-gradient adjoint, an adjoint of dz and per-plane adjoints (differing from sample to
    sample) of the backward's two sums, for the kernels called one by one; z's dtype and device."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = z.shape
    gp = torch.randn(B, C, H // 2, W // 2, generator=g, dtype=torch.float64).to(z)
    u = torch.randn(z.shape, generator=g, dtype=torch.float64).to(z)
    ug, ub = torch.randn(2, B, C, generator=g, dtype=torch.float64).to(z)
    return gp, u, ug, ub


def _both_signs(gamma):
    """gamma with negative and positive entries, so that the ReLU mask keeps the low and the high values."""
    signs = torch.ones_like(gamma)
    signs[::2] = -1
    return gamma.abs() * signs


def _kernel_outputs(kernels, z, gamma, beta, gp, u, ug, ub):
    """The three kernels' outputs, the backward ones on the forward's own statistics."""
    forward = kernels.forward(z, gamma, beta, 1e-5)
    mean, rstd = forward[1:]
    backward = kernels.backward(gp, z, gamma, beta, mean, rstd)
    double_backward = kernels.double_backward(u, ug, ub, gp, z, gamma, beta, mean, rstd)
    return [*forward, *backward, *double_backward]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_kernels_equal_the_closed_forms_in_float64(shape):
    """Forward, backward and double backward against the references to 1e-12: the same formulas."""
    z, gamma, beta = (t.detach().to(TRITON_DEVICE) for t in _inputs(shape, torch.float64, seed=shape[2]))
    gamma = _both_signs(gamma)
    triton_kernels, ref = block_kernels("triton", z), block_kernels("torch", z)
    assert triton_kernels.backend == "triton"
    adjoints = _plane_adjoints(z)
    names = ["out", "mean", "rstd", "dz", "sum_gn", "sum_gn_xhat", "d_gp", "d_z", "d_gamma"]
    ours = _kernel_outputs(triton_kernels, z, gamma, beta, *adjoints)
    # The reference's backward kernels get the Triton forward's statistics, as the engines pass them.
    want = ref.forward(z, gamma, beta, 1e-5)
    mean, rstd = ours[1:3]
    gp, u, ug, ub = adjoints
    want += ref.backward(gp, z, gamma, beta, mean, rstd) + ref.double_backward(
        u, ug, ub, gp, z, gamma, beta, mean, rstd
    )
    for name, a, b in zip(names, ours, want):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float64, name
        assert _max_rel(a, b) < 1e-12, (name, _max_rel(a, b))


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu" or "cpp" not in CPU_BACKENDS, reason="compares CPU tensors with C++")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 32, 32)], ids=str)
def test_triton_kernels_close_to_the_cpp_kernels_in_float32(shape, layout):
    """float32 in float32 (sums in another order): within 1e-5 of the C++ kernels; outputs of the
    operators' shapes and dtype, NCHW (the C++ ones keep a channels_last input's layout)."""
    inputs = _inputs(shape, torch.float32, seed=5, channels_last=layout == "channels_last")
    z, gamma, beta = (t.detach() for t in inputs)
    gamma = _both_signs(gamma)
    adjoints = _plane_adjoints(z)
    ours = _kernel_outputs(block_kernels("triton", z), z, gamma, beta, *adjoints)
    want = _kernel_outputs(block_kernels("cpp", z), z, gamma, beta, *adjoints)
    for a, b in zip(ours, want):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert a.is_contiguous()
        assert _max_rel(a, b) < 1e-5, _max_rel(a, b)


@needs_triton
def test_triton_block_matches_autograd_of_pytorch_ops_in_float64():
    """norm_relu_pool(backend='triton'): output, gradients and second-order adjoints through its autograd."""
    z, gamma, beta = (t.detach().to(TRITON_DEVICE).requires_grad_() for t in _inputs((2, 3, 7, 5), torch.float64))
    ours = _three_orders(lambda *a: norm_relu_pool(*a, backend="triton"), z, gamma, beta)
    ref = _three_orders(norm_relu_pool_reference, z, gamma, beta)
    for name, a, b in zip(["out", "dz", "dgamma", "dbeta", "d2 grad_out", "d2 z", "d2 gamma"], ours, ref):
        assert _max_rel(a, b) < 1e-12, (name, _max_rel(a, b))


@needs_triton
def test_triton_block_gradcheck_and_gradgradcheck():
    """First and second derivatives against finite differences (an odd H: a row outside every window);
    a third one is refused, as on the compiled backends."""
    z, gamma, beta = (t.detach().to(TRITON_DEVICE) for t in _inputs((1, 2, 5, 4), torch.float64))
    z, gamma, beta = z.requires_grad_(), _both_signs(gamma).requires_grad_(), beta.requires_grad_()
    fn = lambda *a: norm_relu_pool(*a, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, gamma, beta))
    assert torch.autograd.gradgradcheck(fn, (z, gamma, beta))
    (dz,) = torch.autograd.grad(fn(z, gamma, beta).sum(), z, create_graph=True)
    (d2z,) = torch.autograd.grad(dz.square().sum(), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="third one is not implemented"):
        torch.autograd.grad(d2z.sum(), z)


@needs_triton
def test_triton_dispatch_and_its_limits():
    z = torch.randn(2, 3, 4, 4, device=TRITON_DEVICE)
    assert resolve_block_backend("triton", z) == "triton"
    assert block_kernels("triton", z).backend == "triton"
    big = torch.randn(1, 1, 65, 64, device=TRITON_DEVICE)
    assert resolve_block_backend("auto", big) != "triton"
    with pytest.raises(ValueError, match="backend 'triton' cannot run this input: .*at most 4096 elements"):
        resolve_block_backend("triton", big)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this input: .*float16"):
        resolve_block_backend("triton", z.half())
    from datm_fast.kernels import block as triton_block

    # ops/block.py states the kernels' limit without importing triton: the two must agree.
    assert triton_block.MAX_PLANE_ELEMENTS == block_module._TRITON_MAX_PLANE_ELEMENTS
    # The kernels check their inputs themselves, as the C++ launchers do (a wrong shape would read
    # out of bounds).
    gamma, beta = torch.ones(3, device=TRITON_DEVICE), torch.zeros(3, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="at most 4096 elements"):
        triton_block.block_forward(big, gamma[:1], beta[:1], 1e-5)
    gp, mean = torch.randn(2, 3, 2, 2, device=TRITON_DEVICE), torch.zeros(2, 3, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="rstd must have shape"):
        triton_block.block_backward(gp, z, gamma, beta, mean, mean[:1])


# Ahead-of-time compilation for a Hopper GPU (no GPU needed): the interpreter runs the kernels' Python,
# this checks that Triton's compiler takes them (types, constexpr branches) down to machine code.
_COMPILE_FOR_SM90 = """
import triton
try:  # Triton's ahead-of-time API (3.x): a Triton without it cannot run this check at all
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    raise SystemExit(f"NO_AOT_API: {exc}")
from datm_fast.kernels import block

for kernel in (block._block_forward_kernel, block._block_backward_kernel, block._block_double_backward_kernel):
    fn = kernel.fn  # the JITFunction under the autotuner
    for dtype in ("fp32", "fp64"):
        constants = {"BLOCK": 64, "BLOCK_OUT": 16, **({"EPS": 1e-5} if "EPS" in fn.arg_names else {})}
        signature = {
            name: "constexpr" if name in constants else "*" + dtype if name.endswith("_ptr") else "i32"
            for name in fn.arg_names
        }
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm, list(compiled.asm)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # not the user's cache
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    # Only Triton's own API missing is a skip: an ImportError from our kernels module is a failure.
    if result.returncode != 0 and "NO_AOT_API: " in result.stderr:
        pytest.skip(f"this triton has another ahead-of-time API: {result.stderr.splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_auto_never_picks_triton(monkeypatch):
    """auto takes the compiled kernels or PyTorch's ops: on a GPU without the CUDA kernels, where
    resolve_backend offers Triton, the block still runs on PyTorch until Triton is measured there."""
    monkeypatch.setattr(block_module, "resolve_backend", lambda backend, device: "triton")
    assert resolve_block_backend("auto", torch.randn(2, 3, 4, 4)) == "torch"


def test_the_block_without_triton_does_not_import_it():
    code = (
        "import sys, torch; from datm_fast.ops import norm_relu_pool; "
        "norm_relu_pool(torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3)); "
        "assert 'triton' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("depth,image", [(3, 32), (2, 28)])
def test_fused_convnet_equals_pytorch_convnet(depth, image):
    """convnet_apply(fused=True) against the module-equivalent PyTorch path, logits and parameter grads."""
    spec = ConvNetSpec(3, 10, image, width=16, depth=depth)
    theta = init_flat_params(spec, torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(4, 3, image, image, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = []
    for fused in (False, True):
        leaves = [p.detach().requires_grad_() for p in unflatten_params(spec, theta)]
        logits = convnet_apply(spec, leaves, x, fused=fused)
        grads = torch.autograd.grad(logits.square().sum(), leaves)
        outs.append([logits.detach(), *grads])
    for a, b in zip(*outs):
        # The conv biases' gradients are zero up to rounding (instance norm removes a constant shift):
        # compare against the largest gradient, not each tensor's own scale.
        assert (a - b).abs().max() < 1e-12 * max(t.abs().max() for t in outs[0])


@pytest.mark.cuda
@pytest.mark.skipif(not datm_fast.backend_info()["cuda"].live, reason="no live CUDA backend (needs a GPU)")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_cuda_block_matches_reference(dtype, tol):
    for shape in SHAPES:
        z, gamma, beta = _inputs(shape, dtype, device="cuda")
        ours = _three_orders(lambda *a: norm_relu_pool(*a, backend="cuda"), z, gamma, beta)
        z64, g64, b64 = (t.detach().cpu().double().requires_grad_() for t in (z, gamma, beta))
        ref = _three_orders(norm_relu_pool_reference, z64, g64, b64)
        for a, b in zip(ours, ref):
            assert _max_rel(a.cpu().double(), b) < tol, shape


@pytest.mark.cuda
@cuda_only
@needs_triton
@pytest.mark.skipif(not datm_fast.backend_info()["cuda"].live, reason="no live CUDA backend (needs a GPU)")
# Four plane sizes, not every shape: each new plane size autotunes three kernels over up to three configs
# (a compile each) on a cold machine, inside the GPU run's 90 s tests stage.
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (10, 128, 8, 8), (10, 128, 32, 32), (4, 8, 64, 64)], ids=str)
def test_triton_kernels_close_to_the_cuda_kernels_in_float32(shape):
    """On a GPU: the Triton kernels (autotuned there) against the CUDA ones, float32, every output."""
    z, gamma, beta = (t.detach().cuda() for t in _inputs(shape, torch.float32, seed=11))
    gamma = _both_signs(gamma)
    adjoints = _plane_adjoints(z)
    ours = _kernel_outputs(block_kernels("triton", z), z, gamma, beta, *adjoints)
    want = _kernel_outputs(block_kernels("cuda", z), z, gamma, beta, *adjoints)
    for a, b in zip(ours, want):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype == torch.float32
        assert _max_rel(a, b) < 1e-5, (shape, _max_rel(a, b))


# The torch headers that cuda_binding.cpp needs pull in CUDA libraries' headers (cuSPARSE, cuBLAS,
# cuSOLVER) that a bare CUDA toolkit may lack; empty stand-ins let the C++ compiler check our code.
_STUB_HEADERS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
    "cusolver_common.h": "typedef int cusolverStatus_t;",
    "cusolverDn.h": '#include "cusolver_common.h"\ntypedef struct cusolverDnContext* cusolverDnHandle_t;',
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None, reason="nvcc or c++ missing")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """cuda_binding.cpp (torch <-> the CUDA launchers) is compiled in CI only on a CUDA build of torch;
    here the C++ compiler checks it against the installed torch headers and the CUDA toolkit's."""
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += [str(Path(shutil.which("nvcc")).resolve().parents[1])]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include").is_dir()), Path("/none"))
    if not (cuda_include / "cuda_runtime_api.h").exists():
        pytest.skip(f"no cuda_runtime_api.h under {cuda_include}")
    for name, text in _STUB_HEADERS.items():
        path = tmp_path / "stubs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (cuda_include / name).exists():
            path.write_text("#pragma once\n" + text + "\n")
    cmd = ["c++", "-std=c++17", "-fsyntax-only", f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path / 'stubs'}", f"-I{cuda_include}"]
    result = subprocess.run(cmd + [str(REPO / "csrc" / "cuda_binding.cpp")], capture_output=True, text=True)
    missing = [line for line in result.stderr.splitlines() if "No such file or directory" in line]
    if result.returncode != 0 and missing:
        pytest.skip(f"a header torch needs is missing here: {missing[0]}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_keeps_block_reference_free_of_compiled_code():
    code = "import datm_fast.reference.block as b, sys; assert 'datm_fast._C' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
