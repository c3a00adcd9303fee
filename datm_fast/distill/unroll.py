"""The unrolled inner loop of DATM and its three gradient engines.

DATM's outer loss for one iteration is

    L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2,
    theta_{i+1} = theta_i - lr * grad_theta l(theta_i; A_i(X[B_i]), Y[B_i]),

where ``l`` is the soft cross-entropy of the ConvNet's logits against ``softmax(Y)`` (mean over the
step's batch), ``A_i`` the step's DSA augmentation and ``B_i`` its minibatch. The gradient of ``L``
with respect to the synthetic images ``X``, the label logits ``Y`` and the learned ``lr`` is what
the outer optimiser needs. Three engines compute it:

``full``
    Autograd through the whole unroll (``create_graph=True`` at every step), as upstream DATM does.
    The reference. Its memory grows with ``syn_steps x batch_syn``: every step's activations, and
    the graph of their gradient, stay alive until ``backward``.
``exact``
    The same gradient, to floating-point tolerance, with memory that grows with neither: the forward
    pass keeps only ``theta_i`` of every step (``syn_steps x P`` floats; the minibatch indices and DSA
    draws of the step are in the :class:`UnrollPlan`), and the reverse pass recomputes step ``i`` and
    carries the adjoint ``lam_{i+1} = dL/dtheta_{i+1}`` back through it with one double-backward per
    micro-batch::

        g      = grad_theta l(theta_i, X_b, Y_b)                    (create_graph)
        dot    = <g, lam_{i+1}>
        H lam, d dot/dX_b, d dot/dY_b = grad(dot, (theta_i, X_b, Y_b))
        lam_i  = lam_{i+1} - lr * H lam
        dL/dX_b += -lr * d dot/dX_b,   dL/dY_b += -lr * d dot/dY_b,   dL/dlr += -dot

    ``dot`` is formed without the convolution weight gradients: ``<grad_W l, lam_W> = <grad_y l, conv(x,
    lam_W)>`` for a convolution ``y = conv(x, W)`` (see ``_gradient_dot``), which saves one of the
    nine convolutions each layer after the first costs in this step. For the fused instance-norm
    ConvNet the step (and the roll-out's) is written out kernel by kernel, without an autograd graph
    (``datm_fast.distill.explicit_step``); other architectures run it through autograd.

    A step's batch is split into micro-batches (samples are independent under instance norm, so the
    gradient is a sum over micro-batches); only one micro-batch's graph lives at a time. With batch
    norm, whose statistics span the batch, the micro-batch is the whole batch. ``micro_batch=None``
    (:func:`choose_micro_batch`) depends on the device: on CPU the most images whose step graph fits
    in 256 MiB (32 for the CIFAR ConvNet, so a batch of 100 runs as 4 x 25); on CUDA the whole step
    batch when its graph fits in a quarter of the memory free when the unroll starts, else the most
    images that do (a GPU runs small chunks launch-bound: the whole batch is 4-7x faster on an H200).
    Given a ``memory_budget`` that the full graph fits in, ``exact`` runs the ``full`` engine (same
    gradient; faster at small IPC on CPU, never on an H200: see ``EngineOptions.memory_budget_gb``).
``tesla``
    The approximation of upstream's ``DATM_tesla.py`` (Cui et al., TESLA, ICML 2023): every step's
    gradient is treated as independent of the earlier steps, so the adjoint stays ``lam_N`` and no
    Hessian-vector product is taken. **Not the exact gradient**: it drops every dependence of
    ``theta_i`` on earlier batches. For comparison only.

All three consume the same :class:`UnrollPlan`, so given one plan they differentiate the very same
function.

On several ranks (``distributed``, a :class:`~datm_fast.distributed.Distributed` with more than one
rank), ``exact`` and ``tesla`` share every step's micro-batches out round robin
(``distributed.mine``): each step is split into a multiple of ``world_size`` micro-batches (finer than
``micro_batch`` where it must be, so that every rank has work), each rank computes its own, and one
all-reduce per step sums the student's gradient in the roll-out and, in ``exact``'s reverse pass, the
Hessian-vector product; the image, label and lr gradients are summed once per backward (one
all-reduce of the three, flattened into one buffer). Every rank must be given the same plan (or
generators in the same state) and the same inputs; every rank then holds the same ``theta_i``, loss
and gradients, bit for bit (an all-reduce hands every rank the same sum). The sum over micro-batches
runs in another order than on one rank, so the gradient equals the single-process one to rounding
(float64: relative difference < 1e-12, tests/test_distributed_distill.py). ``full`` has no shared work
and is refused on several ranks. Batch norm cannot split a step: rank 0 then computes it whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import DSAConfig, DSAParams, apply_dsa, sample_dsa_params
from ..backends import Backend
from ..distributed import Distributed
from ..models import ConvNetSpec, convnet_apply, flatten_params, unflatten_params
from ..ops import conv2d, matching_loss, soft_cross_entropy
from ..precision import Precision, forward_autocast, precision_scope
from ..step_graphs import StaticStep, StepGraphs
from .explicit_step import gradient, reverse_step
from .settings import Section, above, at_least, setting

__all__ = [
    "EngineOptions",
    "Unroll",
    "StepPlan",
    "UnrollPlan",
    "make_unroll_plan",
    "trajectory_matching_loss",
    "estimate_full_unroll_bytes",
    "least_unroll_bytes",
    "auto_micro_batch",
    "choose_micro_batch",
    "derive_host_generator",
]

Unroll = Literal["exact", "full", "tesla"]
UNROLLS: tuple[str, ...] = get_args(Unroll)


def _placement(default: Any, *, help: str, check: Any = None, flag: bool = True) -> Any:
    """An engine option that changes how the gradient is computed, not what it is (placement)."""
    return setting(default, own=True, placement=True, flag=flag, check=check, help=help)


@dataclass(frozen=True)
class EngineOptions(Section):
    """How the gradient of one unroll is computed: the ``engine`` section of :class:`DistillConfig`.

    Passed whole from the config to :func:`trajectory_matching_loss`: a new option is a field here and
    its use in the engine (the config key, its check, a ``datm-fast distill --flag`` and the report
    follow from the field). Every option but ``unroll="tesla"`` and ``precision`` leaves the gradient as
    it is, to float rounding: they say how the work is done (``placement``), not what is computed.
    """

    unroll: Unroll = setting(
        "exact",
        own=True,
        flag=True,
        help="exact: the full gradient in constant memory; full: autograd through the whole unroll (the "
        "reference); tesla: upstream's TESLA approximation",
    )
    backend: Backend = _placement("auto", help="op backend (datm_fast.backend_info()); auto: the fastest")
    fused: bool = _placement(
        True,
        flag=False,
        help="run each instance norm -> ReLU -> avg pool block as the fused op (datm_fast.ops.norm_relu_pool) and "
        "the convolutions as datm_fast.ops.conv2d; false: PyTorch's ops",
    )
    micro_batch: int | None = _placement(
        None,
        check=at_least(1),
        help="most images per forward/backward chunk of an inner step (exact, tesla); null: auto (CPU: a step "
        "graph <= 256 MiB; CUDA: the whole step batch where its graph fits in 1/4 of the free memory)",
    )
    # None: never switch. On a GPU the full engine is never the faster one (H200, torch 2.11+cu130,
    # 2026-12-04, CIFAR-10, 80 steps, seconds per iteration / peak allocated): IPC 1 full 0.81 s / 1.69 GB
    # against exact 0.56 s; IPC 10 full 0.91 s / 14.5 GB against exact 0.45 s / 0.53 GB (whole batch).
    memory_budget_gb: float | None = _placement(
        None,
        check=above(0),
        help="GiB; exact runs the full-graph engine where its estimate fits (same gradient); null: never",
    )
    graphs: Literal["off", "on"] = _placement(
        "off",
        help="on: run each written-out inner step (exact, tesla; the fused-block ConvNets in float32 or tf32) on "
        "static buffers and, on a GPU, capture it once per run as a CUDA graph and replay it; off: launch every "
        "kernel (not yet measured on a GPU: off)",
    )
    # Not a placement: bfloat16 changes the gradient by far more than rounding (tests/test_precision.py
    # measures it against float64), so a run does not resume under another precision.
    precision: Precision = setting(
        "float32",
        own=True,
        flag=True,
        help="the student's arithmetic (datm_fast.precision): float32 (IEEE, TF32 off), tf32 (TF32 convolutions "
        "and matmuls on GPUs), bfloat16 (autocast forward, backward and Hessian-vector products)",
    )
    step: Literal["auto", "autograd"] = _placement(
        "auto",
        help="auto: exact's steps written out kernel by kernel where the network allows (the fused "
        "instance-norm ConvNet), else through autograd; autograd: always through autograd",
    )

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget_gb`` in bytes (GiB = 2**30)."""
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 2**30)


