"""K ConvNets of one spec evaluated together: grouped convolutions over stacked flat parameters.

Expert ``k`` of a group owns row ``k`` of a ``(K, P)`` parameter matrix and channel block ``k`` of every
activation: a batch of K experts' images is one ``(B, K * C, H, W)`` tensor, each conv is one grouped
convolution (``groups=K``), instance/group/batch norm and pooling are per channel anyway, and the
heads are one batched matmul. Each expert's logits depend on its own parameters and images only, so
``sum_k loss_k`` back-propagates each expert's own gradient into its row (exactly as training it alone,
up to the summation order inside the grouped kernels).

The network is the ConvNet family of :mod:`datm_fast.models` (every norm, activation and pooling);
for K = 1 this computes what :func:`datm_fast.models.convnet_forward` computes.

Speed (CPU, CIFAR ConvNet, batch 256): the convolutions are not the only bottleneck. The memory-bound
instance norm, ReLU and pooling around them took 60% of a training step in eager PyTorch (aten's
``native_group_norm_backward`` alone 26%, each op one pass over a 134 MB activation). A
:class:`FusedBlock` computes norm -> ReLU -> 2x2 average pool (the default ConvNet's block) as one
autograd function: on CPU with the compiled operators of ``datm_fast._C`` (``block_forward`` and
``block_backward`` of ``csrc/block_cpu.cpp``: one pass per channels_last sample, the kernels the
unroll engine uses too), elsewhere with ``torch.compile``-generated kernels. Both equal the aten ops
to float rounding (tested).
"""

from __future__ import annotations

import types
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import ConvNetSpec

__all__ = [
    "ParamSlices",
    "param_slices",
    "FusedBlock",
    "CompiledBlock",
    "CpuBlock",
    "make_fused_block",
    "batched_logits",
    "stack_inputs",
    "fused_supported",
]

NORM_EPS = 1e-5  # every upstream norm layer uses PyTorch's default eps
LEAKY_SLOPE = 0.01
GROUPNORM_GROUPS = 4


class ParamSlices(NamedTuple):
    """``(offset, shape)`` of every parameter in the flat vector, in ``parameters()`` order."""

    offsets: tuple[int, ...]
    shapes: tuple[torch.Size, ...]


def param_slices(spec: ConvNetSpec) -> ParamSlices:
    """Where each parameter of ``spec`` lives in its flat vector."""
    offsets, shapes, off = [], [], 0
    for _, shape in spec.param_shapes():
        offsets.append(off)
        shapes.append(shape)
        off += shape.numel()
    return ParamSlices(tuple(offsets), tuple(shapes))


def _rows(params: Tensor, sl: ParamSlices, i: int) -> Tensor:
    """Parameter ``i`` of every expert: ``(K, *shape)`` (a view of ``params``)."""
    off, shape = sl.offsets[i], sl.shapes[i]
    return params[:, off : off + shape.numel()].view(params.shape[0], *shape)


