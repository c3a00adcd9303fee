"""The unroll engines: exact equals full (float64, rel. error < 1e-10), tesla differs, memory stays flat."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conv_count import ConvCalls

from datm_fast.augment import DSAConfig, apply_dsa
from datm_fast.distill import estimate_full_unroll_bytes, make_unroll_plan, trajectory_matching_loss
from datm_fast.models import ConvNet, ConvNetSpec, init_flat_params

unroll_module = importlib.import_module("datm_fast.distill.unroll")  # the package attribute is the function


def _problem(spec: ConvNetSpec, num_images: int, *, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    start = init_flat_params(spec, g, dtype=dtype)
    target = start + 0.02 * torch.randn(spec.num_params, generator=g, dtype=dtype)
    images = torch.randn(num_images, *spec.input_shape, generator=g, dtype=dtype)
    labels = 2 * torch.randn(num_images, spec.num_classes, generator=g, dtype=dtype)
    lr = torch.tensor(0.05, dtype=dtype)
    return start, target, images, labels, lr


def _grads(spec, problem, plan, **kwargs):
    start, target, images, labels, lr = problem
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, lr))
    loss = trajectory_matching_loss(spec, start, target, x, y, a, plan=plan, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, y.grad, a.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = [
    # (norm, depth, activation, pooling, image px, channels, num_images, batch_syn, syn_steps, micro_batch)
    ("instance", 2, "relu", "avg", 8, 3, 10, 4, 7, None),  # 4 does not divide 10: a short chunk
    ("instance", 3, "relu", "avg", 8, 3, 12, 6, 5, 4),  # micro-batches that do not divide the batch
    ("instance", 2, "relu", "avg", 7, 1, 6, 4, 4, 3),  # odd sizes: pooling drops the last row/column
    ("batch", 2, "relu", "max", 8, 3, 9, 9, 4, 2),  # batch norm: micro-batch ignored (whole batch)
    ("layer", 1, "leakyrelu", "avg", 6, 1, 8, 3, 6, 2),
    ("group", 2, "sigmoid", "none", 6, 3, 6, 6, 3, None),
    ("none", 2, "relu", "avg", 8, 3, 7, 7, 4, 1),
]


@pytest.mark.parametrize("step", ["auto", "autograd"], ids=["steps-auto", "autograd-taps-every-layer"])
@pytest.mark.parametrize("augment", [DSAConfig(), None], ids=["dsa", "no-dsa"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-b{c[7]}-mb{c[9]}" for c in CASES])
def test_exact_equals_full_in_float64(case, augment, step, monkeypatch):
    # step auto: the written-out step for the fused instance-norm ConvNets, autograd for the others.
    # step autograd: every network through autograd, with the conv-output identity in every layer: the
    # test networks are narrow (width 5: reduction 45 after the first layer), below its default threshold.
    if step == "autograd":
        monkeypatch.setattr(unroll_module, "_TAP_MIN_REDUCTION", 0)
    norm, depth, act, pool, px, ch, n, batch_syn, steps, micro = case
    width = 4 if norm == "group" else 5
    spec = ConvNetSpec(ch, 3, px, width=width, depth=depth, norm=norm, activation=act, pooling=pool)
    problem = _problem(spec, n, seed=len(CASES))
    plan = make_unroll_plan(
        n, steps, batch_syn, image_size=spec.image_size, augment=augment, generator=torch.Generator().manual_seed(7)
    )
    # The reference runs PyTorch's ops; exact runs the fused norm/ReLU/pool kernels (instance norm).
    full = _grads(spec, problem, plan, unroll="full", fused=False)
    exact = _grads(spec, problem, plan, unroll="exact", micro_batch=micro, step=step)
    assert abs(exact[0] - full[0]) <= 1e-12 * full[0]
    for name, got, ref in zip(("images", "labels", "lr"), exact[1:], full[1:]):
        assert ref.abs().max() > 0, f"the {name} gradient must not vanish in this problem"
        assert _rel(got, ref) < 1e-10, (name, _rel(got, ref))


def test_tesla_differs_measurably_from_exact():
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    problem = _problem(spec, 12, seed=1)
    plan = make_unroll_plan(
        12, 10, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(2)
    )
    exact = _grads(spec, problem, plan, unroll="exact")
    tesla = _grads(spec, problem, plan, unroll="tesla")
    assert torch.allclose(tesla[0], exact[0], rtol=1e-12), "same forward loss"
    assert _rel(tesla[1], exact[1]) > 0.05, "images gradient: TESLA drops the dependence between steps"
    assert _rel(tesla[2], exact[2]) > 0.05
    # ... and with a single step TESLA is exact (its one approximation needs at least two steps).
    one = make_unroll_plan(12, 1, 4, image_size=(8, 8), augment=None, generator=torch.Generator().manual_seed(2))
    for a, b in zip(_grads(spec, problem, one, unroll="tesla")[1:], _grads(spec, problem, one, unroll="full")[1:]):
        assert _rel(a, b) < 1e-12


def test_full_engine_is_upstreams_loop():
    """The reference engine computes upstream's function: re-stated here with an nn.Module and functional_call."""
    spec = ConvNetSpec(3, 4, 8, width=5, depth=2)
    start, target, images, labels, lr = _problem(spec, 10, seed=3)
    augment = DSAConfig()
    plan = make_unroll_plan(10, 6, 4, image_size=(8, 8), augment=augment, generator=torch.Generator().manual_seed(4))
    net = ConvNet(spec).double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def net_forward(flat, x):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.func.functional_call(net, params, (x,))

    x_syn = images.clone().requires_grad_()
    theta = start.clone().requires_grad_()
    for step in plan.steps:
        x = apply_dsa(x_syn[step.indices], step.augment)
        out = net_forward(theta, x)
        ce = torch.sum(-F.log_softmax(out, dim=1) * F.softmax(labels[step.indices], dim=1)) / len(x)
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - lr * grad
    expected = F.mse_loss(theta, target, reduction="sum") / F.mse_loss(start, target, reduction="sum")
    expected.backward()

    x = images.clone().requires_grad_()
    loss = trajectory_matching_loss(spec, start, target, x, labels, lr, plan=plan, unroll="full")
    loss.backward()
    assert torch.allclose(loss, expected.detach(), rtol=1e-12)
    assert _rel(x.grad, x_syn.grad) < 1e-10


