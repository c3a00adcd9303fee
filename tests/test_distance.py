"""The fused trajectory-matching distance: every live backend against a float64 reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datm_fast
from datm_fast.backends import backend_info, resolve_backend
from datm_fast.ops import matching_loss, param_distance
from datm_fast.reference.distance import param_distance_reference

REPO = Path(__file__).resolve().parents[1]
LIVE = [name for name, status in backend_info().items() if status.live and name != "torch"]


def _devices_for(backend: str) -> list[str]:
    if backend == "cpp":
        return ["cpu"]
    if backend == "cuda":
        return ["cuda"]
    # triton: CPU tensors in the interpreter, CUDA tensors on a GPU
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


CASES = [(b, d) for b in LIVE for d in _devices_for(b)]


def _inputs(n: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Expert-like scales: parameters O(0.1), student and target a small step apart.
    start = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    target = start + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    student = start + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (student, start, target)]


def test_every_compiled_backend_is_live_where_it_can_be():
    """On a machine with a C++ compiler (CI), the extension must have been built and loaded."""
    if os.environ.get("DATM_FAST_SKIP_EXT") == "1" or shutil.which("c++") is None:
        pytest.skip("no C++ compiler, or the extension build was skipped on purpose")
    info = backend_info()
    assert info["cpp"].live, info["cpp"].detail
    assert info["torch"].live


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("n", [1, 7, 4097, 16385, 300_007, 1_000_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_float64_reference(backend, device, n, dtype):
    if backend == "triton" and device == "cpu" and n > 300_007 and dtype == torch.float64:
        pytest.skip("1M float64 elements in the interpreter: covered by the float32 case")
    student, start, target = _inputs(n, dtype, device, seed=n)
    ref_num, ref_den = param_distance_reference(*(t.double().cpu() for t in (student, start, target)))
    num, den = param_distance(student, start, target, backend=backend)
    pt_num, pt_den = param_distance(student, start, target, backend="torch")
    assert num.shape == () and den.shape == () and num.dtype == dtype and num.device.type == device
    # The fused kernels accumulate in float64, so they are at least as close to the float64 truth as
    # PyTorch at the input precision: float32 results are within one rounding of the truth; float64
    # results carry the summation error of n float64 terms (random-walk bound sqrt(n) eps).
    eps = torch.finfo(dtype).eps
    slack = 2.0 if dtype == torch.float32 else 2.0 + n**0.5
    for out, pt, ref in ((num, pt_num, ref_num), (den, pt_den, ref_den)):
        err = abs(out.double().cpu().item() - ref.item())
        pt_err = abs(pt.double().cpu().item() - ref.item())
        assert err <= 2 * pt_err + slack * eps * ref.item(), (err, pt_err, ref.item())


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_float64_reference(backend, device, dtype):
    n = 50_001
    inputs = [t.requires_grad_() for t in _inputs(n, dtype, device, seed=1)]
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    # One shared upstream gradient for both outputs, as the matching loss num/den produces.
    grad_num, grad_den = 0.7, -1.3
    num, den = param_distance(*inputs, backend=backend)
    (grad_num * num + grad_den * den).backward()
    ref_num, ref_den = param_distance_reference(*ref_inputs)
    (grad_num * ref_num + grad_den * ref_den).backward()
    tol = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    for got, ref in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())


@pytest.mark.parametrize("backend,device", CASES)
def test_matching_loss_and_gradcheck(backend, device):
    student, start, target = (t.requires_grad_() for t in _inputs(37, torch.float64, device, seed=3))
    loss = matching_loss(student, start, target, backend=backend)
    ref = matching_loss(student.detach().cpu(), start.detach().cpu(), target.detach().cpu(), backend="torch")
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-13, atol=0)
    assert torch.autograd.gradcheck(
        lambda s, a, t: matching_loss(s, a, t, backend=backend), (student, start, target), eps=1e-6, atol=1e-8
    )


def _overflowing_inputs(kind: str, device: str):
    student, start, target = _inputs(4097, torch.float32, device, seed=8)
    if kind == "squares":  # every square overflows float32 (a run with lr_teacher=1e8 gets there)
        student = torch.full_like(student, 1e30)
    elif kind == "sum":  # every square fits in float32 (2.25e38), their sum does not
        student = target + 1.5e19
    else:  # inf - inf: the reference's num is nan and its den inf
        student[5] = target[5] = float("inf")
    return student, start, target


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["squares", "sum", "nan"])
# The Triton interpreter's numpy warns on inf * 0 (masked lanes) and inf - inf; the values are right.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_overflow_gives_inf_like_the_reference(backend, device, kind):
    """A float32 sum beyond float32's range is inf (nan where PyTorch gives nan), never an exception:
    the distillation loop skips a non-finite loss with a warning, which needs the loss to reach it."""
    inputs = [t.requires_grad_() for t in _overflowing_inputs(kind, device)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    got = param_distance(*inputs, backend=backend)
    ref = param_distance(*ref_inputs, backend="torch")
    assert not all(torch.isfinite(r).item() for r in ref), ref  # the case overflows float32
    for out, expected in zip(got, ref):
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    # Backward through the matching loss, as the training loop runs it: num/den is inf or nan, the
    # gradients mix finite, infinite and nan entries, all where PyTorch's are.
    (got[0] / got[1]).backward()
    (ref[0] / ref[1]).backward()
    for x, r in zip(inputs, ref_inputs):
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.skipif(not backend_info()["cpp"].live, reason="datm_fast._C is not built")
def test_compiled_op_passes_opcheck():
    student, start, target = (t.requires_grad_() for t in _inputs(1000, torch.float32, "cpu", seed=4))
    torch.library.opcheck(torch.ops.datm_fast.param_distance.default, (student, start, target))
    g = torch.tensor(0.5)
    torch.library.opcheck(
        torch.ops.datm_fast.param_distance_backward.default, (g, g, student.detach(), start.detach(), target.detach())
    )


@pytest.mark.skipif(not backend_info()["cpp"].live, reason="datm_fast._C is not built")
def test_cpp_result_does_not_depend_on_thread_count():
    student, start, target = _inputs(1_000_003, torch.float32, "cpu", seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = param_distance(student, start, target, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = param_distance(student, start, target, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda s, a, t: (s.view(2, -1), a.view(2, -1), t.view(2, -1)), "flat 1-D"),
        (lambda s, a, t: (s, a[:-1], t), "same shape"),
        (lambda s, a, t: (s, a.double(), t), "one dtype"),
        (lambda s, a, t: (s.half(), a.half(), t.half()), "float32 or float64"),
        (lambda s, a, t: (s, a, t.tolist()), "torch.Tensor"),
    ],
)
def test_bad_inputs_are_named(bad, match):
    args = bad(*_inputs(10, torch.float32, "cpu", seed=6))
    with pytest.raises((ValueError, TypeError), match=match):
        param_distance(*args)


def test_backend_choice():
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    expected_cpu = "cpp" if backend_info()["cpp"].live else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected_cpu
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        param_distance(*_inputs(4, torch.float32, "cpu", seed=7), backend="fast")
    if not backend_info()["cuda"].live:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not live"):
            param_distance(*_inputs(4, torch.float32, "cpu", seed=7), backend="cuda")
    if backend_info()["cpp"].live:
        with (
            pytest.raises(ValueError, match="runs on CUDA tensors")
            if backend_info()["cuda"].live
            else pytest.raises(RuntimeError)
        ):
            param_distance(*_inputs(4, torch.float32, "cpu", seed=7), backend="cuda")


def test_backend_info_reports_every_backend_with_a_reason():
    info = datm_fast.backend_info()
    assert set(info) == {"torch", "cpp", "cuda", "triton"}
    for status in info.values():
        assert status.detail, status
    if torch.version.cuda is None:
        assert not info["cuda"].live and "CPU build" in info["cuda"].detail


def test_import_does_not_initialise_cuda():
    code = "import torch, datm_fast, datm_fast.ops; datm_fast.backend_info(); assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (REPO / "csrc").glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    """CUDA code that does not compile never lands: the .cu files are plain CUDA, no torch headers."""
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-I", str(REPO / "csrc"), "-c", str(REPO / "csrc" / source)]
    result = subprocess.run(cmd + ["-o", str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.o").stat().st_size > 0