# ----- the fused norm -> ReLU -> avg-pool block ----------------------------------------------------------------
def _block_forward(h: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Instance norm (affine) -> ReLU -> 2x2 avg pool of ``h`` ``(B, C, H, W)``; returns ``(out, mean, rstd)``.

    ``mean``/``rstd`` are ``(B, C, 1, 1)``, ``out`` is ``(B, C, H // 2, W // 2)``; ``H``, ``W`` even.
    """
    var, mean = torch.var_mean(h, dim=(2, 3), correction=0, keepdim=True)
    rstd = torch.rsqrt(var + NORM_EPS)
    a = gamma.view(1, -1, 1, 1) * rstd
    b = beta.view(1, -1, 1, 1) - mean * a
    out = F.avg_pool2d(torch.relu(h * a + b), 2, 2)
    return out, mean, rstd


def _block_backward(
    g: Tensor, h: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dh, dgamma, dbeta)`` of :func:`_block_forward`'s ``out`` given ``g = dL/dout``.

    With ``xhat = (h - mean) * rstd`` and ``gz`` the gradient reaching the norm's output (the pooling
    gradient ``g / 4`` spread over each 2x2 window, zero where the ReLU was off), the instance norm
    backward per (sample, channel) is ``dh = gamma * rstd * (gz - mean_hw(gz) - xhat * mean_hw(gz * xhat))``.
    """
    _, _, hh, ww = h.shape
    a = gamma.view(1, -1, 1, 1) * rstd
    b = beta.view(1, -1, 1, 1) - mean * a
    gup = g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) * 0.25
    gz = torch.where(h * a + b > 0, gup, 0.0)
    xhat = (h - mean) * rstd
    s1 = gz.sum(dim=(2, 3), keepdim=True)
    s2 = (gz * xhat).sum(dim=(2, 3), keepdim=True)
    n = hh * ww
    dh = a * (gz - s1 / n - xhat * (s2 / n))
    return dh, s2.sum(dim=(0, 2, 3)), s1.sum(dim=(0, 2, 3))


class FusedBlock:
    """Instance norm -> ReLU -> 2x2 average pool as one autograd function with hand-fused kernels.

    Subclasses provide ``forward(h, gamma, beta) -> (out, *saved)`` and
    ``backward(g, h, *saved) -> (dh, dgamma, dbeta)`` (``h`` ``(B, C, H, W)``, ``gamma``/``beta``
    ``(C,)``, ``out`` and ``g`` ``(B, C, H // 2, W // 2)``); calling the block gives ``out``,
    differentiable in ``h``, ``gamma`` and ``beta`` (once: no double backward, which expert
    training never needs). Build one per trainer with :func:`make_fused_block`.
    """

    name = "fused"

    def forward(self, h: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def backward(self, g: Tensor, h: Tensor, *saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        return _FusedBlockFn.apply(h, gamma, beta, self)


class CompiledBlock(FusedBlock):
    """The block's forward and backward compiled by ``torch.compile`` (Triton on CUDA, C++ on CPU).

    Dynamo keeps compiled code, and its limit of 8 recompilations, per code object; each instance
    compiles its own copies of the two functions so that several trainers in one process (other
    layouts, other group sizes) never exhaust a shared limit. The batch dimension is marked dynamic,
    so the last, smaller batch of an epoch and evaluation batches reuse the kernels of their layer.
    Compiled code is cached on disk by PyTorch, so a later run mostly loads it.
    """

    name = "torch.compile"

    def __init__(self) -> None:
        # Static shapes except the batch dimension (marked dynamic per call): kernels specialised to each
        # layer's (C, H, W).
        self._forward: Callable[..., tuple[Tensor, Tensor, Tensor]] = torch.compile(
            _own_copy(_block_forward), dynamic=False
        )
        self._backward: Callable[..., tuple[Tensor, Tensor, Tensor]] = torch.compile(
            _own_copy(_block_backward), dynamic=False
        )

    def forward(self, h: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
        torch._dynamo.maybe_mark_dynamic(h, 0)
        out, mean, rstd = self._forward(h, gamma, beta)
        return out, mean, rstd, gamma, beta

    def backward(self, g: Tensor, h: Tensor, *saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, rstd, gamma, beta = saved
        for t in (g, h, mean, rstd):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return self._backward(g, h, mean, rstd, gamma, beta)


class CpuBlock(FusedBlock):
    """The block as the C++ operators of ``datm_fast._C`` (``torch.ops.datm_fast.block_forward`` /
    ``block_backward``), on channels_last activations: one pass per sample (a CIFAR sample's first-layer
    activation, 512 KB, stays in L2), where aten makes about 10 passes over the whole batch."""

    name = "cpp"

    def forward(self, h: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
        h = h.contiguous(memory_format=torch.channels_last)
        gamma, beta = gamma.detach(), beta.detach()
        out, mean, rstd = torch.ops.datm_fast.block_forward(h, gamma, beta, NORM_EPS)
        return out, mean, rstd, gamma, beta

    def backward(self, g: Tensor, h: Tensor, *saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, rstd, gamma, beta = saved
        g = g.contiguous(memory_format=torch.channels_last)
        h = h.contiguous(memory_format=torch.channels_last)
        dh, sum_gn, sum_gn_xhat = torch.ops.datm_fast.block_backward(g, h, gamma, beta, mean, rstd)
        return dh, sum_gn_xhat.sum(0), sum_gn.sum(0)


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (see :class:`CompiledBlock`)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _FusedBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, gamma: Tensor, beta: Tensor, block: FusedBlock) -> Tensor:  # type: ignore[override]
        out, *saved = block.forward(h, gamma, beta)
        ctx.save_for_backward(h, *saved)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, *saved = ctx.saved_tensors
        fmt = torch.channels_last if h.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        dh, dgamma, dbeta = ctx.block.backward(g.contiguous(memory_format=fmt), h, *saved)
        return dh, dgamma, dbeta, None


def fused_supported(spec: ConvNetSpec) -> bool:
    """Whether ``spec`` has the block the fused kernels implement at every layer."""
    if (spec.norm, spec.activation, spec.pooling) != ("instance", "relu", "avg"):
        return False
    return all(layer.conv_shape[1] % 2 == 0 and layer.conv_shape[2] % 2 == 0 for layer in spec.layers)


def _works(block: FusedBlock, device: torch.device) -> FusedBlock:
    """Run ``block`` once on a tiny input against aten (raises if it fails or disagrees)."""
    h = torch.randn(2, 4, 4, 4, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.linspace(0.5, 1.5, 4, device=device, requires_grad=True)
    beta = torch.linspace(-0.1, 0.1, 4, device=device, requires_grad=True)
    out = block(h, gamma, beta)
    ref = F.avg_pool2d(F.relu(F.group_norm(h, 4, gamma, beta, eps=NORM_EPS)), 2, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.autograd.grad(out.sum(), (h, gamma, beta))
    want = torch.autograd.grad(ref.sum(), (h, gamma, beta))
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    return block


def make_fused_block(device: torch.device, kind: str = "auto") -> FusedBlock | None:
    """The fastest working fused block for ``device``, or ``None`` (with a warning) when none works.

    ``kind``: ``"cpp"`` (CPU only), ``"compile"`` or ``"auto"`` (CPU: C++ kernels, falling back to
    ``torch.compile``; CUDA: ``torch.compile``). Each candidate is checked against aten on a tiny input.
    """
    device = torch.device(device)
    if kind not in ("auto", "cpp", "compile"):
        raise ValueError(f"make_fused_block: kind must be 'auto', 'cpp' or 'compile', got {kind!r}")
    candidates = []
    if device.type == "cpu" and kind in ("auto", "cpp"):
        candidates.append("cpp")
    if kind in ("auto", "compile"):
        candidates.append("compile")
    errors = []
    for c in candidates:
        try:
            if c == "cpp":
                from .._ext import extension_status

                status = extension_status()
                if not status.loaded:
                    errors.append(f"cpp: datm_fast._C is not loaded ({status.error})")
                    continue
                return _works(CpuBlock(), device)
            return _works(CompiledBlock(), device)
        except Exception as e:  # noqa: BLE001 - any failure of a compiler stack means: try the next one
            errors.append(f"{c}: {type(e).__name__}: {str(e)[:200]}")
    warnings.warn(
        f"no fused norm/ReLU/pool kernels on {device} ({'; '.join(errors) or 'none available'}); "
        "training with eager PyTorch ops (slower, same results)",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


# ----- the network ----------------------------------------------------------------------------------------------
def stack_inputs(x: Tensor, channels_last: bool) -> Tensor:
    """``(K, B, C, H, W)`` per-expert images -> ``(B, K * C, H, W)``, channel block ``k`` = expert ``k``."""
    k, b, c, h, w = x.shape
    if channels_last:
        # (B, H, W, K, C) contiguous is exactly the channels_last storage of (B, K*C, H, W).
        return x.permute(1, 3, 4, 0, 2).contiguous().view(b, h, w, k * c).permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(b, k * c, h, w)


def _norm(spec: ConvNetSpec, h: Tensor, k: int, gamma: Tensor, beta: Tensor) -> Tensor:
    """Norm of ``h`` ``(B, K*C, H, W)`` with per-expert affine ``gamma``, ``beta`` ``(K, *shape)``."""
    if spec.norm == "instance":
        return F.group_norm(h, h.shape[1], gamma.reshape(-1), beta.reshape(-1), eps=NORM_EPS)
    if spec.norm == "group":
        return F.group_norm(h, k * GROUPNORM_GROUPS, gamma.reshape(-1), beta.reshape(-1), eps=NORM_EPS)
    if spec.norm == "batch":
        return F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True, eps=NORM_EPS)
    # layer norm over each expert's (C, H, W)
    b, kc, hh, ww = h.shape
    h5 = h.reshape(b, k, kc // k, hh, ww)
    out = F.layer_norm(h5, h5.shape[2:], eps=NORM_EPS) * gamma + beta
    return out.reshape(b, kc, hh, ww)


def _act(spec: ConvNetSpec, h: Tensor) -> Tensor:
    if spec.activation == "relu":
        return F.relu(h)
    if spec.activation == "leakyrelu":
        return F.leaky_relu(h, LEAKY_SLOPE)
    return torch.sigmoid(h)


def _pool(spec: ConvNetSpec, h: Tensor) -> Tensor:
    if spec.pooling == "avg":
        return F.avg_pool2d(h, kernel_size=2, stride=2)
    if spec.pooling == "max":
        return F.max_pool2d(h, kernel_size=2, stride=2)
    return h


def batched_logits(
    spec: ConvNetSpec,
    params: Tensor,
    x: Tensor,
    *,
    shared_input: bool = False,
    block: FusedBlock | None = None,
    slices: ParamSlices | None = None,
) -> Tensor:
    """Logits of K experts: ``(K, B, num_classes)``.

    Args:
        spec: the architecture of every expert.
        params: ``(K, spec.num_params)`` flat parameters, one row per expert.
        x: with ``shared_input=False``, ``(B, K * C, H, W)`` (see :func:`stack_inputs`): expert ``k``
            sees channels ``k*C:(k+1)*C``. With ``shared_input=True``, ``(B, C, H, W)`` images that every
            expert sees (evaluation); the first conv is then one ordinary conv with K*width filters.
        block: fused norm/ReLU/pool kernels (used when ``fused_supported(spec)``), or None for aten ops.
        slices: ``param_slices(spec)``, to skip recomputing it.

    Equivalent PyTorch code::

        torch.stack([convnet_forward(spec, params[k], x_k) for k in range(K)])
    """
    sl = slices if slices is not None else param_slices(spec)
    k = params.shape[0]
    use_block = block is not None and fused_supported(spec)
    h = x
    i = 0
    for d, layer in enumerate(spec.layers):
        w = _rows(params, sl, i).reshape(k * spec.width, *sl.shapes[i][1:])
        bias = _rows(params, sl, i + 1).reshape(-1)
        groups = 1 if (d == 0 and shared_input) else k
        h = F.conv2d(h, w, bias, padding=layer.padding, groups=groups)
        i += 2
        if use_block:
            h = block(h, _rows(params, sl, i).reshape(-1), _rows(params, sl, i + 1).reshape(-1))  # type: ignore[misc]
            i += 2
            continue
        if spec.norm != "none":
            h = _norm(spec, h, k, _rows(params, sl, i), _rows(params, sl, i + 1))
            i += 2
        h = _pool(spec, _act(spec, h))
    b = h.shape[0]
    feats = h.reshape(b, k, spec.num_features).transpose(0, 1)  # (K, B, F) in each expert's (C, H, W) order
    weight = _rows(params, sl, i)  # (K, classes, F)
    bias = _rows(params, sl, i + 1)  # (K, classes)
    return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))
