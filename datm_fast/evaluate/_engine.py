"""The engines that train and test evaluation networks, one group of runs at a time.

Two engines compute the same protocol (:class:`~datm_fast.evaluate.EvalConfig`):

* **functional** (every network without buffers or dropout: the ConvNet family except batch norm,
  AlexNet, VGG11, ResNet18, LeNet, MLP): the ``k`` runs of a group keep their parameters stacked,
  one ``(k, *shape)`` tensor per parameter; the forward is the network's own module run through
  ``torch.func.functional_call``, under ``torch.func.vmap`` over the runs when ``k > 1`` (so ``k``
  convolutions become one grouped convolution); SGD is PyTorch's foreach arithmetic on the lists.
  Each run keeps its own initial parameters, batch order and DSA draws (its own generators), so a
  group of ``k`` gives the runs that ``k`` groups of one give, up to float rounding.
* **module** (batch-norm networks, whose test pass must use running statistics): one ``nn.Module``
  and one ``torch.optim.SGD`` per run, as upstream.

With the same seeds both engines give the same runs (the functional engine with ``k == 1`` matches
the module engine to the last bit on CPU in our tests). Parameters are kept per tensor rather than as
one flat vector fed to :func:`datm_fast.models.convnet_forward`: the flat vector's backward builds one
zero-filled vector of all parameters per parameter tensor (14 per ConvNet step) and sums them,
measured 10-25% slower per CPU epoch at IPC 10 and never faster.

``EvalConfig.graphs="on"`` computes each batch's losses and gradients in the functional engine as a
static step (:mod:`datm_fast.step_graphs`): one CUDA graph per batch shape, replayed at every step of a
group, with DSA and the SGD update left eager around it.

Everything stays on the device: the set, the test split, batch order (``randperm`` with a device
generator) and DSA values; the DSA op group is drawn from a CPU generator, so no step waits for the
device. The host reads results once per group, at the end.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..augment import DSAParams, apply_dsa, sample_dsa_params
from ..models import get_network
from ..precision import Precision, forward_autocast, precision_scope
from ..step_graphs import StepGraphs
from .config import EvalConfig
from .losses import train_loss

__all__ = ["RunRNG", "TrainSet", "make_run_rngs", "stackable", "train_and_test"]


class RunRNG(NamedTuple):
    """The generators of one evaluation run."""

    init: torch.Generator  # CPU: initial parameters (the same bits as a module built after manual_seed)
    data: torch.Generator  # on the device: batch order and DSA values
    host: torch.Generator  # CPU: the DSA op group (mode 'S'), read on the host without a device sync


def make_run_rngs(generator: torch.Generator, runs: int, device: torch.device) -> list[RunRNG]:
    """``runs`` independent sets of generators, seeded from three draws each of ``generator``."""
    seeds = torch.randint(0, 2**62, (runs, 3), generator=generator, device=generator.device).tolist()
    return [
        RunRNG(
            torch.Generator().manual_seed(a),
            torch.Generator(device=device).manual_seed(b),
            torch.Generator().manual_seed(c),
        )
        for a, b, c in seeds
    ]


@dataclass(frozen=True, eq=False)
class TrainSet:
    """A training set on the device, shared by all runs or one per run.

    ``images``: ``(n, C, H, W)`` float32 (shared) or ``(R, n, C, H, W)`` (``per_run``).
    ``targets``: ``(n,)`` int64 class indices or ``(n, K)`` float32 probabilities (softmax of logit
    labels), with the same leading ``R`` when ``per_run``.
    """

    images: Tensor
    targets: Tensor
    per_run: bool = False

    @property
    def n(self) -> int:
        """Images per run."""
        return int(self.images.shape[-4])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[-3:]
        return int(c), int(h), int(w)

    def runs_slice(self, lo: int, hi: int) -> TrainSet:
        """The set(s) of runs ``lo:hi`` (the same object when shared)."""
        if not self.per_run:
            return self
        return replace(self, images=self.images[lo:hi], targets=self.targets[lo:hi])

    def select_runs(self, runs: Sequence[int]) -> TrainSet:
        """The sets of ``runs`` (run indices, in that order): this rank's share of per-run sets; the same
        object when shared."""
        if not self.per_run:
            return self
        index = torch.as_tensor(list(runs), dtype=torch.int64, device=self.images.device)
        return replace(self, images=self.images[index], targets=self.targets[index.to(self.targets.device)])

    def to(self, device: torch.device) -> TrainSet:
        """On ``device``, images float32 (the same object when already there)."""
        images = self.images.to(device, torch.float32)
        targets = self.targets.to(device)
        if images is self.images and targets is self.targets:
            return self
        return replace(self, images=images, targets=targets)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(k, b, C, H, W)`` and targets ``(k, b[, K])`` at indices ``idx`` ``(k, b)`` (one row per run)."""
        if not self.per_run:
            return self.images[idx], self.targets[idx]
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        return self.images[rows, idx], self.targets[rows, idx]