# ----- the plan: every random choice of one unroll, drawn before any arithmetic -------------------------
@dataclass(frozen=True)
class StepPlan:
    """What one inner step reads: which synthetic images, and the DSA draws to apply to them."""

    indices: Tensor  # (B,) int64 indices into the synthetic set
    augment: DSAParams | None  # DSA params for exactly these B images, or None without DSA


@dataclass(frozen=True)
class UnrollPlan:
    """The minibatches and augmentations of ``syn_steps`` inner steps.

    Drawing them up front makes every engine differentiate the same function and lets the exact
    engine replay step ``i`` bit for bit in its reverse pass.
    """

    steps: tuple[StepPlan, ...]
    num_images: int

    def __len__(self) -> int:
        return len(self.steps)


def derive_host_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from ``generator``'s current state, for the draws a GPU stream must not make.

    DSA's op group is drawn on the host (reading a device draw back would stall the GPU). With a GPU
    ``generator`` and no host generator given, :func:`make_unroll_plan` draws it from this one, so the
    plan stays a pure function of ``generator``'s state: the same state gives the same host
    generator, and a generator that has drawn since (the previous plan advanced it) gives another.

    The seed is a keyed hash of ``generator.get_state()`` (a CUDA generator's seed and Philox offset,
    kept on the host: reading it neither draws nor synchronises), so ``generator`` is not advanced and
    its own draws stay what they are with an explicit host generator; the Mersenne Twister seeded by
    the hash shares no values with the device stream.
    """
    state = generator.get_state()
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8, person=b"datm_fast.host").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def make_unroll_plan(
    num_images: int,
    syn_steps: int,
    batch_syn: int,
    *,
    image_size: tuple[int, int],
    augment: DSAConfig | None,
    generator: torch.Generator,
    host_generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> UnrollPlan:
    """Draw the minibatches and DSA params of one unroll, as upstream DATM does.

    Upstream takes a fresh ``randperm`` of the synthetic set, splits it into chunks of ``batch_syn``
    and *pops chunks from the end* (so when ``batch_syn`` does not divide the set, the short chunk is
    used first); a new permutation is drawn when the chunks run out.

    Args:
        num_images: size of the synthetic set.
        syn_steps: number of inner SGD steps.
        batch_syn: minibatch size (``>= num_images`` means the whole set every step).
        image_size: ``(H, W)`` of the images (for the DSA draws).
        augment: DSA settings, or None for no augmentation.
        generator: draws the permutations and the per-sample DSA values (on its device).
        host_generator: CPU generator for the DSA op-group choice when ``generator`` is on a GPU.
            Default: ``generator`` itself when it is a CPU generator, else
            :func:`derive_host_generator` of it (taken once, before the plan's first draw).
        device: where the indices and DSA tensors live (default: the generator's device).
    """
    if num_images < 1 or syn_steps < 1 or batch_syn < 1:
        raise ValueError(
            "make_unroll_plan: need num_images, syn_steps and batch_syn >= 1, got "
            f"{num_images}, {syn_steps}, {batch_syn}"
        )
    device = torch.device(device) if device is not None else generator.device
    if host_generator is None and generator.device.type != "cpu":
        host_generator = derive_host_generator(generator)
    height, width = image_size
    chunks: list[Tensor] = []
    steps = []
    for _ in range(syn_steps):
        if not chunks:
            perm = torch.randperm(num_images, generator=generator, device=generator.device)
            chunks = list(torch.split(perm, batch_syn))
        indices = chunks.pop().to(device)
        params = None
        if augment is not None and augment.groups:
            params = sample_dsa_params(
                augment,
                int(indices.numel()),
                height,
                width,
                generator=generator,
                host_generator=host_generator,
                device=device,
            )
        steps.append(StepPlan(indices, params))
    return UnrollPlan(tuple(steps), num_images)


# ----- the inner loss ---------------------------------------------------------------------------------
def _step_loss(
    spec: ConvNetSpec,
    params: Tensor,
    images: Tensor,
    labels: Tensor,
    augment: DSAParams | None,
    batch_size: int,
    kernels: _Kernels,
) -> Tensor:
    # The flat vector as views, for the full engine whose unroll differentiates through theta itself.
    return _leaf_step_loss(spec, unflatten_params(spec, params), images, labels, augment, batch_size, kernels)


def _in_layout(parts: list[Tensor], channels_last: bool) -> list[Tensor]:
    """The conv weights among ``parts`` in the activations' memory format, the rest as they are.

    oneDNN converts an NCHW weight to the channels_last input's format at every convolution call (a
    copy of up to 590 KB): 19 calls per layer and step at IPC 1, 3.9% of the iteration in a profile
    (2026-12-03). Converting once per step, and handing the Hessian-vector product's direction in the
    same format, removes them.
    """
    if not channels_last:
        return parts
    return [p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p for p in parts]


def _leaves(spec: ConvNetSpec, theta: Tensor, channels_last: bool = False) -> list[Tensor]:
    """theta as separate leaf tensors, one per parameter (views of it, no copy, except conv weights
    converted to channels_last); see convnet_apply."""
    parts = _in_layout([p.detach() for p in unflatten_params(spec, theta)], channels_last)
    return [p.requires_grad_(True) for p in parts]


@dataclass(frozen=True)
class _Kernels:
    """Which kernels the student network runs: the fused norm/ReLU/pool op or PyTorch's, and on what."""

    fused: bool
    backend: str  # of the fused block op: auto / torch / cpp / cuda / triton
    channels_last: bool  # run the student on channels_last activations
    explicit: bool  # write the steps out where the network allows (EngineOptions.step "auto")
    precision: Precision = "float32"
    device_type: str = "cpu"

    def written_out(self, spec: ConvNetSpec) -> bool:
        """Whether the steps run written out kernel by kernel (``explicit_step``): the fused blocks, in
        float32 or TF32 (bfloat16 runs through autograd, whose graph autocast casts)."""
        return self.explicit and self.fused and spec.norm_relu_pool_blocks and self.precision != "bfloat16"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Around the student's forward passes only (see :func:`datm_fast.precision.forward_autocast`)."""
        return forward_autocast(self.precision, self.device_type)


def _kernels(options: EngineOptions, device: torch.device) -> _Kernels:
    # One backend for both ops: "triton" runs the Triton block kernels too (an explicit choice, as
    # backend="triton" is everywhere; auto keeps the compiled ones).
    block_backend = options.backend
    # On CPU, oneDNN's convolutions are faster on channels_last activations, and the C++ block kernels
    # take them as they are. Measured 2026-12-03 (2 threads, exact engine, runs interleaved): CIFAR-10
    # IPC 10 at 8 steps 6.12 s against 6.63 s in NCHW with the fused kernels (8.5 against 10.1-10.7 s
    # with PyTorch's ops); IPC 1 at 80 steps 6.3-7.2 s against 6.9-7.6 s. The CUDA kernels are NCHW.
    return _Kernels(
        options.fused,
        block_backend,
        device.type == "cpu",
        explicit=options.step == "auto",
        precision=options.precision,
        device_type=device.type,
    )


class _ConvTap(NamedTuple):
    """A convolution of the student's forward pass, kept for :func:`_gradient_dot`."""

    x: Tensor  # its input
    y: Tensor  # its output
    weight: int  # index of its weight in the parameter list (the bias is spec.layer_params' conv_bias)
    bias: int
    padding: int


def _leaf_step_loss(
    spec: ConvNetSpec,
    leaves: list[Tensor],
    images: Tensor,
    labels: Tensor,
    augment: DSAParams | None,
    batch_size: int,
    kernels: _Kernels,
    taps: list[_ConvTap] | None = None,
) -> Tensor:
    x = images if augment is None else apply_dsa(images, augment)
    if kernels.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels.autocast():
        logits = _student_logits(spec, leaves, x, kernels, taps)
    # The loss in the set's dtype: under bfloat16 autocast the logits are bfloat16.
    return soft_cross_entropy(logits.to(labels.dtype), labels, reduction="sum") / batch_size


def _student_logits(
    spec: ConvNetSpec, leaves: list[Tensor], x: Tensor, kernels: _Kernels, taps: list[_ConvTap] | None
) -> Tensor:
    conv = conv2d if kernels.fused else F.conv2d
    if taps is not None:
        layers = iter(spec.layer_params)

        def tapped_conv(h: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
            where = next(layers)
            y = conv(h, weight, bias, padding=padding)
            taps.append(_ConvTap(h, y, where.conv_weight, where.conv_bias, padding))
            return y

        logits = convnet_apply(spec, leaves, x, fused=kernels.fused, backend=kernels.backend, conv=tapped_conv)
    else:
        logits = convnet_apply(spec, leaves, x, fused=kernels.fused, backend=kernels.backend)
    return logits


# The conv-output identity of _gradient_dot pays where a convolution's reduction is long: it trades
# the weight-gradient convolution (2 x C_in x kH x kW FLOP per output element) for about six
# elementwise passes over the conv output (the product, its sum and its two derivatives). For the
# first layer (3 x 3 x 3 = 27) the passes cost more than the convolution they replace (interleaved,
# CIFAR-10 IPC 10 at 4 steps, 2026-12-04: see benchmarks/NOTES.md section 5, item 7).
_TAP_MIN_REDUCTION = 64


def _gradient_dot(
    loss: Tensor,
    taps: list[_ConvTap],
    leaves: list[Tensor],
    lam_parts: list[Tensor],
    kernels: _Kernels,
    min_reduction: int | None = None,
) -> Tensor:
    """``<grad_theta loss, lam>`` as a differentiable scalar, mostly without the conv weight gradients.

    A convolution's weight and bias gradients are linear in its output gradient ``gy``:
    ``<grad_W, lam_W> + <grad_b, lam_b> = <gy, conv(x, lam_W) + lam_b>`` (the weight gradient is the
    adjoint of the convolution in its weight). Differentiating ``loss`` to the conv outputs instead of
    the conv weights, and taking the dot through that identity, drops the weight-gradient
    convolution from the graph, and its derivative in ``gy`` is the value ``conv(x, lam_W) + lam_b``
    already computed: 8 convolutions per layer and reverse step instead of 9. Applied to the
    convolutions whose reduction ``C_in x kH x kW`` is at least ``min_reduction``; the others keep
    their weight gradients (default ``_TAP_MIN_REDUCTION``).
    """
    min_reduction = _TAP_MIN_REDUCTION if min_reduction is None else min_reduction
    tapped = [t for t in taps if leaves[t.weight][0].numel() >= min_reduction]
    conv_params = {j for t in tapped for j in (t.weight, t.bias)}
    others = [j for j in range(len(leaves)) if j not in conv_params]
    wrt = [t.y for t in tapped] + [leaves[j] for j in others]
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    # The same op the forward used: with the fused kernels its double backward is the fast one.
    conv = conv2d if kernels.fused else F.conv2d
    # Elementwise, so the direction reaching each weight's double backward keeps its format.
    dot = sum((g * lam_parts[j]).sum() for g, j in zip(grads[len(tapped) :], others))
    for t, gy in zip(tapped, grads[: len(tapped)]):
        with kernels.autocast():  # in the forward's precision: it is that convolution in direction lam
            lam_y = conv(t.x, lam_parts[t.weight], lam_parts[t.bias], padding=t.padding)
        dot = dot + (gy * lam_y).sum()
    return dot


def _micro_batches(
    spec: ConvNetSpec, batch_size: int, micro_batch: int | None, dtype: torch.dtype, ranks: int = 1
) -> list[slice]:
    """A step's batch as micro-batches of at most ``micro_batch`` images; for ``ranks`` > 1 ranks, a
    multiple of ``ranks`` of them (as many as there are images at most) of sizes within one image of
    each other, so that each rank's round-robin share (:meth:`Distributed.mine`) is as large as the
    others' to within one image per micro-batch: a batch of 7 under a limit of 2 on 2 ranks is
    2 + 2 + 2 + 1 (4 and 3 images), a batch of 4 under a limit of 3 is 2 + 2 (the limit alone would
    leave the second rank idle)."""
    # Batch norm normalises with statistics over the whole batch: it cannot be split.
    if spec.norm == "batch":
        return [slice(0, batch_size)]
    limit = auto_micro_batch(spec, dtype) if micro_batch is None else micro_batch
    chunks = -(-batch_size // limit)
    if ranks > 1:
        chunks = min(batch_size, -(-chunks // ranks) * ranks)
        small, large = divmod(batch_size, chunks)
        bounds = [0]
        for k in range(chunks):
            bounds.append(bounds[-1] + small + (k < large))
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    if limit >= batch_size:
        return [slice(0, batch_size)]
    # Equal chunks (100 images under a limit of 32: 4 x 25, not 32 + 32 + 32 + 4).
    size = -(-batch_size // chunks)
    return [slice(s, min(s + size, batch_size)) for s in range(0, batch_size, size)]


def _shares(
    spec: ConvNetSpec,
    batch_size: int,
    micro_batch: int | None,
    dtype: torch.dtype,
    distributed: Distributed | None,
) -> list[slice]:
    """This rank's micro-batches of a step: all of them on one rank (``distributed`` None)."""
    if distributed is None:
        return _micro_batches(spec, batch_size, micro_batch, dtype)
    return distributed.mine(_micro_batches(spec, batch_size, micro_batch, dtype, distributed.world_size))


# ----- memory estimate for the budget switch ------------------------------------------------------------
def _graph_bytes_per_sample(spec: ConvNetSpec, dtype: torch.dtype) -> int:
    """A conservative bound on what one sample's double-differentiable graph of one step holds.

    About 12 tensors the size of each block's conv output (conv input/output, norm statistics and
    output, activation, pooling, and the same again for the create_graph backward); measured on CPU
    for ConvNet-3 width 128 at 32 px: 3.1 MB per sample-step (0.31 GB per step at batch 100, float32),
    which this bound (12 x 128 x (32*32 + 16*16 + 8*8) x 4 B = 8.3 MB) covers with margin.
    """
    per_sample = sum(c * h * w for c, h, w in (layer.conv_shape for layer in spec.layers))
    return 12 * per_sample * torch.empty((), dtype=dtype).element_size()


# The graph of one micro-batch of the exact and tesla engines on CPU, at most (by the bound above):
# 256 MiB. ConvNet-3 width 128 at 32 px gets 32 images, so CIFAR-10 IPC 10 (batch 100) runs as 4 x 25
# and peaks at 0.79 GB on CPU, where the whole batch peaked at 1.60 GB at the same speed (60.2 against
# 60.8 s per iteration, benchmarks/RESULTS.md); IPC 1 (batch 10) stays whole.
AUTO_MICRO_BATCH_BYTES = 256 * 2**20

# On CUDA, the share of the free memory (see _free_device_bytes) one micro-batch's graph may take by
# the bound above. A GPU runs small chunks launch-bound, so the CPU rule is slow there (H200, torch
# 2.11+cu130, 2026-12-04, CIFAR-10, 80 steps, s per iteration / peak allocated): IPC 10 (batch 100)
# 2.37 s / 0.27 GB in 4 x 25 against 0.45 s / 0.53 GB whole; IPC 50 (batch 500) 7.20 s / 0.31 GB
# against 1.09 s / 1.89 GB whole. A quarter is a margin, not a measured optimum: the bound is 1.6-2.2x
# those whole-batch peaks (0.83 and 4.1 GB), so the graph really takes a sixth of the free memory or
# less, and three quarters stay for what the bound leaves out (cuDNN workspaces, the allocator's
# rounding, the theta_i of the unroll, the expert buffer and outer optimiser, other processes on the
# GPU). On an idle H200 (139 GiB) any share above 3% keeps IPC 50 whole; a 16 GB card splits it in two.
GPU_MICRO_BATCH_SHARE = 0.25


def auto_micro_batch(spec: ConvNetSpec, dtype: torch.dtype) -> int:
    """The CPU rule of ``micro_batch=None``: the most images whose step graph fits in 256 MiB (see
    :func:`choose_micro_batch` for every device)."""
    return max(1, AUTO_MICRO_BATCH_BYTES // _graph_bytes_per_sample(spec, dtype))


def choose_micro_batch(
    spec: ConvNetSpec, batch_size: int, dtype: torch.dtype, *, device_type: str, free_bytes: int | None
) -> int:
    """The micro-batch ``micro_batch=None`` means for a step batch of ``batch_size`` images.

    * batch norm: ``batch_size`` (its statistics span the batch: it cannot be split);
    * ``device_type="cuda"`` with ``free_bytes`` known: ``batch_size`` when the step graph of the whole
      batch (``_graph_bytes_per_sample x batch_size``) fits in ``GPU_MICRO_BATCH_SHARE`` (1/4) of
      ``free_bytes``, else the most images whose graph does (at least 1);
    * otherwise (CPU, or the free memory unknown): :func:`auto_micro_batch`, the most images whose
      step graph fits in 256 MiB, or ``batch_size`` if fewer.

    The engine splits a batch larger than the result into equal chunks of at most that many images
    (100 under a limit of 32: 4 x 25). A pure function: the engine reads ``free_bytes`` once per unroll.
    """
    if batch_size < 1:
        raise ValueError(f"choose_micro_batch: batch_size must be >= 1, got {batch_size}")
    if spec.norm == "batch":
        return batch_size
    if device_type == "cuda" and free_bytes is not None:
        per_sample = _graph_bytes_per_sample(spec, dtype)
        limit = int(free_bytes * GPU_MICRO_BATCH_SHARE) // per_sample
    else:
        limit = auto_micro_batch(spec, dtype)
    return max(1, min(batch_size, limit))


def _free_device_bytes(device: torch.device) -> int | None:
    """What this process can still allocate on ``device``: CUDA's free memory plus the blocks PyTorch's
    caching allocator holds unused; None off CUDA, where nothing is read (torch.cuda is not touched).

    The cached blocks count as free: the previous iteration's graphs stay reserved after they die, and
    without them the second unroll would see less free memory than the first (by the graph the first
    chose) and might pick a smaller micro-batch, a choice that would depend on the process's history.
    """
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def estimate_full_unroll_bytes(spec: ConvNetSpec, batch_syn: int, syn_steps: int, dtype: torch.dtype) -> int:
    """A conservative estimate of the memory the ``full`` engine's graph holds at its peak: the
    per-sample step graph (see ``_graph_bytes_per_sample``) for every sample and step, plus two
    parameter vectors per step."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = _graph_bytes_per_sample(spec, dtype)
    return int(per_sample * batch_syn * syn_steps + 2 * syn_steps * spec.num_params * itemsize)


def least_unroll_bytes(spec: ConvNetSpec, batch_syn: int, syn_steps: int, unroll: Unroll, dtype: torch.dtype) -> int:
    """What one unroll holds at the least, whatever the micro-batch and the graph: the plan's minibatch
    indices (int64, ``syn_steps x batch_syn``) and the parameters of every step, once (``exact`` and
    ``tesla`` keep theta_0 .. theta_{N-1} for the reverse pass) or twice (``full``'s graph holds each
    step's parameters and their gradient). A lower bound, for refusing sizes that cannot fit (see
    :func:`estimate_full_unroll_bytes` for the full engine's peak)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_step = (2 if unroll == "full" else 1) * spec.num_params * itemsize + 8 * batch_syn
    return syn_steps * per_step


# ----- the engines ------------------------------------------------------------------------------------
def _full_unroll(
    spec: ConvNetSpec,
    start: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    plan: UnrollPlan,
    options: EngineOptions,
    kernels: _Kernels,
) -> Tensor:
    theta = start.detach().requires_grad_(True)
    params = theta
    for step in plan.steps:
        x, y = images[step.indices], labels[step.indices]
        loss = _step_loss(spec, params, x, y, step.augment, int(step.indices.numel()), kernels)
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        params = params - lr * grad
    return matching_loss(params, start.detach(), target.detach(), backend=options.backend)


# On CPU, the theta_i of one unroll (CIFAR-10, 80 steps: 102 MB) get pages of their own. The CPU
# commands run glibc with mmap off and no trimming (retain_freed_memory, a 1.1-1.6x speed-up for the
# activations), where a block this size freed at the end of one iteration is split by the small
# allocations that follow, and the next iteration's block extends the heap instead: CIFAR-10 IPC 1
# peaked at 0.52 GB against 0.42 GB with its own mapping (2026-12-04), which returns to the kernel
# when the tensor dies. Below this size the heap serves it as any tensor.
_OWN_MAPPING_BYTES = 32 << 20


def _trajectory_storage(num_steps: int, like: Tensor) -> Tensor:
    nbytes = num_steps * like.numel() * like.element_size()
    if like.device.type != "cpu" or nbytes < _OWN_MAPPING_BYTES:
        return like.new_empty((num_steps, like.numel()))
    # frombuffer keeps the mapping alive as long as the tensor (it holds a reference to it).
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=like.dtype).view(num_steps, like.numel())


def _rollout(
    spec: ConvNetSpec,
    start: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    plan: UnrollPlan,
    micro_batch: int | None,
    kernels: _Kernels,
    graphs: StepGraphs | None = None,
    distributed: Distributed | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward pass without a graph: returns ``thetas`` (N, P) holding theta_0 .. theta_{N-1}, and theta_N.

    With ``distributed`` (active), this rank computes its share of every step's micro-batches and one
    all-reduce per step sums the step's gradient (outside any static step's capture)."""
    thetas = _trajectory_storage(len(plan), start)
    theta = start.detach()
    lr_value = lr.detach()
    explicit = kernels.written_out(spec)
    for i, step in enumerate(plan.steps):
        thetas[i] = theta
        batch = int(step.indices.numel())
        grad = torch.zeros_like(theta)
        leaves = _leaves(spec, theta, kernels.channels_last)
        for mb in _shares(spec, batch, micro_batch, images.dtype, distributed):
            idx = step.indices[mb]
            aug = None if step.augment is None else step.augment[mb]
            if explicit and graphs is not None:
                grad += _static_step(
                    graphs, "rollout", spec, images, labels, batch, kernels, aug, theta=theta, indices=idx
                )
                continue
            if explicit:
                x = images[idx] if aug is None else apply_dsa(images[idx], aug)
                if kernels.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                parts = gradient(spec, [p.detach() for p in leaves], x, labels[idx], batch, backend=kernels.backend)
                grad += flatten_params(parts)
                continue
            with torch.enable_grad():
                loss = _leaf_step_loss(spec, leaves, images[idx], labels[idx], aug, batch, kernels)
                grad += flatten_params(list(torch.autograd.grad(loss, leaves)))
        if distributed is not None:
            distributed.all_reduce_sum(grad)
        theta = theta - lr_value * grad
    return thetas, theta


def _reverse_autograd(spec, leaves, lam_parts, images, labels, augment, batch, kernels, hvp, need_x, need_y):
    """One micro-batch of the reverse step through autograd: ``(H lam, d dot/dX, d dot/dY, dot)``."""
    with torch.enable_grad():
        x = images.requires_grad_(need_x)
        y = labels.requires_grad_(need_y)
        taps: list[_ConvTap] = []
        loss = _leaf_step_loss(spec, leaves, x, y, augment, batch, kernels, taps)
        dot = _gradient_dot(loss, taps, leaves, lam_parts, kernels)
        wrt = (leaves if hvp else []) + [t for t, need in ((x, need_x), (y, need_y)) if need]
        grads = list(torch.autograd.grad(dot, wrt, allow_unused=True) if wrt else [])
    step_hvp = None
    if hvp:
        step_hvp = flatten_params([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, leaves)])
        del grads[: len(leaves)]
    gx = grads.pop(0) if need_x else None
    gy = grads.pop(0) if need_y else None
    return step_hvp, gx, gy, dot.detach()


def _reverse_explicit(spec, leaves, lam_parts, images, labels, augment, batch, kernels, hvp, need_x, need_y):
    """The same as :func:`_reverse_autograd`, with the network's part written out
    (``datm_fast.distill.explicit_step``); autograd runs only DSA's adjoint."""
    x = images
    if augment is not None:
        with torch.enable_grad():
            x_in = images.requires_grad_(need_x)
            x = apply_dsa(x_in, augment)
    x_net = x.detach()
    if kernels.channels_last:
        x_net = x_net.contiguous(memory_format=torch.channels_last)
    params = [p.detach() for p in leaves]
    result = reverse_step(
        spec,
        params,
        lam_parts,
        x_net,
        labels,
        batch,
        backend=kernels.backend,
        need_hvp=hvp,
        need_inputs=need_x,
        need_labels=need_y,
    )
    gx = result.grad_inputs
    if gx is not None and augment is not None:
        (gx,) = torch.autograd.grad(x, x_in, gx)
    step_hvp = flatten_params(result.hvp) if hvp else None
    return step_hvp, gx, result.grad_labels, result.dot


def _static_step(
    graphs: StepGraphs,
    kind: str,
    spec: ConvNetSpec,
    images: Tensor,
    labels: Tensor,
    batch: int,
    kernels: _Kernels,
    aug: DSAParams | None,
    *,
    hvp: bool = False,
    need_x: bool = False,
    need_y: bool = False,
    **inputs: Tensor,
) -> Any:
    """One micro-batch of a written-out step as a :class:`StaticStep` of ``graphs``: ``"rollout"``
    (inputs ``theta``, ``indices``; returns the flat gradient) or ``"reverse"`` (inputs ``theta``,
    ``lam``, ``indices``; returns what :func:`_reverse_explicit` returns). The step's DSA draws are
    inputs too; its shape, DSA op groups and switches make the key, so a run captures each once."""
    aug_inputs = {} if aug is None else aug.tensors()
    aug_shape = None if aug is None else (aug.groups, aug.batch_size, aug.height, aug.width, aug.cutout_size)
    key = (kind, spec, kernels, batch, int(inputs["indices"].numel()), aug_shape, hvp, need_x, need_y)
    owner = (images.data_ptr(), tuple(images.shape), labels.data_ptr(), tuple(labels.shape), images.dtype)

    def build() -> Callable[..., Any]:
        def drawn(fields: dict[str, Tensor]) -> DSAParams | None:
            return None if aug is None else dataclasses.replace(aug, **fields)

        if kind == "rollout":

            def rollout(theta: Tensor, indices: Tensor, **fields: Tensor) -> Tensor:
                draws = drawn(fields)
                x = images[indices] if draws is None else apply_dsa(images[indices], draws)
                if kernels.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                params = [p.detach() for p in _leaves(spec, theta, kernels.channels_last)]
                return flatten_params(gradient(spec, params, x, labels[indices], batch, backend=kernels.backend))

            return rollout

        def reverse(theta: Tensor, lam: Tensor, indices: Tensor, **fields: Tensor) -> Any:
            leaves = _leaves(spec, theta, kernels.channels_last)
            lam_parts = _in_layout(unflatten_params(spec, lam), kernels.channels_last)
            return _reverse_explicit(
                spec,
                leaves,
                lam_parts,
                images[indices],
                labels[indices],
                drawn(fields),
                batch,
                kernels,
                hvp,
                need_x,
                need_y,
            )

        return reverse

    step: StaticStep = graphs.step(key, owner, build, {**inputs, **aug_inputs})
    return step(**inputs, **aug_inputs)


class _CheckpointedUnroll(torch.autograd.Function):
    """exact and tesla: forward rolls out without a graph, backward replays each step."""

    @staticmethod
    def forward(ctx, images, labels, lr, start, target, spec, plan, options, kernels, graphs, distributed):
        images_d, labels_d, lr_d = images.detach(), labels.detach(), lr.detach()
        thetas, theta_n = _rollout(
            spec, start, images_d, labels_d, lr_d, plan, options.micro_batch, kernels, graphs, distributed
        )
        with torch.enable_grad():
            final = theta_n.detach().requires_grad_(True)
            loss = matching_loss(final, start.detach(), target.detach(), backend=options.backend)
            (lam,) = torch.autograd.grad(loss, final)
        ctx.spec, ctx.plan, ctx.options, ctx.kernels, ctx.graphs = spec, plan, options, kernels, graphs
        ctx.distributed = distributed
        ctx.save_for_backward(images_d, labels_d, lr_d, lam, thetas)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        # The caller's backward() runs outside trajectory_matching_loss's precision scope.
        with precision_scope(ctx.options.precision):
            return _CheckpointedUnroll.reverse(ctx, grad_loss)

    @staticmethod
    def reverse(ctx, grad_loss):
        images, labels, lr, lam, thetas = ctx.saved_tensors
        spec, plan, micro_batch, unroll = ctx.spec, ctx.plan, ctx.options.micro_batch, ctx.options.unroll
        distributed: Distributed | None = ctx.distributed
        need_x, need_y, need_lr = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        lam = lam * grad_loss
        grad_images = torch.zeros_like(images)
        grad_labels = torch.zeros_like(labels)
        grad_lr = torch.zeros_like(lr)
        exact = unroll == "exact"
        reverse = _reverse_explicit if ctx.kernels.written_out(spec) else _reverse_autograd
        for i in reversed(range(len(plan))):
            step = plan.steps[i]
            batch = int(step.indices.numel())
            hvp = torch.zeros_like(lam) if exact else None
            lam_parts = _in_layout(unflatten_params(spec, lam), ctx.kernels.channels_last)
            leaves = _leaves(spec, thetas[i], ctx.kernels.channels_last)
            for mb in _shares(spec, batch, micro_batch, images.dtype, distributed):
                idx = step.indices[mb]
                aug = None if step.augment is None else step.augment[mb]
                if ctx.graphs is not None and reverse is _reverse_explicit:
                    step_hvp, gx, gy, dot = _static_step(
                        ctx.graphs,
                        "reverse",
                        spec,
                        images,
                        labels,
                        batch,
                        ctx.kernels,
                        aug,
                        hvp=exact,
                        need_x=need_x,
                        need_y=need_y,
                        theta=thetas[i],
                        lam=lam,
                        indices=idx,
                    )
                else:
                    step_hvp, gx, gy, dot = reverse(
                        spec,
                        leaves,
                        lam_parts,
                        images[idx],
                        labels[idx],
                        aug,
                        batch,
                        ctx.kernels,
                        exact,
                        need_x,
                        need_y,
                    )
                if exact:
                    hvp += step_hvp
                if need_x and gx is not None:
                    grad_images.index_add_(0, idx, -lr * gx)
                if need_y and gy is not None:
                    grad_labels.index_add_(0, idx, -lr * gy)
                if need_lr:
                    grad_lr -= dot
            if exact:
                if distributed is not None:
                    distributed.all_reduce_sum(hvp)
                lam = lam - lr * hvp
        grads = (grad_images, grad_labels, grad_lr)
        needs = (need_x, need_y, need_lr)
        if distributed is not None:
            distributed.all_reduce_sum_each([g for g, need in zip(grads, needs) if need])
        return (*(g if need else None for g, need in zip(grads, needs)), *[None] * 8)


def trajectory_matching_loss(
    spec: ConvNetSpec,
    start_params: Tensor,
    target_params: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    *,
    syn_steps: int | None = None,
    batch_syn: int | None = None,
    augment: DSAConfig | None = None,
    generator: torch.Generator | None = None,
    host_generator: torch.Generator | None = None,
    plan: UnrollPlan | None = None,
    options: EngineOptions | None = None,
    step_graphs: StepGraphs | None = None,
    distributed: Distributed | None = None,
    **option_changes: Any,
) -> Tensor:
    """DATM's matching loss of one unroll; ``loss.backward()`` fills the grads of images, labels, lr.

    Args:
        spec: the student ConvNet.
        start_params: (P,) theta_0, the expert's checkpoint at the start epoch (no gradient).
        target_params: (P,) theta*, the same expert ``expert_epochs`` later (no gradient).
        images: (M, C, H, W) synthetic images (in the training space, e.g. ZCA-whitened).
        labels: (M, K) synthetic label logits; the inner loss uses ``softmax(labels)`` as targets.
        lr: 0-dim learned inner learning rate.
        syn_steps, batch_syn, augment, generator, host_generator: draw the plan (see
            :func:`make_unroll_plan`) when ``plan`` is not given.
        plan: a pre-drawn :class:`UnrollPlan` (then the five arguments above are not needed).
        step_graphs: the static steps of the run (:class:`~datm_fast.step_graphs.StepGraphs`), kept
            across calls so that ``graphs="on"`` captures each step once per run; default: a new one per
            call (captured at every call).
        distributed: the ranks that share the unroll's work (``exact``, ``tesla``; see the module's
            docstring): every rank calls with the same arguments and gets the same loss and gradients.
            None or a world of one rank: this process alone (no collective is called). ``full`` is
            refused on several ranks, and ``memory_budget_gb`` never switches to it there.
        options: how the gradient is computed (:class:`EngineOptions`, default: its defaults), e.g. the
            config's ``engine`` section. ``option_changes`` (``unroll="full"``, ``micro_batch=25``, ...)
            replace single options:

            * ``unroll``: ``"exact"`` (default), ``"full"`` (reference) or ``"tesla"`` (approximate);
            * ``micro_batch``: split each step's batch into chunks of at most this many images in
              ``exact``/``tesla``, so that memory does not grow with ``batch_syn``; ignored with batch
              norm. None (default): :func:`choose_micro_batch`, by the device of ``images``: on CPU
              the most images whose step graph fits in 256 MiB (32 for the CIFAR ConvNet; Tiny
              ImageNet's ConvNetD4: 8); on CUDA the whole step batch when its graph fits in a
              quarter of the memory free when the unroll starts (read once), else the most images
              that fit;
            * ``memory_budget_gb``: when :func:`estimate_full_unroll_bytes` fits in it, ``exact`` runs
              the ``full`` engine instead (same gradient, less recomputation; on a GPU never faster,
              so None, the default, never switches);
            * ``backend``: of the fused ops (the distance, and the norm/ReLU/pool block);
            * ``precision``: the student's arithmetic, ``"float32"`` (IEEE), ``"tf32"`` or ``"bfloat16"``
              (:mod:`datm_fast.precision`); float64 inputs are float64 under all three;
            * ``fused``: run each instance norm -> ReLU -> 2x2 average pool block of the student as one
              fused op with fused backward and double-backward kernels
              (:func:`datm_fast.ops.norm_relu_pool`); False runs PyTorch's ops. Same gradient to
              rounding; other architectures ignore it.

    Returns:
        The 0-dim loss ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``.

    Equivalent PyTorch code (the ``full`` engine, upstream's loop)::

        theta = start_params.requires_grad_()
        for step in plan.steps:
            x = dsa(images[step.indices]); y = labels[step.indices]
            loss = -(log_softmax(net(theta, x)) * softmax(y)).sum() / len(x)
            theta = theta - lr * grad(loss, theta, create_graph=True)
        loss = ((theta - target) ** 2).sum() / ((start_params - target) ** 2).sum()
    """
    options = options if options is not None else EngineOptions()
    if option_changes:
        unknown = sorted(set(option_changes) - {f.name for f in dataclasses.fields(EngineOptions)})
        if unknown:
            raise TypeError(f"trajectory_matching_loss: unknown engine option(s) {', '.join(unknown)}")
        try:
            options = options.replace(**option_changes)
        except ValueError as exc:
            raise ValueError(f"trajectory_matching_loss: {exc}") from None
    if images.dim() != 4 or tuple(images.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"trajectory_matching_loss: images must be (M, {', '.join(map(str, spec.input_shape))}), "
            f"got {tuple(images.shape)}"
        )
    if labels.dim() != 2 or labels.shape != (images.shape[0], spec.num_classes):
        raise ValueError(
            f"trajectory_matching_loss: labels must be logits of shape ({images.shape[0]}, {spec.num_classes}), "
            f"got {tuple(labels.shape)}"
        )
    if lr.dim() != 0:
        raise ValueError(f"trajectory_matching_loss: lr must be a 0-dim tensor, got shape {tuple(lr.shape)}")
    for name, p in (("start_params", start_params), ("target_params", target_params)):
        if p.shape != (spec.num_params,):
            raise ValueError(
                f"trajectory_matching_loss: {name} must have shape ({spec.num_params},) for {spec}, "
                f"got {tuple(p.shape)}"
            )
    if plan is None:
        if syn_steps is None or batch_syn is None or generator is None:
            raise ValueError("trajectory_matching_loss: give either plan, or syn_steps, batch_syn and generator")
        plan = make_unroll_plan(
            images.shape[0],
            syn_steps,
            batch_syn,
            image_size=spec.image_size,
            augment=augment,
            generator=generator,
            host_generator=host_generator,
            device=images.device,
        )
    elif plan.num_images != images.shape[0]:
        raise ValueError(f"trajectory_matching_loss: plan is for {plan.num_images} images, got {images.shape[0]}")

    sharing = distributed if distributed is not None and distributed.active else None
    if sharing is not None and options.unroll == "full":
        raise ValueError(
            f"trajectory_matching_loss: the full engine cannot share its work over {sharing.world_size} ranks (one "
            "autograd graph through the whole unroll); use unroll exact (the same gradient) or tesla, or one rank"
        )
    budget = options.memory_budget_bytes
    if options.unroll == "exact" and budget is not None and sharing is None:
        batch = max(int(s.indices.numel()) for s in plan.steps)
        if estimate_full_unroll_bytes(spec, batch, len(plan), images.dtype) <= budget:
            options = options.replace(unroll="full")
    if options.unroll != "full" and options.micro_batch is None:
        # Resolved once per unroll, for its largest step: the same as choosing per step, since a step
        # of b images fits whole by either rule exactly when b is at most the largest step's limit.
        largest = max(int(s.indices.numel()) for s in plan.steps)
        free_bytes = _free_device_bytes(images.device)
        micro_batch = choose_micro_batch(
            spec, largest, images.dtype, device_type=images.device.type, free_bytes=free_bytes
        )
        if sharing is not None and free_bytes is not None:
            # Every rank must split the steps alike (their shares are slices of one list), and each GPU
            # has its own free memory: the smallest choice holds on every rank.
            micro_batch = min(sharing.all_gather_object(micro_batch))
        options = options.replace(micro_batch=micro_batch)
    kernels = _kernels(options, images.device)
    with precision_scope(options.precision):
        if options.unroll == "full":
            # Its backward is the caller's loss.backward(), in the caller's TF32 mode (the distill loop
            # runs it in this precision's scope too); autocast was recorded in its graph.
            return _full_unroll(spec, start_params, target_params, images, labels, lr, plan, options, kernels)
        graphs = None
        if options.graphs == "on" and kernels.written_out(spec):
            graphs = step_graphs if step_graphs is not None else StepGraphs()
        return _CheckpointedUnroll.apply(
            images, labels, lr, start_params, target_params, spec, plan, options, kernels, graphs, sharing
        )
