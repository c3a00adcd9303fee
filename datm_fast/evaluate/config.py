"""The evaluation protocol's settings (:class:`EvalConfig`), its result (:class:`EvalResult`) and the
cross-architecture pools.

The protocol is upstream's ``evaluate_synset`` (MTT/DATM ``utils``), step for step:

* a freshly initialised network; SGD with momentum 0.9 and weight decay 5e-4 on every parameter;
  ``lr`` = the learned lr of the set (0.01 for real-data baselines, upstream's ``lr_teacher``);
* ``for ep in range(epochs + 1)``: one pass over the set in a fresh random order, in batches of
  ``batch_size`` (the last one smaller, as ``DataLoader(shuffle=True)``), DSA on every batch; then,
  ``if ep == epochs // 2 + 1``, ``lr *= 0.1`` and a *new* SGD optimiser (so the momentum buffer
  starts again from zero). With the default 1000 epochs that is 1001 passes: 502 at ``lr``, 499 at
  ``lr / 10``. We keep the extra pass and the momentum reset so that accuracies compare with upstream's;
* loss: soft cross-entropy ``sum(-log_softmax(out) * softmax(y)) / batch`` for logit labels
  (float ``(N, C)``), ordinary cross-entropy for integer labels;
* test accuracy of the final network on the whole test split (network in ``eval()`` mode).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..augment import DSAConfig
from ..models import EVAL_POOLS
from ..precision import Precision, check_precision

__all__ = ["EvalConfig", "EvalResult", "EVAL_POOLS", "resolve_models"]

Engine = Literal["auto", "functional", "module"]


def resolve_models(spec: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """Model names from a pool name (``"M"``, see :data:`EVAL_POOLS`), a comma-separated string
    (``"ConvNet,AlexNet"``) or a sequence of names. Names are checked when a network is built."""
    if isinstance(spec, str):
        if spec in EVAL_POOLS:
            return EVAL_POOLS[spec]
        names = [s.strip() for s in spec.split(",")]
    else:
        names = [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise ValueError(
            f"no model names in {spec!r}; give names like 'ConvNet,AlexNet' or a pool ({', '.join(EVAL_POOLS)})"
        )
    out: list[str] = []
    for n in names:  # a pool name inside a list expands too: "M,ConvNetBN"
        for m in EVAL_POOLS.get(n, (n,)):
            if m not in out:
                out.append(m)
    return tuple(out)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"EvalConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: object, lo: float, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (lo <= float(value) <= hi):
        raise ValueError(f"EvalConfig.{name} must be a number in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate a set: upstream's protocol (see the module docstring) and how to run it fast.

    Example::

        cfg = EvalConfig()                                    # 5 ConvNets, 1000 epochs, batch 256
        cfg = EvalConfig(runs=1, epochs=300)                  # a quick check inside distillation
        cfg = EvalConfig(model="AlexNet", batch_size=128)     # upstream's DATM configs use batch 128
    """

    model: str = "ConvNet"  # network name (datm_fast.models.get_network), fresh init per run
    runs: int = 5  # networks trained from scratch; the result is their mean ± std
    epochs: int = 1000  # upstream's epoch_eval_train: epochs + 1 passes, lr x lr_decay after pass epochs // 2 + 1
    batch_size: int = 256  # upstream's batch_train (128 in DATM's configs)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, norms and biases included (upstream)
    lr_decay: float = 0.1  # the lr factor after half the epochs
    dsa: DSAConfig | None = field(default_factory=DSAConfig)  # DSA on every batch; None = no augmentation
    test_batch_size: int = 512  # test-split forward batch; changes speed and memory, not results
    engine: Engine = (
        "auto"  # functional: stacked runs, vmap (networks without batch norm); module: one nn.Module per run
    )
    parallel_runs: int | None = None  # runs the functional engine trains at once; None: 1 on CPU, what fits on CUDA
    compile: Union[bool, Literal["auto"]] = "auto"  # torch.compile the training step; see should_compile
    # float32: IEEE (TF32 off); tf32: TF32 convolutions and matmuls on GPUs (upstream's numerics: PyTorch's
    # default for cuDNN convolutions); bfloat16: autocast forward/backward. See datm_fast.precision.
    precision: Precision = "float32"
    # on: the functional engine's training gradient as a CUDA graph per batch shape (datm_fast.step_graphs),
    # replayed at every step; off until a GPU measurement says it wins. Results are the same either way.
    graphs: Literal["off", "on"] = "off"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"EvalConfig.model must be a network name, got {self.model!r}")
        _check_int("runs", self.runs, 1)
        _check_int("epochs", self.epochs, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("test_batch_size", self.test_batch_size, 1)
        _check_float("momentum", self.momentum, 0.0, 1.0)
        _check_float("weight_decay", self.weight_decay, 0.0)
        _check_float("lr_decay", self.lr_decay, 0.0)
        if self.dsa is not None and not isinstance(self.dsa, DSAConfig):
            raise ValueError(f"EvalConfig.dsa must be a DSAConfig or None, got {type(self.dsa).__name__}")
        if self.engine not in ("auto", "functional", "module"):
            raise ValueError(f"EvalConfig.engine must be 'auto', 'functional' or 'module', got {self.engine!r}")
        if self.parallel_runs is not None:
            _check_int("parallel_runs", self.parallel_runs, 1)
        if not isinstance(self.compile, bool) and self.compile != "auto":
            raise ValueError(f"EvalConfig.compile must be True, False or 'auto', got {self.compile!r}")
        check_precision("EvalConfig", self.precision)
        if self.graphs not in ("off", "on"):
            raise ValueError(f"EvalConfig.graphs must be 'off' or 'on', got {self.graphs!r}")
        if self.graphs == "on" and self.compile is True:
            raise ValueError(
                "EvalConfig: compile=True and graphs='on' each replace the eager training step; choose one "
                "(compile='auto' stays eager under graphs='on')"
            )

    # ----- the schedule ---------------------------------------------------------------------------
    @property
    def num_passes(self) -> int:
        """Passes over the set: ``epochs + 1`` (upstream loops ``for ep in range(epochs + 1)``)."""
        return self.epochs + 1

    @property
    def decay_epoch(self) -> int:
        """The last pass (0-based) at the full lr: ``epochs // 2 + 1`` (upstream's ``lr_schedule``)."""
        return self.epochs // 2 + 1

    def lr_at(self, epoch: int, lr: float) -> float:
        """The lr of pass ``epoch`` (0-based): ``lr`` up to :attr:`decay_epoch`, then ``lr * lr_decay``.

        Computed as upstream does (``lr *= 0.1`` on a Python float), so the values are the same bits.
        """
        if not 0 <= epoch < self.num_passes:
            raise ValueError(f"EvalConfig.lr_at: epoch must be in [0, {self.num_passes}), got {epoch}")
        return lr if epoch <= self.decay_epoch else lr * self.lr_decay

    def resets_momentum(self, epoch: int) -> bool:
        """Whether pass ``epoch`` starts with a zero momentum buffer (upstream builds a new optimiser)."""
        return epoch == 0 or epoch == self.decay_epoch + 1

    def should_compile(self, device_type: str, steps: int) -> bool:
        """Whether to ``torch.compile`` a training step that will run ``steps`` times.

        ``compile=True``/``False`` decide; ``"auto"`` compiles on CPU when ``steps >= 500``: compiling
        takes 5-20 s once (less when the on-disk cache has it), then each CIFAR ConvNet epoch is
        1.6-1.7x faster on 2 cores (0.256 -> 0.158 s at IPC 10, 1.27 -> 0.75 s at IPC 50), so it pays
        for itself within about 500 steps. ``"auto"`` stays eager on GPUs, where it is not measured yet,
        and under ``graphs="on"``, whose captured step is the eager one.
        """
        if self.compile != "auto":
            return bool(self.compile)
        return self.graphs == "off" and device_type == "cpu" and steps >= 500

    def replace(self, **changes: Any) -> EvalConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (DSA settings as a dict, or None)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvalResult:
    """Test accuracies of ``runs`` networks trained on one set with one architecture.

    Attributes:
        model: the network name.
        accuracies: per run, test accuracy in ``[0, 1]`` (fraction of the test split classified right).
        train_losses: per run, the mean training loss of the last pass (``nan`` if training diverged).
        seconds: wall-clock time of training and testing all runs.
        epochs: the config's ``epochs`` (``epochs + 1`` passes were made).
        lr: the (initial) training lr.
        num_images: images in the training set (per run).
        name: what was evaluated (a run directory, ``random-real ipc 10``, ...); free text.

    ``mean`` and ``std`` are over runs; ``std`` is the population standard deviation (``np.std``,
    ddof 0), as upstream reports it.
    """

    model: str
    accuracies: tuple[float, ...]
    train_losses: tuple[float, ...]
    seconds: float
    epochs: int
    lr: float
    num_images: int
    name: str = ""

    @property
    def runs(self) -> int:
        """Number of runs."""
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        """Mean test accuracy over runs, in ``[0, 1]``."""
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Population standard deviation of the test accuracy over runs (0 for one run)."""
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def diverged(self) -> bool:
        """True if some run's training loss is not finite (an exploding lr, NaN images or labels)."""
        return any(not math.isfinite(v) for v in self.train_losses)

    def format(self) -> str:
        """``"ConvNet  46.90 ± 0.31 %  (5 runs)"``."""
        return f"{self.model}  {100 * self.mean:.2f} ± {100 * self.std:.2f} %  ({self.runs} runs)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``mean`` and ``std`` (fractions) and ``runs``."""
        return {
            "name": self.name,
            "model": self.model,
            "runs": self.runs,
            "mean": self.mean,
            "std": self.std,
            "accuracies": list(self.accuracies),
            "train_losses": [v if math.isfinite(v) else None for v in self.train_losses],
            "seconds": self.seconds,
            "epochs": self.epochs,
            "lr": self.lr,
            "num_images": self.num_images,
        }
