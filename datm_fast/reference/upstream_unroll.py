"""Upstream DATM's two inner loops and its DiffAugment, re-stated: the baseline timed beside our engines.

A re-statement of upstream's code (NUS-HPC-AI-Lab/DATM, which inherits MTT's and FTD's), not a library
path: its only jobs are to be timed in the same run as ``datm_fast``'s engines (``datm-fast bench
--engines "exact;upstream-full;upstream-tesla"``, ``benchmarks/bench_evaluate.py``) and to show, in
float64, which function each of our engines computes (``tests/test_unroll.py``). It keeps upstream's
order of operations, its host synchronisations (``.item()``), its global-RNG draws and its
allocations, because those are part of what the timings measure. Only the ``nn.Module`` plumbing is
replaced: upstream runs the student through ``ReparamModule(get_network(...))`` with
``flat_param=``, which splits the flat vector into views of the parameters' shapes and runs the
module; :func:`datm_fast.models.convnet_forward` does exactly that with PyTorch's ops.

``distill/DATM.py`` (:func:`upstream_full_iteration`)::

    student_params = [theta_0.requires_grad_(True)]
    for step in range(syn_steps):
        x, this_y = syn_images[idx], y_hat[idx]             # the step's chunk of a randperm
        if dsa: x = DiffAugment(x, dsa_strategy, param=dsa_param)
        ce = sum(-log_softmax(net(x, flat_param=student_params[-1])) * softmax(this_y)) / batch
        grad = autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    loss = (mse_sum(theta_N, theta*) / num_params) / (mse_sum(theta_0, theta*) / num_params)
    loss.backward()

``distill/DATM_tesla.py`` (:func:`upstream_tesla_iteration`): the same roll-out with each step's
gradient detached (``theta_{i+1} = theta_i - syn_lr.item() * g_i``, ``G = sum g_i``), then per step a
second forward/backward at ``theta_i`` on the *same augmented batch* and
``grad(2 (lr (theta* - theta_0) + lr^2 G) . g_i / ||theta_0 - theta*||^2, (x_i, y_i))`` into that
step's images and labels only; ``syn_lr``'s gradient is that of ``||theta_0 - lr G - theta*||^2 / ...``
with ``G`` a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import ConvNetSpec, convnet_forward

__all__ = [
    "DSA_STRATEGY",
    "ParamDiffAug",
    "diff_augment",
    "soft_cross_entropy_upstream",
    "upstream_minibatches",
    "upstream_full_iteration",
    "upstream_tesla_iteration",
]

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # DATM's dsa_strategy in every config


# ----- DiffAugment (MTT/DATM utils: ParamDiffAug, set_seed_DiffAug, DiffAugment, rand_*) --------------------
class ParamDiffAug:
    """Upstream's ``ParamDiffAug``: the DSA ranges, and the seed state :func:`diff_augment` keeps in it."""

    def __init__(self) -> None:
        self.aug_mode = "S"  # one op group per call
        self.prob_flip = 0.5
        self.ratio_scale = 1.2
        self.ratio_rotate = 15.0
        self.ratio_crop_pad = 0.125
        self.ratio_cutout = 0.5
        self.ratio_noise = 0.05
        self.brightness = 1.0
        self.saturation = 2.0
        self.contrast = 0.5
        self.batchmode = False
        self.latestseed = -1


def _set_seed(param: ParamDiffAug) -> None:
    # seed -1: draw from the global RNG as it stands (every call of the inner loop); otherwise reseed
    # before each draw with consecutive seeds, so that a given seed replays the same augmentation.
    if param.latestseed == -1:
        return
    torch.random.manual_seed(param.latestseed)
    param.latestseed += 1


def _affine(x: Tensor, theta: list[list[list[Tensor | int]]], param: ParamDiffAug) -> Tensor:
    # Upstream builds the matrices in torch.float, its only dtype; x.dtype is that there and lets a
    # float64 check run through the same code.
    t = torch.tensor(theta, dtype=x.dtype)
    if param.batchmode:
        t[:] = t[0]
    grid = F.affine_grid(t, list(x.shape), align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def _rand_scale(x: Tensor, param: ParamDiffAug) -> Tensor:
    ratio = param.ratio_scale
    _set_seed(param)
    sx = torch.rand(x.shape[0]) * (ratio - 1.0 / ratio) + 1.0 / ratio  # on the host, as upstream draws them
    _set_seed(param)
    sy = torch.rand(x.shape[0]) * (ratio - 1.0 / ratio) + 1.0 / ratio
    return _affine(x, [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])], param)