@pytest.mark.parametrize("step", ["auto", "autograd"])
def test_exact_reverse_step_runs_eight_convolutions_per_layer(step):
    """The reverse step's cost: taking <grad, lam> through the conv outputs (the weight gradient's adjoint
    identity) leaves 8 convolutions per layer (forward, input gradient, the direction's conv, and their
    derivatives) where differentiating the weight gradients takes 9. In the first layer the explicit
    step runs 5 (no input gradient in the first derivative); the autograd step keeps the first
    layer's weight gradient (a 27-long reduction, below the identity's threshold): 6."""
    spec = ConvNetSpec(3, 10, 16, width=8, depth=3)
    start, target, images, labels, lr = _problem(spec, 4, seed=3, dtype=torch.float32)
    syn_steps = 3
    g = torch.Generator().manual_seed(3)
    plan = make_unroll_plan(4, syn_steps, 2, image_size=(16, 16), augment=None, generator=g)
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, lr))
    loss = trajectory_matching_loss(spec, start, target, x, y, a, plan=plan, unroll="exact", micro_batch=2, step=step)
    with ConvCalls() as calls:
        loss.backward()
    first_layer = 5 if step == "auto" else 6  # auto: the written-out step
    assert calls.kernels == syn_steps * (first_layer + 8 * (spec.depth - 1))


def test_gradcheck_of_exact_engine():
    spec = ConvNetSpec(1, 2, 4, width=2, depth=1, pooling="none")
    start, target, images, labels, lr = _problem(spec, 3, seed=5)
    plan = make_unroll_plan(3, 3, 2, image_size=(4, 4), augment=None, generator=torch.Generator().manual_seed(6))

    def f(x, y, a):
        return trajectory_matching_loss(spec, start, target, x, y, a, plan=plan, unroll="exact", micro_batch=1)

    inputs = tuple(t.clone().requires_grad_() for t in (images, labels, lr))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_partial_gradients_and_seeded_plans():
    spec = ConvNetSpec(3, 3, 8, width=4, depth=2)
    start, target, images, labels, lr = _problem(spec, 8, seed=8)
    kwargs = dict(syn_steps=4, batch_syn=4, augment=DSAConfig())
    # Only lr requires grad: images and labels get none, lr's matches the full engine.
    grads = {}
    for unroll in ("full", "exact"):
        a = lr.clone().requires_grad_()
        g = torch.Generator().manual_seed(9)
        trajectory_matching_loss(
            spec, start, target, images, labels, a, generator=g, unroll=unroll, **kwargs
        ).backward()
        grads[unroll] = a.grad
    assert _rel(grads["exact"], grads["full"]) < 1e-10
    # The same generator seed draws the same plan; a different one another.
    p1 = make_unroll_plan(8, 4, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(1))
    p2 = make_unroll_plan(8, 4, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(1))
    p3 = make_unroll_plan(8, 4, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(p1.steps, p2.steps))
    assert not all(torch.equal(a.indices, b.indices) for a, b in zip(p1.steps, p3.steps))


