"""The unroll engines: exact equals full (float64, rel. error < 1e-10), tesla differs, memory stays flat."""

from __future__ import annotations

import importlib
import json
import os
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
from datm_fast.reference.upstream_unroll import (
    ParamDiffAug,
    diff_augment,
    upstream_full_iteration,
    upstream_tesla_iteration,
)
from datm_fast.step_graphs import StaticStep, StepGraphs

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


# ----- upstream's loops, re-stated (datm_fast.reference.upstream_unroll) -------------------------------------
def _upstream_grads(iteration, spec, problem, indices, **kwargs):
    start, target, images, labels, lr = problem
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, lr))
    loss = iteration(spec, start, target, x, y, a, indices, **kwargs)
    return loss, x.grad, y.grad, a.grad


def test_upstream_loops_compute_what_our_engines_compute():
    """Fed the same minibatches (no augmentation, float64): upstream's DATM.py loop gives our full and exact
    engines' loss and gradients, and upstream's DATM_tesla.py loop our tesla engine's."""
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    problem = _problem(spec, 12, seed=12)
    # 5 does not divide 12: a short chunk first, as upstream pops them; 7 steps span three permutations.
    plan = make_unroll_plan(12, 7, 5, image_size=(8, 8), augment=None, generator=torch.Generator().manual_seed(13))
    indices = [step.indices for step in plan.steps]
    up_full = _upstream_grads(upstream_full_iteration, spec, problem, indices)
    up_tesla = _upstream_grads(upstream_tesla_iteration, spec, problem, indices)
    ours = {
        "full": _grads(spec, problem, plan, unroll="full"),
        "exact": _grads(spec, problem, plan, unroll="exact", micro_batch=2),
        "tesla": _grads(spec, problem, plan, unroll="tesla", micro_batch=2),
    }
    names = ("loss", "images", "labels", "lr")
    for engine, upstream in (("full", up_full), ("exact", up_full), ("tesla", up_tesla)):
        for name, got, ref in zip(names, ours[engine], upstream):
            assert ref.abs().max() > 0, f"upstream's {name} gradient must not vanish in this problem"
            assert _rel(got, ref) < 1e-10, (engine, name, _rel(got, ref))
    # The two upstream loops differ where TESLA drops the dependence between steps: the comparison above
    # would not notice a TESLA re-statement that computed the exact gradient.
    assert _rel(up_tesla[1], up_full[1]) > 0.05 and _rel(up_tesla[3], up_full[3]) > 0.01