def _rand_rotate(x: Tensor, param: ParamDiffAug) -> Tensor:
    _set_seed(param)
    t = (torch.rand(x.shape[0]) - 0.5) * 2 * param.ratio_rotate / 180 * math.pi
    theta = [[[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]] for i in range(x.shape[0])]
    return _affine(x, theta, param)


def _rand_flip(x: Tensor, param: ParamDiffAug) -> Tensor:
    _set_seed(param)
    randf = torch.rand(x.size(0), 1, 1, 1, device=x.device)
    if param.batchmode:
        randf[:] = randf[0]
    return torch.where(randf < param.prob_flip, x.flip(3), x)


def _rand_factor(x: Tensor, param: ParamDiffAug) -> Tensor:
    _set_seed(param)
    r = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)
    if param.batchmode:
        r[:] = r[0]
    return r


def _rand_brightness(x: Tensor, param: ParamDiffAug) -> Tensor:
    return x + (_rand_factor(x, param) - 0.5) * param.brightness


def _rand_saturation(x: Tensor, param: ParamDiffAug) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand_factor(x, param) * param.saturation) + mean


def _rand_contrast(x: Tensor, param: ParamDiffAug) -> Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand_factor(x, param) + param.contrast) + mean


def _rand_shift(x: Tensor, param: ParamDiffAug, low: tuple[int, int], high: tuple[int, int]) -> tuple[Tensor, Tensor]:
    _set_seed(param)
    dx = torch.randint(low[0], high[0], size=[x.size(0), 1, 1], device=x.device)
    _set_seed(param)
    dy = torch.randint(low[1], high[1], size=[x.size(0), 1, 1], device=x.device)
    if param.batchmode:
        dx[:] = dx[0]
        dy[:] = dy[0]
    return dx, dy


def _grid(x: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    ranges = (torch.arange(n, dtype=torch.long, device=x.device) for n in (x.size(0), rows, cols))
    gb, gx, gy = torch.meshgrid(*ranges, indexing="ij")
    return gb, gx, gy


def _rand_crop(x: Tensor, param: ParamDiffAug) -> Tensor:
    sx, sy = int(x.size(2) * param.ratio_crop_pad + 0.5), int(x.size(3) * param.ratio_crop_pad + 0.5)
    tx, ty = _rand_shift(x, param, (-sx, -sy), (sx + 1, sy + 1))
    gb, gx, gy = _grid(x, x.size(2), x.size(3))
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    xp = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _rand_cutout(x: Tensor, param: ParamDiffAug) -> Tensor:
    cs = int(x.size(2) * param.ratio_cutout + 0.5), int(x.size(3) * param.ratio_cutout + 0.5)
    ox, oy = _rand_shift(x, param, (0, 0), (x.size(2) + (1 - cs[0] % 2), x.size(3) + (1 - cs[1] % 2)))
    gb, gx, gy = _grid(x, cs[0], cs[1])
    gx = torch.clamp(gx + ox - cs[0] // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cs[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


_AUGMENT_FNS: dict[str, tuple[Callable[[Tensor, ParamDiffAug], Tensor], ...]] = {
    "color": (_rand_brightness, _rand_saturation, _rand_contrast),
    "crop": (_rand_crop,),
    "cutout": (_rand_cutout,),
    "flip": (_rand_flip,),
    "scale": (_rand_scale,),
    "rotate": (_rand_rotate,),
}


def diff_augment(x: Tensor, strategy: str = "", seed: int = -1, param: ParamDiffAug | None = None) -> Tensor:
    """Upstream's ``DiffAugment(x, strategy, seed, param)``: ``x`` ``(B, C, H, W)`` augmented.

    ``seed == -1`` (what the inner loops and ``evaluate_synset`` pass): every sample gets its own values,
    drawn from the global RNG; the group choice of mode ``'S'`` is read on the host (``.item()``, a
    sync) and scale and rotate build their matrices on the host, sample by sample. Another seed: one
    value for the whole batch (``batchmode``), the global RNG reseeded with ``seed, seed + 1, ...``
    before each draw. ``param`` is mutated (its seed state), as upstream's is.
    """
    param = param if param is not None else ParamDiffAug()
    param.batchmode = seed != -1
    param.latestseed = seed
    if strategy in ("None", "none") or not strategy:
        return x
    if param.aug_mode == "M":
        for p in strategy.split("_"):
            for f in _AUGMENT_FNS[p]:
                x = f(x, param)
    elif param.aug_mode == "S":
        groups = strategy.split("_")
        _set_seed(param)
        p = groups[int(torch.randint(0, len(groups), size=(1,)).item())]
        for f in _AUGMENT_FNS[p]:
            x = f(x, param)
    else:
        raise ValueError(f"diff_augment: unknown aug_mode {param.aug_mode!r}")
    return x.contiguous()


# ----- the inner loops (distill/DATM.py, distill/DATM_tesla.py) -----------------------------------------------
def soft_cross_entropy_upstream(inputs: Tensor, target: Tensor) -> Tensor:
    """DATM's ``SoftCrossEntropy``: ``sum(-log_softmax(inputs) * softmax(target)) / batch``; ``target``
    are label logits (``y_hat``), not probabilities."""
    return torch.sum(torch.mul(-F.log_softmax(inputs, dim=1), F.softmax(target, dim=1))) / inputs.shape[0]


def upstream_minibatches(num_images: int, syn_steps: int, batch_syn: int) -> list[Tensor]:
    """Upstream's minibatches: chunks of ``batch_syn`` of a ``torch.randperm`` (global RNG, on the host)
    popped from the end, a new permutation when they run out. Drawn up front here; upstream draws
    them between the steps (the same chunks, interleaved differently with DiffAugment's draws)."""
    chunks: list[Tensor] = []
    out = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(num_images), batch_syn))
        out.append(chunks.pop())
    return out