def _build(model: str, num_classes: int, shape: tuple[int, int, int], generator: torch.Generator | None) -> nn.Module:
    c, h, w = shape
    return get_network(model, c, num_classes, (h, w), generator=generator)


def _is_stackable(net: nn.Module) -> bool:
    has_buffers = any(True for _ in net.buffers())  # batch norm's running statistics
    has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
    return not has_buffers and not has_dropout


def stackable(model: str, num_classes: int, shape: tuple[int, int, int]) -> bool:
    """Whether the functional engine can train ``model`` on ``(C, H, W)`` images: it has no buffers
    (batch norm tests with running statistics, which vmap cannot update) and no dropout."""
    with torch.device("meta"):  # no storage, no random draws
        return _is_stackable(_build(model, num_classes, shape, None))


# ----- DSA for a group of runs ------------------------------------------------------------------
def _cat_params(ps: Sequence[DSAParams]) -> DSAParams:
    if len(ps) == 1:
        return ps[0]
    first = ps[0]
    tensors = {name: torch.cat([p.tensors()[name] for p in ps]) for name in first.tensors()}
    return replace(first, batch_size=sum(p.batch_size for p in ps), **tensors)


def _dsa_runs(xb: Tensor, params: Sequence[DSAParams]) -> Tensor:
    """Apply each run's DSA draw to its batch: ``xb`` ``(k, b, C, H, W)`` -> same shape.

    Runs that drew the same op group are augmented in one call (``apply_dsa`` gives every sample the
    same bits whatever the batch, so this equals one call per run). No index tensors are built, so
    nothing is copied from the host.
    """
    k, b = xb.shape[:2]
    if k == 1:
        return apply_dsa(xb[0], params[0]).unsqueeze(0)
    groups: dict[tuple[str, ...], list[int]] = {}
    for j, p in enumerate(params):
        groups.setdefault(p.groups, []).append(j)
    if len(groups) == 1:
        return apply_dsa(xb.reshape(k * b, *xb.shape[2:]), _cat_params(params)).view_as(xb)
    pieces: list[Tensor] = [xb[0]] * k
    for js in groups.values():
        x_g = xb[js[0]] if len(js) == 1 else torch.cat([xb[j] for j in js])
        y_g = apply_dsa(x_g, _cat_params([params[j] for j in js]))
        for i, j in enumerate(js):
            pieces[j] = y_g[i * b : (i + 1) * b]
    return torch.stack(pieces)


def _draw_dsa(
    config: EvalConfig, rngs: Sequence[RunRNG], b: int, h: int, w: int, device: torch.device
) -> list[DSAParams]:
    assert config.dsa is not None
    return [
        sample_dsa_params(config.dsa, b, h, w, generator=r.data, host_generator=r.host, device=device) for r in rngs
    ]


# ----- the functional engine ---------------------------------------------------------------------
LossFn = Callable[[list[Tensor], Tensor, Tensor], Tensor]


class _Stack(NamedTuple):
    base: nn.Module  # the architecture on the meta device: functional_call supplies the parameters
    names: list[str]  # parameter names in parameters() order
    params: list[Tensor]  # per parameter (k, *shape), or (*shape) when k == 1; leaves requiring grad


