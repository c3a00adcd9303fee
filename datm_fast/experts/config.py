"""Configuration of expert training, and the seeds every expert derives from it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from ..augment import DSAConfig
from ..precision import Precision, check_precision

__all__ = ["OPTIMIZERS", "ExpertConfig", "expert_seed", "stream_seed"]

#: Optimisers an expert can be trained with.
OPTIMIZERS: tuple[str, ...] = ("sgd", "gsam")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64's finaliser (Steele et al. 2014): a bijection on 64-bit ints whose outputs for
    # consecutive inputs are uncorrelated, so (seed, expert) and (seed, expert + 1) give unrelated streams.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def expert_seed(seed: int, expert: int) -> int:
    """The seed of expert number ``expert`` of a run seeded ``seed``: a 63-bit int.

    Every random draw of that expert (initial parameters, batch order, DSA) comes from generators
    seeded from this value alone, so an expert is the same whichever other experts it is trained with.
    """
    if expert < 0:
        raise ValueError(f"expert_seed: expert index must be >= 0, got {expert}")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ expert) >> 1


#: The independent random streams of one expert, each with its own generator.
STREAMS: tuple[str, ...] = ("init", "order", "dsa")


def stream_seed(seed: int, stream: str) -> int:
    """Seed of one of an expert's streams (``"init"``, ``"order"`` or ``"dsa"``) from its :func:`expert_seed`.

    Separate streams mean that, e.g., turning DSA off does not change the initial parameters or the
    batch order of an expert.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream_seed: unknown stream {stream!r}, expected one of {STREAMS}")
    salt = ((STREAMS.index(stream) + 1) * 0x632BE59BD9B4E019) & _MASK64
    return _splitmix64((seed & _MASK64) ^ salt) >> 1


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"ExpertConfig.{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_float(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"ExpertConfig.{name} must be a finite number, got {value!r}")
    v = float(value)
    if v < minimum or (strict and v == minimum):
        raise ValueError(f"ExpertConfig.{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return v


#: Keys added to ExpertConfig after its first buffers, with the value those buffers were trained under.
_LATER_KEYS: dict[str, object] = {"precision": "float32"}


@dataclass(frozen=True)
class ExpertConfig:
    """How each expert is trained. Defaults are DATM's ``buffer_FTD.py`` (as run in its ``run_buffer.sh``).

    Example::

        ExpertConfig()                                     # DATM: GSAM(rho 0.01, alpha 0.3, adaptive), 50 epochs
        ExpertConfig(optimizer="sgd", epochs=50)           # MTT's buffer.py
    """

    epochs: int = 50  # training epochs E; a trajectory holds E + 1 parameter vectors (epoch 0 = init)
    batch_size: int = 256  # images per step; the last batch of an epoch is smaller (no drop_last, as upstream)
    optimizer: Literal["sgd", "gsam"] = "gsam"  # plain SGD (MTT) or GSAM over SGD (FTD / DATM)
    lr: float = 0.01  # SGD learning rate, constant
    momentum: float = 0.0  # SGD momentum (PyTorch convention: buf = m * buf + g; w -= lr * buf)
    weight_decay: float = 0.0  # L2 added to the update direction (PyTorch SGD's weight_decay)
    rho: float = 0.01  # GSAM perturbation radius; constant (upstream's rho_max == rho_min)
    # GSAM weight of the gradient component orthogonal to the perturbed gradient. 0.3 as documented for
    # DATM (and passed explicitly by scripts built on it); buffer_FTD.py's own argparse default, which
    # DATM's run_buffer.sh does not override, is 0.4: pass alpha=0.4 to reproduce that script exactly.
    alpha: float = 0.3
    adaptive: bool = True  # GSAM perturbation scaled per weight by w^2 (adaptive SAM), as upstream
    dsa: DSAConfig | None = field(default_factory=DSAConfig)  # augmentation of every batch; None: none
    seed: int = 0  # run seed: expert i draws everything from expert_seed(seed, i)
    # The networks' arithmetic (datm_fast.precision): float32 is IEEE (TF32 off); tf32 is PyTorch's
    # default for cuDNN convolutions, which upstream's experts trained under; bfloat16 autocasts the
    # forward (parameters, GSAM and the update stay float32).
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "epochs", _check_positive_int("epochs", self.epochs))
        set_(self, "batch_size", _check_positive_int("batch_size", self.batch_size))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"ExpertConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        set_(self, "lr", _check_float("lr", self.lr, strict=True))
        set_(self, "momentum", _check_float("momentum", self.momentum))
        set_(self, "weight_decay", _check_float("weight_decay", self.weight_decay))
        set_(self, "rho", _check_float("rho", self.rho))
        set_(self, "alpha", _check_float("alpha", self.alpha))
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"ExpertConfig.adaptive must be a bool, got {self.adaptive!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or int(self.seed) < 0:
            raise ValueError(f"ExpertConfig.seed must be an int >= 0, got {self.seed!r}")
        set_(self, "seed", int(self.seed))
        if self.dsa is not None and not isinstance(self.dsa, DSAConfig):
            raise ValueError(f"ExpertConfig.dsa must be a DSAConfig or None, got {type(self.dsa).__name__}")
        check_precision("ExpertConfig", self.precision)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``config`` of a buffer manifest); :meth:`from_dict` inverts it.

        A key added after buffers were first written (``precision``) appears only when it is not its
        default: a float32 buffer's manifest, and so its identity, is what it was before the key
        existed, and buffers written before it resume and match as they did.
        """
        d = dataclasses.asdict(self)
        for name, default in _LATER_KEYS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertConfig:
        """Rebuild from :meth:`to_dict` output. Unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ExpertConfig: unknown keys {unknown}; known: {sorted(names)}")
        kw = dict(d)
        if kw.get("dsa") is not None:
            kw["dsa"] = DSAConfig(**kw["dsa"])
        return cls(**kw)

    def replace(self, **changes: object) -> ExpertConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