def _check_leaves(name: str, images: Tensor, labels: Tensor, lr: Tensor) -> None:
    for what, t in (("images", images), ("labels", labels), ("lr", lr)):
        if not (t.is_leaf and t.requires_grad):
            raise ValueError(f"{name}: {what} must be a leaf tensor that requires grad (its .grad is written)")


def _augment(x: Tensor, augment: bool, strategy: str, param: ParamDiffAug) -> Tensor:
    # `if args.dsa and (not args.no_aug)`, with upstream's per-sample draws (seed -1).
    return diff_augment(x, strategy, param=param) if augment else x


def upstream_full_iteration(
    spec: ConvNetSpec,
    start: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    indices: Sequence[Tensor],
    *,
    augment: bool = False,
    strategy: str = DSA_STRATEGY,
) -> Tensor:
    """One iteration of upstream's ``distill/DATM.py`` loop: the full unroll and its ``backward``.

    Args:
        spec: the student ConvNet (upstream: ``ReparamModule(get_network(model, ...))``).
        start: (P,) theta_0; target: (P,) theta* (no gradient).
        images: (M, C, H, W) ``image_syn``; labels: (M, K) ``label_syn`` logits; lr: 0-dim ``syn_lr``.
            Leaf tensors that require grad: their ``.grad`` is overwritten, as upstream's
            ``zero_grad(); backward()`` leaves it.
        indices: one index tensor per inner step (``syn_steps = len(indices)``), e.g. the ``indices``
            of an :class:`~datm_fast.distill.UnrollPlan`'s steps or :func:`upstream_minibatches`.
        augment: apply :func:`diff_augment` (``strategy``, per-sample, global RNG) at every step.

    Returns:
        The detached loss ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``. Upstream divides the
        numerator and the denominator by ``num_params`` first (``param_loss /= num_params; param_dist
        /= num_params``): the factor cancels, leaving one rounding of each quotient (about 1e-16 in
        float64); it changes neither the loss nor the gradient beyond that.
    """
    _check_leaves("upstream_full_iteration", images, labels, lr)
    param = ParamDiffAug()
    num_params = spec.num_params
    student_params = [start.detach().clone().requires_grad_(True)]
    starting_params = start.detach()
    target_params = target.detach()
    for these_indices in indices:
        x = images[these_indices]
        this_y = labels[these_indices]
        x = _augment(x, augment, strategy, param)
        out = convnet_forward(spec, student_params[-1], x)
        ce_loss = soft_cross_entropy_upstream(out, this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - lr * grad)
    # Upstream's accumulators are torch.tensor(0.0): its default dtype, which is its parameters' dtype
    # (float32); taking the parameters' dtype keeps a float64 check in float64.
    param_loss = torch.zeros((), dtype=start.dtype, device=start.device)
    param_dist = torch.zeros((), dtype=start.dtype, device=start.device)
    param_loss += F.mse_loss(student_params[-1], target_params, reduction="sum")
    param_dist += F.mse_loss(starting_params, target_params, reduction="sum")
    param_loss /= num_params
    param_dist /= num_params
    param_loss /= param_dist
    grand_loss = param_loss
    for t in (images, labels, lr):
        t.grad = None  # optimizer_*.zero_grad()
    grand_loss.backward()
    return grand_loss.detach()