def _stack(
    model: str, num_classes: int, shape: tuple[int, int, int], rngs: Sequence[RunRNG], device: torch.device
) -> _Stack:
    """Initialise each run as the module engine does (same generator, same bits) and stack them."""
    nets = [_build(model, num_classes, shape, r.init) for r in rngs]
    names = [n for n, _ in nets[0].named_parameters()]
    per_run = [[p.detach() for p in net.parameters()] for net in nets]
    if len(nets) == 1:
        params = [p.to(device) for p in per_run[0]]
    else:
        params = [torch.stack(ps).to(device) for ps in zip(*per_run)]
    with torch.device("meta"):
        base = _build(model, num_classes, shape, None)
    return _Stack(base, names, [p.contiguous().requires_grad_(True) for p in params])


def _forward_fn(st: _Stack, k: int) -> Callable[[list[Tensor], Tensor], Tensor]:
    """``(params, x) -> logits``; with ``k > 1``, params are stacked and ``x`` is ``(k, b, ...)``."""

    def one(params: Sequence[Tensor], x: Tensor) -> Tensor:
        return functional_call(st.base, dict(zip(st.names, params)), (x,))

    return one if k == 1 else torch.func.vmap(one)


def _group_loss_fn(st: _Stack, k: int, compile: bool) -> LossFn:
    """``(params, images (k, b, C, H, W), targets (k, b[, K])) -> losses (k,)``."""
    forward = _forward_fn(st, 1)

    def one(params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return train_loss(forward(params, x), y)

    if k == 1:

        def fn(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
            return one(params, x[0], y[0]).unsqueeze(0)

    else:
        fn = torch.func.vmap(one)
    return _compiled_or_eager(fn) if compile else fn


def _compiled_or_eager(fn: LossFn) -> LossFn:
    """``torch.compile(fn)``, falling back to ``fn`` (with a warning) if compiling fails, e.g. without
    a C++ compiler. ``dynamic=False``: a full and a last partial batch compile to two graphs."""
    compiled = torch.compile(fn, dynamic=False)
    use: list[LossFn] = [compiled]

    def call(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
        if use[0] is compiled:
            try:
                return compiled(params, x, y)
            except Exception as e:  # any compiler failure; a real error would recur in eager below
                warnings.warn(
                    f"torch.compile of the evaluation step failed ({type(e).__name__}: {e}); training eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                use[0] = fn
        return use[0](params, x, y)

    return call


@torch.no_grad()
def _test_stack(st: _Stack, k: int, test_x: Tensor, test_y: Tensor, batch: int) -> Tensor:
    """Correct test predictions per run, ``(k,)`` int64 on the device."""
    one = _forward_fn(st, 1)
    if k == 1:
        fwd: Callable[[list[Tensor], Tensor], Tensor] = lambda p, x: one(p, x).unsqueeze(0)
    else:
        fwd = torch.func.vmap(one, in_dims=(0, None))
    st.base.eval()
    correct = torch.zeros(k, dtype=torch.int64, device=test_x.device)
    for s in range(0, test_x.shape[0], batch):
        out = fwd(st.params, test_x[s : s + batch])  # (k, b, K)
        correct += (out.argmax(-1) == test_y[s : s + batch]).sum(-1)
    return correct


def _losses_and_grads(
    loss_fn: LossFn, params: list[Tensor], x: Tensor, y: Tensor, precision: Precision, device_type: str
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The runs' mean losses ``(k,)`` on one batch and their gradients: the step that ``graphs="on"``
    captures. It changes nothing (the SGD update is the caller's), so a capture's warm-up calls leave
    the runs where they were."""
    with forward_autocast(precision, device_type):
        losses = loss_fn(params, x, y)
    return losses.detach(), torch.autograd.grad(losses.sum(), params)


def _train_stack(
    st: _Stack,
    data: TrainSet,
    lr: float,
    config: EvalConfig,
    rngs: Sequence[RunRNG],
    device: torch.device,
    tick: Callable[[int], None],
) -> Tensor:
    """Train the ``k = len(rngs)`` runs of ``st`` in place; returns the last pass's mean losses ``(k,)``.

    ``config.graphs == "on"``: each batch's losses and gradients are a static step (a CUDA graph on a GPU,
    one per batch shape; the same function on its buffers elsewhere), reading the augmented batch from
    buffers and the parameters from their own storage, which the update changes in place.
    """
    k, n, bs = len(rngs), data.n, config.batch_size
    _, h, w = data.image_shape
    params = st.params
    bufs = [torch.zeros_like(p, requires_grad=False) for p in params]
    steps = config.num_passes * -(-n // bs)
    loss_fn = _group_loss_fn(st, k, config.should_compile(device.type, steps))
    loss_sum = torch.zeros(k, dtype=torch.float32, device=device)
    graphs = StepGraphs() if config.graphs == "on" else None  # this group's: its steps read these parameters

    def build() -> Callable[..., tuple[Tensor, tuple[Tensor, ...]]]:
        return lambda x, y: _losses_and_grads(loss_fn, params, x, y, config.precision, device.type)

    st.base.train()
    for ep in range(config.num_passes):
        lr_ep = config.lr_at(ep, lr)
        if config.resets_momentum(ep):
            torch._foreach_zero_(bufs)  # upstream builds a new SGD optimiser here: the momentum starts again
        perms = torch.stack([torch.randperm(n, generator=r.data, device=device) for r in rngs])
        loss_sum.zero_()
        for s in range(0, n, bs):
            idx = perms[:, s : s + bs]
            xb, yb = data.batch(idx)
            b = idx.shape[1]
            if config.dsa is not None:
                xb = _dsa_runs(xb, _draw_dsa(config, rngs, b, h, w, device))
            if graphs is None:
                losses, grads = _losses_and_grads(loss_fn, params, xb, yb, config.precision, device.type)
            else:
                step = graphs.step(("train", tuple(xb.shape), yb.dtype), None, build, {"x": xb, "y": yb})
                losses, grads = step(x=xb, y=yb)  # a graph's own outputs: used before the next call
            with torch.no_grad():
                # torch.optim.SGD's arithmetic, op for op (dampening 0, no Nesterov), so the engines agree.
                decayed = torch._foreach_add(grads, params, alpha=config.weight_decay)
                torch._foreach_mul_(bufs, config.momentum)
                torch._foreach_add_(bufs, decayed)
                torch._foreach_add_(params, bufs, alpha=-lr_ep)
                loss_sum.add_(losses, alpha=b)
        tick(k)
    return loss_sum / n


# ----- the module engine ------------------------------------------------------------------------
def _train_test_module(
    model: str,
    num_classes: int,
    data: TrainSet,
    lr: float,
    config: EvalConfig,
    rng: RunRNG,
    test_x: Tensor,
    test_y: Tensor,
    device: torch.device,
    tick: Callable[[int], None],
) -> tuple[Tensor, Tensor]:
    """Train and test one run with an ``nn.Module``; returns (correct count, last-pass loss), 0-d tensors."""
    _, h, w = data.image_shape
    net = _build(model, num_classes, data.image_shape, rng.init).to(device)
    n, bs = data.n, config.batch_size
    opt: torch.optim.SGD | None = None
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for ep in range(config.num_passes):
        if config.resets_momentum(ep):
            opt = torch.optim.SGD(
                net.parameters(), lr=config.lr_at(ep, lr), momentum=config.momentum, weight_decay=config.weight_decay
            )
        assert opt is not None
        net.train()
        perm = torch.randperm(n, generator=rng.data, device=device)
        loss_sum.zero_()
        for s in range(0, n, bs):
            idx = perm[s : s + bs].unsqueeze(0)
            xb, yb = data.batch(idx)
            if config.dsa is not None:
                xb = _dsa_runs(xb, _draw_dsa(config, [rng], idx.shape[1], h, w, device))
            with forward_autocast(config.precision, device.type):
                loss = train_loss(net(xb[0]), yb[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum.add_(loss.detach(), alpha=idx.shape[1])
        tick(1)
    net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for s in range(0, test_x.shape[0], config.test_batch_size):
            correct += (
                net(test_x[s : s + config.test_batch_size]).argmax(-1) == test_y[s : s + config.test_batch_size]
            ).sum()
    return correct, loss_sum / n


# ----- groups -----------------------------------------------------------------------------------
def _bytes_per_run(model: str, num_classes: int, shape: tuple[int, int, int], batch: int) -> int:
    """A generous estimate of one run's training memory in the functional engine (float32 activations).

    Runs one forward on the meta device (no memory, no compute) and counts every layer's output:
    each is kept for the backward, gets a gradient of its size, and DSA adds a few copies of the input.
    """
    total = 0

    def count(_m: nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    with torch.device("meta"):
        net = _build(model, num_classes, shape, None)
        hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
        net(torch.empty(batch, *shape))
        for hk in hooks:
            hk.remove()
        n_params = sum(p.numel() for p in net.parameters())
    image = batch * shape[0] * shape[1] * shape[2]
    return 4 * (3 * total + 6 * image + 4 * n_params)


def parallel_runs(
    config: EvalConfig, model: str, num_classes: int, shape: tuple[int, int, int], device: torch.device
) -> int:
    """How many runs one group of the functional engine trains at once.

    ``config.parallel_runs`` when set (capped at ``runs``); else 1 on CPU, where vmap's grouped
    convolutions measured 2x slower per run than one run at a time (CIFAR ConvNet, batch 8-256, 2
    cores); on CUDA as many as fit in half the free memory.
    """
    if config.parallel_runs is not None:
        return min(config.parallel_runs, config.runs)
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(config.runs, int(0.5 * free) // _bytes_per_run(model, num_classes, shape, config.batch_size)))


class GroupResult(NamedTuple):
    correct: list[int]  # per run, test images classified right
    losses: list[float]  # per run, mean training loss of the last pass
    seconds: float


def train_and_test(
    model: str,
    num_classes: int,
    data: TrainSet,
    lr: float,
    test_x: Tensor,
    test_y: Tensor,
    config: EvalConfig,
    rngs: Sequence[RunRNG],
    device: torch.device,
    tick: Callable[[int], None],
) -> GroupResult:
    """Train ``len(rngs)`` runs (in groups as :func:`parallel_runs` says) and count correct test predictions.

    ``data.per_run`` sets must have one set per run, in ``rngs`` order.
    """
    with precision_scope(config.precision):
        return _train_and_test(model, num_classes, data, lr, test_x, test_y, config, rngs, device, tick)


def _train_and_test(model, num_classes, data, lr, test_x, test_y, config, rngs, device, tick) -> GroupResult:
    start = time.perf_counter()
    shape = data.image_shape
    functional = config.engine != "module" and stackable(model, num_classes, shape)
    if config.engine == "functional" and not functional:
        raise ValueError(
            f"EvalConfig.engine='functional' needs a network without batch norm or dropout, got model {model!r}; "
            "use engine='auto' or 'module'"
        )
    correct: list[Tensor] = []
    losses: list[Tensor] = []
    if not functional and config.graphs == "on":
        warnings.warn(
            f"EvalConfig.graphs='on' applies to the functional engine; {model} trains in the module engine "
            "(batch norm or dropout), eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
    if not functional:
        for r, rng in enumerate(rngs):
            cor, loss = _train_test_module(
                model, num_classes, data.runs_slice(r, r + 1), lr, config, rng, test_x, test_y, device, tick
            )
            correct.append(cor.reshape(1))
            losses.append(loss.reshape(1))
    else:
        k = parallel_runs(config, model, num_classes, shape, device)
        for lo in range(0, len(rngs), k):
            hi = min(lo + k, len(rngs))
            st = _stack(model, num_classes, shape, rngs[lo:hi], device)
            losses.append(_train_stack(st, data.runs_slice(lo, hi), lr, config, rngs[lo:hi], device, tick))
            correct.append(_test_stack(st, hi - lo, test_x, test_y, config.test_batch_size))
    return GroupResult(
        [int(v) for v in torch.cat(correct).tolist()],
        [float(v) for v in torch.cat(losses).tolist()],
        time.perf_counter() - start,
    )