def test_upstream_tesla_reuses_the_first_pass_augmentation():
    """With DiffAugment on, TESLA's second pass differentiates the batch its first pass augmented (drawing
    nothing new): at one step it is the full unroll's gradient, given the same global RNG state."""
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    problem = _problem(spec, 6, seed=14, dtype=torch.float32)
    for steps, seed in ((1, 0), (1, 1), (3, 2)):
        indices = [torch.randperm(6, generator=torch.Generator().manual_seed(seed + i))[:4] for i in range(steps)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = _upstream_grads(upstream_full_iteration, spec, problem, indices, augment=True)
            torch.manual_seed(seed)
            tesla = _upstream_grads(upstream_tesla_iteration, spec, problem, indices, augment=True)
        assert abs(tesla[0] - full[0]) <= 1e-5 * full[0], "the same draws: the same roll-out"
        if steps == 1:
            for got, ref in zip(tesla[1:], full[1:]):
                assert _rel(got, ref) < 1e-5
    plain = _upstream_grads(upstream_full_iteration, spec, problem, indices)
    assert _rel(plain[1], full[1]) > 1e-3, "augmentation changes the gradient"


def test_upstream_diff_augment_seed_handling():
    """seed -1: per-sample values from the global RNG; another seed: one value for the batch, reseeded."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).expand(4, 3, 8, 8)
    param = ParamDiffAug()
    with torch.random.fork_rng(devices=[]):  # a seed reseeds the global RNG, as upstream's does
        a, b = diff_augment(x, "crop", seed=5, param=param), diff_augment(x, "crop", seed=5, param=param)
        assert torch.equal(a, b) and param.batchmode and param.latestseed == 5 + 3  # choice, x and y shifts
        assert all(torch.equal(a[i], a[0]) for i in range(4)), "batchmode: the same crop for every sample"
        assert not torch.equal(a[0], x[0])
        torch.manual_seed(0)
        c = diff_augment(x, "color", param=param)
    assert not param.batchmode and param.latestseed == -1
    assert len({tuple(c[i].flatten()[:4].tolist()) for i in range(4)}) == 4, "per sample: values of its own"
    assert diff_augment(x, "none", param=param) is x


# ----- micro_batch=None by device, and the host generator of a GPU plan ---------------------------------
CIFAR_CONVNET = ConvNetSpec(3, 10, 32, width=128, depth=3)


def test_default_micro_batch_by_device():
    """CUDA: the whole step batch where its graph fits in a quarter of the free memory, else the most
    images that fit; CPU (and CUDA with the free memory unknown): the 256 MiB rule; batch norm: whole."""
    choose = unroll_module.choose_micro_batch
    f32 = torch.float32
    per_sample = unroll_module._graph_bytes_per_sample(CIFAR_CONVNET, f32)
    assert per_sample == 12 * 128 * (32 * 32 + 16 * 16 + 8 * 8) * 4  # the bound every number below follows
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cuda", free_bytes=100 * 10**9) == 100
    assert choose(CIFAR_CONVNET, 500, f32, device_type="cuda", free_bytes=100 * 10**9) == 500
    # 1 GB free: a quarter holds 250e6 // 8_257_536 = 30 graphs (not the CPU rule's 32); 100 runs as 4 x 25.
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cuda", free_bytes=10**9) == 10**9 // 4 // per_sample == 30
    assert unroll_module._micro_batches(CIFAR_CONVNET, 100, 30, f32) == [slice(s, s + 25) for s in range(0, 100, 25)]
    # The boundary: whole exactly when 100 graphs fit in a quarter.
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cuda", free_bytes=4 * 100 * per_sample) == 100
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cuda", free_bytes=4 * 100 * per_sample - 4) == 99
    assert choose(CIFAR_CONVNET, 100, torch.float64, device_type="cuda", free_bytes=4 * 100 * per_sample) == 50
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cuda", free_bytes=0) == 1
    # CPU: the measured 256 MiB rule, whatever the free memory; a smaller batch stays whole.
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cpu", free_bytes=None) == 2**28 // per_sample == 32
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cpu", free_bytes=100 * 10**9) == 32
    assert choose(CIFAR_CONVNET, 10, f32, device_type="cpu", free_bytes=None) == 10
    assert choose(CIFAR_CONVNET, 100, f32, device_type="cuda", free_bytes=None) == 32
    assert choose(ConvNetSpec(3, 200, 64, width=128, depth=4), 100, f32, device_type="cpu", free_bytes=None) == 8
    batch_norm = ConvNetSpec(3, 10, 32, width=128, depth=3, norm="batch")
    assert choose(batch_norm, 100, f32, device_type="cuda", free_bytes=0) == 100
    assert choose(batch_norm, 100, f32, device_type="cpu", free_bytes=None) == 100
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        choose(CIFAR_CONVNET, 0, f32, device_type="cpu", free_bytes=None)


def test_free_device_memory_is_read_only_on_cuda(monkeypatch):
    """CUDA: the driver's free memory plus what the caching allocator holds unused, for the device
    given; CPU: None, without a call into torch.cuda (faked here, so the test runs without a GPU)."""
    calls = []

    def fake(name, value):
        def read(device=None):
            calls.append((name, device))
            return value

        monkeypatch.setattr(torch.cuda, name, read)

    fake("mem_get_info", (10 * 2**30, 140 * 2**30))
    fake("memory_reserved", 3 * 2**30)
    fake("memory_allocated", 2 * 2**30)
    assert unroll_module._free_device_bytes(torch.device("cpu")) is None
    assert calls == []
    cuda1 = torch.device("cuda", 1)
    assert unroll_module._free_device_bytes(cuda1) == 11 * 2**30
    assert sorted(calls) == [("mem_get_info", cuda1), ("memory_allocated", cuda1), ("memory_reserved", cuda1)]


def _spy_micro_batches(monkeypatch) -> list[tuple[int, int | None, int]]:
    """Record (step batch, micro_batch, number of chunks) of every micro-batch split of the engine."""
    seen = []
    original = unroll_module._micro_batches

    def spy(spec, batch_size, micro_batch, dtype):
        chunks = original(spec, batch_size, micro_batch, dtype)
        seen.append((batch_size, micro_batch, len(chunks)))
        return chunks

    monkeypatch.setattr(unroll_module, "_micro_batches", spy)
    return seen


def test_the_engine_splits_by_the_chosen_micro_batch_and_leaves_cuda_alone_on_cpu(monkeypatch):
    spec = ConvNetSpec(3, 4, 8, width=4, depth=2)
    problem = _problem(spec, 10, seed=12)
    plan = make_unroll_plan(
        10, 3, 5, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(1)
    )
    cuda_calls = []
    for name in ("mem_get_info", "memory_reserved", "memory_allocated", "is_available", "device_count", "_lazy_init"):

        def record(*args, _name=name, **kwargs):
            cuda_calls.append(_name)
            raise AssertionError(f"torch.cuda.{_name} called by a CPU unroll")

        monkeypatch.setattr(torch.cuda, name, record)
    seen = _spy_micro_batches(monkeypatch)
    # The CPU rule, end to end: with room for 2 graphs in the CPU budget, each step of 5 runs as 3 chunks.
    per_sample = unroll_module._graph_bytes_per_sample(spec, torch.float64)
    monkeypatch.setattr(unroll_module, "AUTO_MICRO_BATCH_BYTES", 2 * per_sample)
    reference = _grads(spec, problem, plan, unroll="exact", micro_batch=2)
    seen.clear()
    auto = _grads(spec, problem, plan, unroll="exact")
    assert seen == [(5, 2, 3)] * 6  # 3 steps forward, 3 back
    assert all(torch.equal(a, b) for a, b in zip(auto, reference))
    # Whatever choose_micro_batch says is what the engine runs; it is asked once per unroll, off CUDA.
    asked = []

    def choose(spec_, batch_size, dtype, *, device_type, free_bytes):
        asked.append((batch_size, dtype, device_type, free_bytes))
        return 4

    monkeypatch.setattr(unroll_module, "choose_micro_batch", choose)
    seen.clear()
    _grads(spec, problem, plan, unroll="tesla")
    assert asked == [(5, torch.float64, "cpu", None)]
    assert seen == [(5, 4, 2)] * 6
    assert cuda_calls == []


def test_derived_host_generator_is_a_pure_function_of_the_generator_state():
    def draws(h: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2**62, (8,), generator=h)

    derive = unroll_module.derive_host_generator
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    h = derive(g)
    assert h.device.type == "cpu"
    assert torch.equal(g.get_state(), state), "deriving must not advance the generator"
    assert torch.equal(draws(h), draws(derive(g)))  # the same state, the same host stream
    assert torch.equal(draws(derive(torch.Generator().manual_seed(5))), draws(derive(torch.Generator().manual_seed(5))))
    first = draws(derive(g))
    # Not the generator's own stream, nor one seeded with its seed.
    assert not torch.equal(first, draws(torch.Generator().manual_seed(5)))
    assert h.initial_seed() != g.initial_seed()
    # A generator that has drawn since (as the previous plan did) gives another stream, and so does another seed.
    torch.rand(1, generator=g)
    assert not torch.equal(first, draws(derive(g)))
    assert not torch.equal(first, draws(derive(torch.Generator().manual_seed(6))))


def test_a_cpu_plan_draws_its_dsa_group_from_its_own_generator(monkeypatch):
    """The derived host generator is for GPU generators only: a CPU plan's draws stay as they were."""
    hosts = []
    original = unroll_module.sample_dsa_params

    def spy(*args, host_generator=None, **kwargs):
        hosts.append(host_generator)
        return original(*args, host_generator=host_generator, **kwargs)

    monkeypatch.setattr(unroll_module, "sample_dsa_params", spy)
    make_unroll_plan(6, 2, 3, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(0))
    assert hosts == [None, None]
    mine = torch.Generator().manual_seed(1)
    make_unroll_plan(6, 1, 3, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator(), host_generator=mine)
    assert hosts[-1] is mine


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_plan_and_default_micro_batch(monkeypatch):
    """A CUDA generator without a host generator draws the plan of its derived one; micro_batch=None
    reads the free memory and runs a batch of 40 CIFAR images whole (the CPU rule: 2 x 20)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    host = unroll_module.derive_host_generator(gen)
    a = make_unroll_plan(40, 2, 40, image_size=(32, 32), augment=DSAConfig(), generator=gen)
    gen.manual_seed(5)
    b = make_unroll_plan(40, 2, 40, image_size=(32, 32), augment=DSAConfig(), generator=gen, host_generator=host)
    for sa, sb in zip(a.steps, b.steps):
        assert torch.equal(sa.indices, sb.indices) and sa.augment.groups == sb.augment.groups
    assert unroll_module._free_device_bytes(torch.device("cuda")) > 4 * 40 * 8_257_536
    seen = _spy_micro_batches(monkeypatch)
    problem = tuple(t.cuda() for t in _problem(CIFAR_CONVNET, 40, seed=4, dtype=torch.float32))
    _grads(CIFAR_CONVNET, problem, a, unroll="exact")
    assert seen == [(40, 40, 1)] * 4


# ----- static steps (CUDA graphs) ----------------------------------------------------------------------------
@pytest.mark.parametrize("unroll", ["exact", "tesla"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_static_steps_equal_the_eager_steps_bit_for_bit(unroll, dtype):
    """graphs=on runs each written-out step from its buffers (captured as a CUDA graph on a GPU, run as it
    is here): the same ops on the same values, so the loss and every gradient are equal bit for bit."""
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    problem = _problem(spec, 10, seed=11, dtype=dtype)
    plan = make_unroll_plan(
        10, 6, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(2)
    )
    eager = _grads(spec, problem, plan, unroll=unroll, micro_batch=3)
    graphs = StepGraphs()
    static = _grads(spec, problem, plan, unroll=unroll, micro_batch=3, graphs="on", step_graphs=graphs)
    for got, ref in zip(static, eager):
        assert torch.equal(got, ref)
    # One static step per kind (roll-out, reverse) and DSA op groups drawn: batch 4 under a limit of 3 runs
    # as 2 + 2, a single micro-batch shape.
    assert len(graphs) == 2 * len({s.augment.groups for s in plan.steps})


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="runs CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, as conftest sets without a GPU)",
)
def test_the_triton_backend_runs_the_student_blocks_in_triton(monkeypatch):
    """EngineOptions.backend="triton" runs the block in the Triton kernels (the written-out steps call
    them one by one), with the gradient of PyTorch's ops in float64."""
    import datm_fast.kernels.block as triton_block

    calls = []
    original = triton_block.block_double_backward

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(triton_block, "block_double_backward", counted)
    spec = ConvNetSpec(3, 4, 8, width=4, depth=2)
    problem = _problem(spec, 6, seed=3)
    plan = make_unroll_plan(6, 3, 3, image_size=(8, 8), augment=None, generator=torch.Generator().manual_seed(4))
    ours = _grads(spec, problem, plan, unroll="exact", backend="triton")
    ref = _grads(spec, problem, plan, unroll="exact", backend="torch")
    assert calls  # the Triton double backward ran in the reverse steps
    for got, want in zip(ours, ref):
        assert _rel(got, want) < 1e-10


def test_static_steps_are_built_once_per_run_and_read_the_set_in_place(monkeypatch):
    """A run keeps one StepGraphs: the second iteration builds no step, and the steps read the set's
    storage as the outer optimiser leaves it (updated in place), not a copy taken when they were built."""
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    start, target, images, labels, lr = _problem(spec, 8, seed=5)
    plan = make_unroll_plan(8, 4, 4, image_size=(8, 8), augment=DSAConfig(), generator=torch.Generator().manual_seed(6))
    built = []
    original = StaticStep.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(StaticStep, "__init__", counting)
    x, y, a = (t.clone().requires_grad_() for t in (images, labels, lr))
    graphs = StepGraphs()
    results, seen = [], []
    for _ in range(2):
        seen.append(x.detach().clone())
        x.grad = y.grad = a.grad = None
        trajectory_matching_loss(spec, start, target, x, y, a, plan=plan, graphs="on", step_graphs=graphs).backward()
        results.append((x.grad.clone(), y.grad.clone(), a.grad.clone()))
        with torch.no_grad():
            x -= 10 * x.grad  # the outer step, in place
    first = len(built)
    assert first > 0 and len(built) == first  # nothing built in the second iteration
    eager = _grads(spec, (start, target, seen[1], labels, lr), plan)
    for got, ref in zip(results[1], eager[1:]):
        assert torch.equal(got, ref)


def test_a_static_step_refuses_inputs_it_was_not_built_for():
    step = StaticStep(
        lambda theta, indices: theta[indices] * 2,
        {"theta": torch.zeros(5), "indices": torch.zeros(2, dtype=torch.long)},
        capture=False,
    )
    assert torch.equal(step(theta=torch.arange(5.0), indices=torch.tensor([1, 3])), torch.tensor([2.0, 6.0]))
    with pytest.raises(ValueError, match="expected the inputs"):
        step(theta=torch.arange(5.0))
    with pytest.raises(ValueError, match="input indices of shape \\(3,\\)"):
        step(theta=torch.arange(5.0), indices=torch.tensor([1, 2, 3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_steps_captured_as_cuda_graphs_equal_the_eager_steps():
    spec = ConvNetSpec(3, 4, 8, width=6, depth=2)
    problem = tuple(t.cuda() for t in _problem(spec, 10, seed=11))
    gen = torch.Generator(device="cuda").manual_seed(2)
    plan = make_unroll_plan(10, 6, 4, image_size=(8, 8), augment=DSAConfig(), generator=gen)
    eager = _grads(spec, problem, plan, micro_batch=3)
    graphs = StepGraphs()
    static = _grads(spec, problem, plan, micro_batch=3, graphs="on", step_graphs=graphs)
    assert all(step.captured for step in graphs._steps.values())
    for got, ref in zip(static, eager):
        assert _rel(got, ref) < 1e-12
