"""Train expert networks: several at once on one device, each exactly as if trained alone.

An expert is a ConvNet trained on the real data for E epochs (batch 256, SGD or GSAM, DSA on every
batch), whose flat parameters are kept after every epoch. :class:`ExpertTrainer` trains a *group* of
K experts in lockstep on one device:

* **Data and augmentation stay on the device.** The (preprocessed) train and test splits are moved
  there once; a step gathers each expert's batch with one index, augments it with the vectorised DSA
  of :mod:`datm_fast.augment` and never synchronises with the host (accuracy and loss are summed on
  the device and read once per epoch).
* **One forward/backward for K experts.** The K networks run as one network with grouped convolutions
  (:mod:`datm_fast.experts._batched`); the K losses are summed, so one backward gives every expert its
  own gradient. GSAM's norms and inner products are per expert.
* **Each expert has its own random streams.** Expert ``i`` of a run seeded ``s`` draws its initial
  parameters, its batch order (a new permutation per epoch) and its DSA values (including the op
  group that DSA mode 'S' picks per batch) from three CPU generators seeded from
  ``expert_seed(s, i)``. Draws are made on the CPU, so they do not depend on the device either.
  DSA params are drawn per expert; experts that drew the same op group are augmented in one call
  (DSA gives every sample the same bits whatever batch it is in), so the augmented images are bit for
  bit those of training the expert alone.

Guarantee: training experts ``ids`` in one group gives, for every expert, the trajectory of training
it alone with the same config and seed, up to float rounding (grouped convolutions sum in another
order). Tested over 3 epochs: every epoch's parameters agree to 1e-4 of the distance travelled from
the initialisation (typically 1e-6). Rounding can flip a ReLU whose input is within ~1e-7 of zero,
which changes that step's gradient by a small discrete amount; this is the same non-associativity
any change of kernel or batch layout causes, not a difference in what is computed.

Speed (2-core CPU, CIFAR ConvNet, GSAM, batch 256, DSA, 1 test image per 5 train images; see
``benchmarks/RESULTS.md``): 2.0 s per 1,000 train images per expert as ``datm-fast buffer`` runs
(2.7 s without its allocator setting; upstream: 6.9 s), about 100 s per CIFAR-10 expert-epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import DSAParams, apply_dsa, sample_dsa_params
from ..backends import Backend, check_backend
from ..data import ImageDataset
from ..models import ConvNetSpec, init_flat_params
from ..ops import resolve_block_backend
from ..precision import forward_autocast, precision_scope
from ..step_graphs import StepGraphs
from ..utils import resolve_device
from ._batched import batched_logits, stack_inputs
from .config import ExpertConfig, expert_seed, stream_seed
from .gsam import gsam_direction, gsam_perturbation, sgd_step

__all__ = ["ExpertTrainer", "TrainedExpert", "EpochReport", "default_experts_per_batch", "resolve_device"]

Device = Union[str, torch.device]


def default_experts_per_batch(device: torch.device) -> int:
    """How many experts to train at once by default on ``device``.

    CPU: 1. At batch 256 the 2 cores are saturated by one expert: two experts per group (grouped
    convolutions) took as long per expert (GSAM: 2.08 against 2.02 s per 1,000 images) for twice
    the memory. CUDA: 8, so that the small late layers (8x8 maps) and the per-step kernel
    launches are shared by 8 experts (not measured: no GPU was available when this was written;
    tune with ``experts_per_batch``).
    """
    return 8 if device.type == "cuda" else 1


@dataclass(frozen=True, eq=False)
class TrainedExpert:
    """One finished expert.

    Attributes:
        index: the expert's number in its run (its seed derives from it).
        seed: ``expert_seed(config.seed, index)``.
        trajectory: ``(E + 1, P)`` float32 CPU tensor; row ``e`` = parameters after ``e`` epochs
            (row 0 = initialisation), in upstream ``parameters()`` order.
        train_loss, train_acc: per epoch (length E), mean over the epoch's augmented batches, measured
            at the parameters before each step (as upstream). Accuracies are fractions in [0, 1].
        test_loss, test_acc: per epoch, on the whole test split after the epoch (no augmentation).
        seconds: wall time of the group this expert was trained in, divided by the group size.
    """

    index: int
    seed: int
    trajectory: Tensor
    train_loss: tuple[float, ...]
    train_acc: tuple[float, ...]
    test_loss: tuple[float, ...]
    test_acc: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class EpochReport:
    """Sent to ``on_epoch`` after every epoch of a group (``epoch`` counts from 1)."""

    experts: tuple[int, ...]
    epoch: int
    epochs: int
    train_acc: tuple[float, ...]
    test_acc: tuple[float, ...]
    seconds: float  # wall time of this epoch (training + test) for the whole group


class _ExpertRNG:
    """The three CPU generators of one expert (see the module docstring)."""

    def __init__(self, run_seed: int, index: int) -> None:
        self.seed = expert_seed(run_seed, index)
        self.init = torch.Generator().manual_seed(stream_seed(self.seed, "init"))
        self.order = torch.Generator().manual_seed(stream_seed(self.seed, "order"))
        self.dsa = torch.Generator().manual_seed(stream_seed(self.seed, "dsa"))


class ExpertTrainer:
    """Trains experts of one architecture on one dataset with one config, on one device.

    Args:
        dataset: the real data, already preprocessed (ZCA or normalised): train and test splits.
        spec: the expert architecture; its channels, classes and image size must match ``dataset``.
        config: optimiser, epochs, batch size, DSA, run seed.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``None``/``"auto"`` (CUDA when available).
        backend: the backend of the default ConvNet's fused block (instance norm -> ReLU -> avg pool,
            :func:`datm_fast.ops.norm_relu_pool`): ``"auto"`` (default: the C++ kernels on CPU, the CUDA
            ones on a GPU, where built), ``"cpp"``, ``"cuda"``, ``"triton"`` (its kernels are NCHW), or
            ``"torch"`` (PyTorch's separate ops).
            All agree to float rounding; other ConvNet variants always use PyTorch's ops.
        channels_last: NHWC activations (default: on). The C++ kernels work in NHWC; with PyTorch's ops
            the two layouts were within measurement noise on the 2-core CPU.
        test_batch_size: images per evaluation batch (memory only; results do not depend on it).
        graphs: compute each step's update direction (both GSAM gradients and their combination) as a
            static step (:mod:`datm_fast.step_graphs`): a CUDA graph per batch shape on a GPU, replayed
            at every step of a group; elsewhere the same function on its buffers. Results are the same;
            off until a GPU measurement says it wins.

    Example::

        trainer = ExpertTrainer(zca_cifar10, ConvNetSpec(3, 10, 32), ExpertConfig(epochs=50))
        for expert in trainer.train_iter(range(100), experts_per_batch=1):
            save(expert.trajectory)          # (51, 320010)
    """

    def __init__(
        self,
        dataset: ImageDataset,
        spec: ConvNetSpec,
        config: ExpertConfig,
        *,
        device: Device | None = None,
        backend: Backend = "auto",
        channels_last: bool = True,
        test_batch_size: int = 500,
        graphs: bool = False,
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"ExpertTrainer: dataset must be an ImageDataset, got {type(dataset).__name__}")
        if not isinstance(spec, ConvNetSpec):
            raise TypeError(f"ExpertTrainer: spec must be a ConvNetSpec, got {type(spec).__name__}")
        if not isinstance(config, ExpertConfig):
            raise TypeError(f"ExpertTrainer: config must be an ExpertConfig, got {type(config).__name__}")
        got = (dataset.channels, dataset.num_classes, dataset.image_size)
        want = (spec.channels, spec.num_classes, spec.image_size)
        if got != want:
            raise ValueError(
                f"ExpertTrainer: dataset {dataset.name!r} has (channels, classes, image size) {got}, "
                f"but the model spec expects {want}"
            )
        if dataset.train_labels.numel() == 0 or dataset.test_labels.numel() == 0:
            raise ValueError(f"ExpertTrainer: dataset {dataset.name!r} has an empty train or test split")
        if test_batch_size < 1:
            raise ValueError(f"ExpertTrainer: test_batch_size must be >= 1, got {test_batch_size}")
        self.dataset = dataset
        self.spec = spec
        self.config = config
        self.device = resolve_device(device)
        self.channels_last = bool(channels_last)
        self.test_batch_size = int(test_batch_size)
        self.graphs = bool(graphs)
        check_backend(backend)
        # The fused block's backend, decided once (None: PyTorch's separate ops): the first layer's
        # activation stands for every layer (same dtype and device; H, W >= 2 wherever pooling runs).
        self._block_backend: str | None = None
        if spec.norm_relu_pool_blocks:
            probe = torch.empty(1, 1, *spec.layers[0].conv_shape[1:], device=self.device)
            self._block_backend = resolve_block_backend(backend, probe)
        elif backend not in ("auto", "torch"):
            raise ValueError(
                f"ExpertTrainer: backend={backend!r} runs the fused instance norm -> ReLU -> avg pool block; "
                f"{spec} has another block (use backend='auto' or 'torch')"
            )
        dev = self.device
        self._train_x = dataset.train_images.to(dev, torch.float32).contiguous()
        self._train_y = dataset.train_labels.to(dev)
        self._test_x = dataset.test_images.to(dev, torch.float32).contiguous()
        self._test_y = dataset.test_labels.to(dev)

    @property
    def block_backend(self) -> str:
        """The backend of the ConvNet blocks: ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (PyTorch's ops)."""
        return self._block_backend or "torch"

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self._train_y.shape[0] / self.config.batch_size)

    # ----- one training step ---------------------------------------------------------------------------------
    def _grad(self, params: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-expert gradient ``(K, P)``, logits ``(K, b, classes)`` and mean loss ``(K,)`` on the batch."""
        k, b = y.shape
        p = params.detach().requires_grad_(True)
        precision = self.config.precision
        with torch.enable_grad(), precision_scope(precision):
            with forward_autocast(precision, self.device.type):
                logits = batched_logits(self.spec, p, x, block_backend=self._block_backend).float()
            losses = F.cross_entropy(logits.reshape(k * b, -1), y.reshape(k * b), reduction="none").view(k, b).mean(1)
            (grad,) = torch.autograd.grad(losses.sum(), p)
        return grad, logits.detach(), losses.detach()

    def _direction(self, params: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The step's update direction ``(K, P)`` (the gradient, or GSAM's combination of the gradients at
        ``params`` and at its perturbation), with the logits and mean losses at ``params``. It changes
        nothing, so it can be a static step: the SGD update is the caller's."""
        grad, logits, losses = self._grad(params, x, y)
        cfg = self.config
        if cfg.optimizer == "gsam":
            e = gsam_perturbation(params, grad, cfg.rho, adaptive=cfg.adaptive)
            grad_p, _, _ = self._grad(params + e, x, y)
            grad = gsam_direction(grad, grad_p, cfg.alpha)
        return grad, logits, losses

    def _augment(self, x: Tensor, rngs: Sequence[_ExpertRNG]) -> Tensor:
        """DSA of each expert's batch ``x`` ``(K, b, C, H, W)`` with that expert's generator."""
        cfg = self.config.dsa
        if cfg is None or not cfg.groups:
            return x
        k, b, _, h, w = x.shape
        drawn = [sample_dsa_params(cfg, b, h, w, generator=r.dsa) for r in rngs]
        if k == 1:
            return apply_dsa(x[0], drawn[0].to(x.device)).unsqueeze(0)
        out = torch.empty_like(x)
        by_groups: dict[tuple[str, ...], list[int]] = {}
        for i, p in enumerate(drawn):
            by_groups.setdefault(p.groups, []).append(i)
        for groups, members in by_groups.items():
            first = drawn[members[0]]
            values = {n: torch.cat([drawn[i].tensors()[n] for i in members]) for n in first.tensors()}
            params = DSAParams(
                groups=groups,
                batch_size=len(members) * b,
                height=h,
                width=w,
                cutout_size=first.cutout_size,
                **values,
            ).to(x.device)
            idx = torch.tensor(members, device=x.device)
            out[idx] = apply_dsa(x[idx].flatten(0, 1), params).view(len(members), b, *x.shape[2:])
        return out

    @torch.no_grad()
    def evaluate(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Mean test loss and accuracy of each expert: two ``(K,)`` float64 CPU tensors.

        ``params`` is ``(K, P)`` (or ``(P,)`` for one network) on any device.
        """
        params = params.to(self.device, torch.float32)
        if params.dim() == 1:
            params = params.unsqueeze(0)
        k = params.shape[0]
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        correct = torch.zeros(k, dtype=torch.int64, device=self.device)
        n = self._test_y.shape[0]
        for lo in range(0, n, self.test_batch_size):
            x = self._test_x[lo : lo + self.test_batch_size]
            y = self._test_y[lo : lo + self.test_batch_size]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            precision = self.config.precision
            with precision_scope(precision), forward_autocast(precision, self.device.type):
                logits = batched_logits(self.spec, params, x, shared_input=True, block_backend=self._block_backend)
            logits = logits.float()
            yk = y.expand(k, -1)
            loss_sum += F.cross_entropy(logits.flatten(0, 1), yk.reshape(-1), reduction="none").view(k, -1).sum(1)
            correct += (logits.argmax(-1) == yk).sum(1)
        return (loss_sum / n).cpu(), (correct.double() / n).cpu()

    # ----- a group of experts ---------------------------------------------------------------------------------
    def train(
        self,
        experts: Sequence[int],
        *,
        on_step: Callable[[tuple[int, ...], int], None] | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
    ) -> list[TrainedExpert]:
        """Train the experts numbered ``experts`` together, as one group; returns them in that order.

        ``on_step(experts, images)`` is called after every step with the group's indices and the number
        of images each expert just trained on; ``on_epoch`` after every epoch with accuracies (both for
        progress display).
        """
        ids = tuple(int(i) for i in experts)
        if not ids:
            return []
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError(f"ExpertTrainer.train: expert indices must be distinct and >= 0, got {list(ids)}")
        cfg, dev = self.config, self.device
        started = time.perf_counter()
        rngs = [_ExpertRNG(cfg.seed, i) for i in ids]
        k = len(ids)
        params = torch.stack([init_flat_params(self.spec, r.init) for r in rngs]).to(dev)
        momentum_buffer = torch.zeros_like(params) if cfg.momentum != 0.0 else None
        trajectory = [params.cpu()]
        n = self._train_y.shape[0]
        stats: dict[str, list[Tensor]] = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
        graphs = StepGraphs() if self.graphs else None  # this group's: its static steps read only their buffers
        for epoch in range(cfg.epochs):
            epoch_start = time.perf_counter()
            order = torch.stack([torch.randperm(n, generator=r.order) for r in rngs]).to(dev)  # (K, N)
            loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
            correct = torch.zeros(k, dtype=torch.int64, device=dev)
            for lo in range(0, n, cfg.batch_size):
                idx = order[:, lo : lo + cfg.batch_size]  # (K, b)
                y = self._train_y[idx]
                x = self._augment(self._train_x[idx], rngs)
                x = stack_inputs(x, self.channels_last)
                if graphs is None:
                    grad, logits, losses = self._direction(params, x, y)
                else:
                    inputs = {"params": params, "x": x, "y": y}
                    step = graphs.step(("direction", tuple(x.shape)), None, lambda: self._direction, inputs)
                    grad, logits, losses = step(**inputs)  # a graph's own outputs: used before the next call
                params = sgd_step(
                    params,
                    grad,
                    cfg.lr,
                    momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay,
                    momentum_buffer=momentum_buffer,
                )
                b = y.shape[1]
                loss_sum += losses.double() * b
                correct += (logits.argmax(-1) == y).sum(1)
                if on_step is not None:
                    on_step(ids, b)
            trajectory.append(params.cpu())
            if not bool(torch.isfinite(params).all()):
                bad = [ids[i] for i in range(k) if not bool(torch.isfinite(params[i]).all())]
                raise FloatingPointError(
                    f"expert(s) {bad} diverged in epoch {epoch + 1} (non-finite parameters); lower the "
                    f"learning rate (lr={cfg.lr})"
                )
            test_loss, test_acc = self.evaluate(params)
            stats["train_loss"].append((loss_sum / n).cpu())
            stats["train_acc"].append((correct.double() / n).cpu())
            stats["test_loss"].append(test_loss)
            stats["test_acc"].append(test_acc)
            if on_epoch is not None:
                on_epoch(
                    EpochReport(
                        experts=ids,
                        epoch=epoch + 1,
                        epochs=cfg.epochs,
                        train_acc=tuple(stats["train_acc"][-1].tolist()),
                        test_acc=tuple(test_acc.tolist()),
                        seconds=time.perf_counter() - epoch_start,
                    )
                )
        traj = torch.stack(trajectory, dim=1)  # (K, E + 1, P)
        seconds = (time.perf_counter() - started) / k
        per = {name: torch.stack(v, dim=1) for name, v in stats.items()}  # (K, E) each
        return [
            TrainedExpert(
                index=ids[i],
                seed=rngs[i].seed,
                trajectory=traj[i].clone(),
                train_loss=tuple(per["train_loss"][i].tolist()),
                train_acc=tuple(per["train_acc"][i].tolist()),
                test_loss=tuple(per["test_loss"][i].tolist()),
                test_acc=tuple(per["test_acc"][i].tolist()),
                seconds=seconds,
            )
            for i in range(k)
        ]

    def train_iter(
        self,
        experts: Sequence[int],
        *,
        experts_per_batch: int | None = None,
        on_step: Callable[[tuple[int, ...], int], None] | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
    ) -> Iterator[TrainedExpert]:
        """Train ``experts`` in groups of ``experts_per_batch`` (default: :func:`default_experts_per_batch`),
        yielding each expert as soon as its group finishes (so the caller can save it)."""
        ids = [int(i) for i in experts]
        per = default_experts_per_batch(self.device) if experts_per_batch is None else int(experts_per_batch)
        if per < 1:
            raise ValueError(f"experts_per_batch must be >= 1, got {experts_per_batch}")
        for lo in range(0, len(ids), per):
            yield from self.train(ids[lo : lo + per], on_step=on_step, on_epoch=on_epoch)