def test_plan_consumes_chunks_like_upstream():
    """A fresh permutation per pass over the set, chunks popped from the end (short chunk first)."""
    g = torch.Generator().manual_seed(0)
    plan = make_unroll_plan(10, 6, 4, image_size=(4, 4), augment=None, generator=g)
    g = torch.Generator().manual_seed(0)
    perm1 = torch.randperm(10, generator=g)
    perm2 = torch.randperm(10, generator=g)
    expected = [perm1[8:], perm1[4:8], perm1[:4], perm2[8:], perm2[4:8], perm2[:4]]
    for step, want in zip(plan.steps, expected):
        assert torch.equal(step.indices, want)


def test_memory_budget_switches_to_full_with_the_same_gradient():
    spec = ConvNetSpec(3, 3, 8, width=4, depth=2)
    problem = _problem(spec, 8, seed=10)
    plan = make_unroll_plan(8, 5, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(3))
    need = estimate_full_unroll_bytes(spec, 4, 5, torch.float64)
    assert need > 0
    big = _grads(spec, problem, plan, unroll="exact", memory_budget_gb=need / 2**30)
    small = _grads(spec, problem, plan, unroll="exact", memory_budget_gb=(need - 1) / 2**30)
    for a, b in zip(big[1:], small[1:]):
        assert _rel(a, b) < 1e-10


