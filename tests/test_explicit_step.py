"""The written-out reverse and roll-out steps against autograd of the same network, float64 (rel. < 1e-10)."""

from __future__ import annotations

import importlib

import pytest
import torch

from datm_fast.distill.explicit_step import gradient, reverse_step
from datm_fast.models import ConvNetSpec, init_flat_params, unflatten_params

unroll = importlib.import_module("datm_fast.distill.unroll")  # the package attribute is the function

CASES = [
    # (channels, image px, width, depth, channels_last, block backend)
    (3, 8, 5, 2, False, "torch"),
    (3, 8, 5, 2, False, "auto"),
    (1, 7, 4, 3, False, "auto"),  # padding 3 (one channel), odd sizes: pooling drops a row and a column
    (3, 16, 6, 3, True, "auto"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_parts_close(spec: ConvNetSpec, got, ref) -> None:
    assert len(got) == len(ref)
    conv_biases = {where.conv_bias for where in spec.layer_params}
    for index, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, index
        if index in conv_biases:
            # A conv bias before instance norm does not change the output: its derivatives are zero,
            # computed as rounding noise (about 1e-17) in both, where a relative error means nothing.
            assert (a - b).abs().max() < 1e-12, index
        else:
            assert _rel(a, b) < 1e-10, index


def _setup(case, seed=0):
    channels, px, width, depth, channels_last, backend = case
    spec = ConvNetSpec(channels, 4, px, width=width, depth=depth)
    g = torch.Generator().manual_seed(seed)
    theta = init_flat_params(spec, g, dtype=torch.float64)
    lam = torch.randn(spec.num_params, generator=g, dtype=torch.float64)
    x = torch.randn(5, channels, px, px, dtype=torch.float64, generator=g)
    y = torch.randn(5, 4, dtype=torch.float64, generator=g)
    kernels = unroll._Kernels(True, backend, channels_last, explicit=True)
    lam_parts = unroll._in_layout(unflatten_params(spec, lam), channels_last)
    leaves = unroll._leaves(spec, theta, channels_last)
    x_net = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return spec, kernels, leaves, lam_parts, x, x_net, y


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}-px{c[1]}-d{c[3]}-cl{int(c[4])}-{c[5]}" for c in CASES])
def test_reverse_step_equals_autograd_double_backward(case):
    spec, kernels, leaves, lam_parts, x, x_net, y = _setup(case)
    xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = unroll._leaf_step_loss(spec, leaves, xx, yy, None, 8, kernels)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        dot = sum((g * lp).sum() for g, lp in zip(grads, lam_parts))
        ref = torch.autograd.grad(dot, leaves + [xx, yy])
    got = reverse_step(spec, [p.detach() for p in leaves], lam_parts, x_net, y, 8, backend=kernels.backend)
    assert _rel(got.dot, dot.detach()) < 1e-12
    _assert_parts_close(spec, got.hvp, ref[: len(leaves)])
    assert _rel(got.grad_inputs, ref[-2]) < 1e-10
    assert _rel(got.grad_labels, ref[-1]) < 1e-10


def test_reverse_step_skips_what_is_not_asked_for():
    spec, kernels, leaves, lam_parts, _, x_net, y = _setup(CASES[1], seed=1)
    params = [p.detach() for p in leaves]
    full = reverse_step(spec, params, lam_parts, x_net, y, 8, backend=kernels.backend)
    bare = reverse_step(
        spec,
        params,
        lam_parts,
        x_net,
        y,
        8,
        backend=kernels.backend,
        need_hvp=False,
        need_inputs=False,
        need_labels=False,
    )
    assert bare.hvp is None and bare.grad_inputs is None and bare.grad_labels is None
    assert torch.equal(bare.dot, full.dot)
    tesla = reverse_step(spec, params, lam_parts, x_net, y, 8, backend=kernels.backend, need_hvp=False)
    assert torch.equal(tesla.grad_inputs, full.grad_inputs) and torch.equal(tesla.grad_labels, full.grad_labels)


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}-px{c[1]}-d{c[3]}-cl{int(c[4])}-{c[5]}" for c in CASES])
def test_gradient_equals_autograd(case):
    spec, kernels, leaves, _, x, x_net, y = _setup(case, seed=2)
    with torch.enable_grad():
        loss = unroll._leaf_step_loss(spec, leaves, x, y, None, 8, kernels)
        ref = torch.autograd.grad(loss, leaves)
    got = gradient(spec, [p.detach() for p in leaves], x_net, y, 8, backend=kernels.backend)
    _assert_parts_close(spec, got, ref)


def test_only_the_fused_instance_norm_convnet_is_written_out():
    spec = ConvNetSpec(3, 10, 32)
    assert spec.norm_relu_pool_blocks
    assert unroll._Kernels(True, "auto", False, explicit=True).written_out(spec)
    assert not unroll._Kernels(False, "auto", False, explicit=True).written_out(spec)
    assert not unroll._Kernels(True, "auto", False, explicit=False).written_out(spec)  # step="autograd"
    for kwargs in ({"norm": "batch"}, {"norm": "none"}, {"activation": "sigmoid"}, {"pooling": "max"}):
        other = ConvNetSpec(3, 10, 32, **kwargs)
        written = unroll._Kernels(True, "auto", False, explicit=True).written_out(other)
        assert not other.norm_relu_pool_blocks and not written, kwargs