def upstream_tesla_iteration(
    spec: ConvNetSpec,
    start: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    indices: Sequence[Tensor],
    *,
    augment: bool = False,
    strategy: str = DSA_STRATEGY,
) -> Tensor:
    """One iteration of upstream's ``distill/DATM_tesla.py`` loop: two passes, gradients written to ``.grad``.

    Arguments as :func:`upstream_full_iteration`. The first pass rolls out with each step's gradient
    detached and summed into ``G`` (keeping each step's augmented batch, ``x_list``); the second
    recomputes each step's gradient ``g_i`` at ``theta_i`` on that batch and takes the images' and
    labels' gradients of ``2 (lr (theta* - theta_0) + lr^2 G) . g_i / ||theta_0 - theta*||^2`` alone,
    i.e. ``dL/dtheta_N`` held fixed and every dependence of ``theta_i`` on earlier batches and on
    ``lr`` dropped. ``lr``'s gradient is that of ``||theta_0 - lr G - theta*||^2 / ...`` with ``G``
    constant. Returns that (detached) loss, which equals the full unroll's to rounding.
    """
    _check_leaves("upstream_tesla_iteration", images, labels, lr)
    param = ParamDiffAug()
    starting_params = start.detach()
    target_params = target.detach()
    param_dist = F.mse_loss(starting_params, target_params, reduction="sum")
    syn_image_gradients = torch.zeros(images.shape, dtype=images.dtype, device=images.device)
    syn_label_gradients = torch.zeros(labels.shape, dtype=labels.dtype, device=labels.device)
    x_list: list[Tensor] = []
    original_x_list: list[Tensor] = []
    y_list: list[Tensor] = []
    original_y_list: list[Tensor] = []
    student_params = [start.detach().clone().requires_grad_(True)]
    gradient_sum = torch.zeros(student_params[-1].shape, dtype=start.dtype, device=start.device)
    indices_chunks_copy: list[Tensor] = []
    for these_indices in indices:
        indices_chunks_copy.append(these_indices)
        x = images[these_indices]
        this_y = labels[these_indices]
        original_x_list.append(x)
        original_y_list.append(this_y)
        x = _augment(x, augment, strategy, param)
        # Kept with their graph back to images/labels (through DiffAugment): the second pass reuses
        # this very augmentation.
        x_list.append(x.clone())
        y_list.append(this_y.clone())
        forward_params = student_params[-1]
        out = convnet_forward(spec, forward_params, x)
        ce_loss = soft_cross_entropy_upstream(out, this_y)
        grad = torch.autograd.grad(ce_loss, forward_params, create_graph=True, retain_graph=True)[0]
        detached_grad = grad.detach().clone()
        student_params.append(student_params[-1] - lr.item() * detached_grad)
        gradient_sum += detached_grad
        del grad

    for i in range(len(indices)):
        w_i = student_params[i]
        output_i = convnet_forward(spec, w_i, x_list[i])
        ce_loss_i = soft_cross_entropy_upstream(output_i, y_list[i])
        grad_i = torch.autograd.grad(ce_loss_i, w_i, create_graph=True, retain_graph=True)[0]
        single_term = lr.item() * (target_params - starting_params)
        square_term = (lr.item() ** 2) * gradient_sum
        total_term = 2 * (single_term + square_term) @ grad_i / param_dist
        gradients_x, gradients_y = torch.autograd.grad(total_term, [original_x_list[i], original_y_list[i]])
        with torch.no_grad():
            syn_image_gradients[indices_chunks_copy[i]] += gradients_x
            syn_label_gradients[indices_chunks_copy[i]] += gradients_y

    images.grad = syn_image_gradients
    labels.grad = syn_label_gradients
    grand_loss = starting_params - lr * gradient_sum - target_params
    grand_loss = grand_loss.dot(grand_loss) / param_dist
    (lr_grad,) = torch.autograd.grad(grand_loss, lr)
    lr.grad = lr_grad
    return grand_loss.detach()
