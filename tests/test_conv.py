"""datm_fast.ops.conv2d, the convolution whose derivatives of every order are the convolution library's
own kernels: values, gradients and gradients of gradients against PyTorch's F.conv2d and its autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conv_count import ConvCalls

from datm_fast.ops import conv2d

# (batch, in channels, out channels, H, W, padding): the ConvNet's layers in small, odd sizes,
# the 3-channel first layer, and MNIST's padding of 3.
CASES = [(2, 3, 5, 8, 8, 1), (3, 4, 6, 7, 5, 1), (1, 1, 4, 6, 6, 3), (2, 5, 3, 5, 9, 0)]


def _inputs(case, dtype=torch.float64, channels_last=False, seed=0, device="cpu"):
    b, cin, cout, h, w, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, weight, bias)]


def _two_orders(conv, x, weight, bias, padding, seed=1):
    """Output; gradients in (x, weight, bias) of a nonlinear loss; and the gradient in (x, weight, bias)
    of a random combination of those gradients: the Hessian-vector product the exact engine takes."""
    g = torch.Generator().manual_seed(seed)
    y = conv(x, weight, bias, padding)
    probe = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    # tanh makes the loss curved in y, so every term of the second derivative is exercised.
    loss = (torch.tanh(y) * probe).sum()
    grads = torch.autograd.grad(loss, (x, weight, bias), create_graph=True)
    directions = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in grads]
    dot = sum((a * d).sum() for a, d in zip(grads, directions))
    second = torch.autograd.grad(dot, (x, weight, bias))
    return [y.detach(), *[t.detach() for t in grads], *second]


def _aten(x, weight, bias, padding):
    return F.conv2d(x, weight, bias, padding=padding)


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv2d_matches_pytorch_to_second_order_in_float64(case, channels_last):
    padding = case[-1]
    ours = _two_orders(conv2d, *_inputs(case, channels_last=channels_last), padding)
    ref = _two_orders(_aten, *_inputs(case, channels_last=channels_last), padding)
    for name, a, b in zip(["y", "dx", "dw", "db", "ddx", "ddw", "ddb"], ours, ref):
        assert _max_rel(a, b) < 1e-12, name


def test_conv2d_float32_close_to_float64():
    case = (4, 8, 16, 16, 16, 1)
    ours = _two_orders(conv2d, *_inputs(case, torch.float32, channels_last=True), 1)
    ref = _two_orders(_aten, *_inputs(case), 1)
    for a, b in zip(ours, ref):
        assert _max_rel(a.double(), b) < 1e-4


def test_conv2d_without_bias():
    x, weight, _ = _inputs((2, 3, 4, 6, 6, 1))
    y = conv2d(x, weight, None, 1)
    torch.testing.assert_close(y, F.conv2d(x, weight, None, padding=1), rtol=1e-12, atol=1e-12)


def test_first_layer_input_gradient_is_skipped_when_only_weights_are_asked_for():
    """The exact engine's reverse step: images require grad, but the create_graph gradient is taken in
    the parameters only, so the first layer's input gradient is waste (7% of that layer's work); it is
    computed again, and only, when the second derivative reaches the images."""
    x, w1, _ = _inputs((2, 3, 4, 8, 8, 1))
    w2 = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    loss = conv2d(torch.tanh(conv2d(x, w1, None, 1)), w2, None, 1).pow(2).sum()
    with ConvCalls() as calls:
        g1, g2 = torch.autograd.grad(loss, (w1, w2), create_graph=True)
    assert calls.input_grads == [(2, 4, 8, 8)]  # the second layer's input gradient only
    with ConvCalls() as calls:
        (gx,) = torch.autograd.grad(g1.sum() + g2.sum(), (x,))
    assert (2, 3, 8, 8) in calls.input_grads  # now the images' gradient is wanted, and computed
    ref_loss = F.conv2d(torch.tanh(F.conv2d(x, w1, padding=1)), w2, padding=1).pow(2).sum()
    r1, r2 = torch.autograd.grad(ref_loss, (w1, w2), create_graph=True)
    (ref_gx,) = torch.autograd.grad(r1.sum() + r2.sum(), (x,))
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)


def test_conv2d_rejects_bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="same C_in"):
        conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d(x, torch.randn(4, 3, 3, 3), torch.randn(5))
    with pytest.raises(ValueError, match="padding must be an int"):
        conv2d(x, torch.randn(4, 3, 3, 3), None, -1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_conv2d_on_gpu_matches_pytorch():
    case = (4, 8, 16, 16, 16, 1)
    ours = _two_orders(conv2d, *_inputs(case, device="cuda"), 1)
    ref = _two_orders(_aten, *_inputs(case, device="cuda"), 1)
    for a, b in zip(ours, ref):
        assert _max_rel(a, b) < 1e-10