def test_bad_arguments_are_named():
    spec = ConvNetSpec(3, 3, 8, width=4, depth=2)
    start, target, images, labels, lr = _problem(spec, 8)
    g = torch.Generator().manual_seed(0)
    kw = dict(syn_steps=2, batch_syn=4, generator=g)
    with pytest.raises(ValueError, match="unroll must be one of"):
        trajectory_matching_loss(spec, start, target, images, labels, lr, unroll="approx", **kw)
    with pytest.raises(ValueError, match=r"labels must be logits of shape \(8, 3\)"):
        trajectory_matching_loss(spec, start, target, images, labels[:, :2], lr, **kw)
    with pytest.raises(ValueError, match="images must be"):
        trajectory_matching_loss(spec, start, target, images[:, :1], labels, lr, **kw)
    with pytest.raises(ValueError, match="start_params must have shape"):
        trajectory_matching_loss(spec, start[:-1], target, images, labels, lr, **kw)
    with pytest.raises(ValueError, match="lr must be a 0-dim"):
        trajectory_matching_loss(spec, start, target, images, labels, lr.view(1), **kw)
    with pytest.raises(ValueError, match="give either plan"):
        trajectory_matching_loss(spec, start, target, images, labels, lr)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from datm_fast.distill import trajectory_matching_loss
    from datm_fast.models import ConvNetSpec, init_flat_params
    from datm_fast.utils import peak_rss_bytes
    torch.set_num_threads(1)
    unroll, steps = sys.argv[1], int(sys.argv[2])
    spec = ConvNetSpec(3, 10, 16, width=16, depth=2)
    g = torch.Generator().manual_seed(0)
    start = init_flat_params(spec, g)
    target = start + 0.01 * torch.randn(spec.num_params, generator=g)
    x = torch.randn(64, 3, 16, 16, generator=g).requires_grad_()
    y = torch.randn(64, 10, generator=g).requires_grad_()
    lr = torch.tensor(0.01).requires_grad_()
    def run(n):
        loss = trajectory_matching_loss(spec, start, target, x, y, lr, syn_steps=n, batch_syn=64,
                                        generator=torch.Generator().manual_seed(1), unroll=unroll, micro_batch=16)
        loss.backward()
    run(1)  # warm up allocator and oneDNN caches before the baseline
    base = peak_rss_bytes()
    run(steps)
    print(json.dumps({"growth_mb": (peak_rss_bytes() - base) / 2**20}))
    """
)


def _rss_growth_mb(unroll: str, steps: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, unroll, str(steps)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.slow
def test_exact_memory_does_not_grow_with_syn_steps():
    """Peak RSS of a subprocess: full grows by ~4 MB per step here, exact stays flat."""
    full_short, full_long = _rss_growth_mb("full", 4), _rss_growth_mb("full", 40)
    exact_short, exact_long = _rss_growth_mb("exact", 4), _rss_growth_mb("exact", 40)
    assert full_long - full_short > 60, (full_short, full_long)
    assert exact_long - exact_short < 10, (exact_short, exact_long)


def test_trajectory_storage_gets_its_own_mapping_above_the_threshold(monkeypatch):
    """Large theta_i storage on CPU bypasses the heap (its own anonymous mapping, freed with the tensor);
    the gradient is the same either way."""
    like = torch.zeros(5, dtype=torch.float64)
    small = unroll_module._trajectory_storage(3, like)
    assert small.shape == (3, 5) and small.dtype == torch.float64
    monkeypatch.setattr(unroll_module, "_OWN_MAPPING_BYTES", 0)
    mapped = unroll_module._trajectory_storage(3, like)
    assert mapped.shape == (3, 5) and mapped.dtype == torch.float64 and mapped.is_contiguous()
    mapped[1] = torch.arange(5.0, dtype=torch.float64)
    assert mapped[1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and mapped[0].abs().sum() == 0

    spec = ConvNetSpec(3, 3, 8, width=5, depth=2)
    problem = _problem(spec, 6, seed=11)
    plan = make_unroll_plan(6, 4, 3, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(2))
    exact = _grads(spec, problem, plan, unroll="exact", micro_batch=2)
    full = _grads(spec, problem, plan, unroll="full")
    for a, b in zip(exact, full):
        assert _rel(a, b) < 1e-10


def test_a_cpu_unroll_does_not_import_triton():
    """The cpp backend is all a CPU run needs; probing triton costs about 80 MB of resident memory."""
    code = textwrap.dedent(
        """
        import sys, torch
        from datm_fast.distill import trajectory_matching_loss
        from datm_fast.models import ConvNetSpec, init_flat_params
        spec = ConvNetSpec(3, 4, 8, width=4, depth=2)
        start = init_flat_params(spec, torch.Generator().manual_seed(0))
        x = torch.randn(4, 3, 8, 8, requires_grad=True)
        y = torch.randn(4, 4, requires_grad=True)
        lr = torch.tensor(0.01, requires_grad=True)
        trajectory_matching_loss(spec, start, start + 0.01, x, y, lr, syn_steps=2, batch_syn=4,
                                 generator=torch.Generator().manual_seed(1)).backward()
        print("triton" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_exact_equals_full_on_gpu():
    """The GPU path (NCHW, the CUDA block kernels, cuDNN's convolutions, device-side plan) in float64."""
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    start, target, images, labels, lr = (t.cuda() for t in _problem(spec, 8, seed=4))
    gen = torch.Generator(device="cuda").manual_seed(5)
    plan = make_unroll_plan(8, 5, 4, image_size=(8, 8), augment=DSAConfig(), generator=gen)
    problem = (start, target, images, labels, lr)
    full = _grads(spec, problem, plan, unroll="full", fused=False)
    exact = _grads(spec, problem, plan, unroll="exact", micro_batch=2)
    assert exact[1].is_cuda
    for got, ref in zip(exact, full):
        assert _rel(got, ref) < 1e-10


@pytest.mark.parametrize("unroll", ["exact", "tesla", "full"])
def test_engines_read_no_tensor_value_on_the_host_once_the_plan_is_drawn(unroll, monkeypatch):
    """A precondition of capturing an unroll as a CUDA graph (and of not stalling a GPU): with the plan
    drawn up front, forward and backward never bring a tensor's value to Python (each of these would
    be a device-to-host copy and a synchronisation on a GPU)."""
    spec = ConvNetSpec(3, 4, 8, width=4, depth=2)
    start, target, images, labels, lr = _problem(spec, 6, seed=8, dtype=torch.float32)
    plan = make_unroll_plan(6, 3, 3, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(8))
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, lr))
    reads = []
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    loss = trajectory_matching_loss(spec, start, target, x, y, a, plan=plan, unroll=unroll, micro_batch=2)
    loss.backward()
    monkeypatch.undo()
    assert reads == []
    assert x.grad is not None and x.grad.abs().sum() > 0
