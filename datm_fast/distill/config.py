"""DATM's configuration: every key of upstream's YAML configs, checked before any work starts.

Upstream (NUS-HPC-AI-Lab/DATM) merges a YAML file into the yacs defaults of ``utils/cfg.py`` and turns
every key into an argparse flag. It checks nothing. A start epoch beyond the expert buffer, a class
with fewer images than ``ipc`` or ``pix_init: noise`` all fail minutes or hours into a run, and
some mistakes (an unknown ``eval_mode``) fail silently. Here one frozen :class:`DistillConfig` holds
all of DATM's keys plus datm_fast's own. :func:`load_config` reads upstream's files as they are and
raises a :class:`ConfigError` before any work starts. The error names the key, the value and what
was expected, and for an unknown key it suggests the closest valid one.

Example::

    from datm_fast.distill.config import load_config, validate_against, sample_start_epoch

    cfg = load_config("cifar10-ipc10")                       # a shipped config, paper values
    cfg = load_config("DATM/configs/CIFAR-10/ConvIN/IPC10.yaml", lr_img=50, seed=1)  # upstream file
    validate_against(cfg, buffer_epochs=50, class_sizes=[5000] * 10)
    start = sample_start_epoch(cfg, iteration=0, generator=torch.Generator().manual_seed(cfg.seed))

Keys. Fields are snake_case. Upstream's spellings are aliases: ``Iteration``, ``Sequential_Generation``,
``Momentum_y``, ``skip_first_eva``, ``parall_eva``, ``Initialize_Label_With_Another_Model``,
``Initialize_Label_Model`` and ``Label_Model_Timestamp``. Giving both spellings of a key is an error.
Older upstream configs name the window ``Initial_Step`` (= ``current_max_start_epoch``) and
``learn_end_epoch`` (= ``expansion_end_epoch``; an intermediate ``DATM.py`` uses it in the same formula).
These are read as the new names, with a :class:`ConfigWarning`. Keys that upstream defines but
``distill/DATM.py`` never reads (:data:`IGNORED_KEYS`: ``ema_decay``, ``lr_init``, ``batch_real``,
``texture``, ``canvas_size``, ``canvas_samples``, ``record_loss``, ``Initialize_Label_Model_Dir``) are
accepted with a :class:`ConfigWarning` and dropped. Upstream's ``device: [0, 1]`` (a list of GPUs for
``CUDA_VISIBLE_DEVICES``) is dropped with a warning too. datm_fast runs on the one device that the
string key ``device`` names. A key that YAML gives twice keeps its last value, as upstream does,
and gives a warning.

Numbers. PyYAML follows YAML 1.1, where ``1e-5`` is a *string*: a float needs a dot, as in ``1.0e-5``.
Upstream's yacs ``literal_eval``s such strings. Here a string that is a plain decimal or scientific
number (``"1e-5"``, ``"1E3"``, ``"0.5"``) is read as that number, for float and int keys alike. An int
key takes it only if the number is a whole number (``Iteration: 1e4`` -> 10000). Everything else is a
type error: ``"fast"``, ``True`` for a number, ``2.5`` for an int, ``nan`` and ``inf``. Bool keys take
``true``/``false`` (and yes/no, on/off, 1/0). Optional keys take ``null``, ``~`` or ``"None"``.

Defaults are upstream's ``utils/cfg.py``, not the paper's values: for a paper run, start from a shipped
config (:func:`list_configs`). The start-epoch schedule (:func:`start_epoch_upper`,
:func:`sample_start_epoch`), the evaluation points (:func:`eval_iterations`) and the evaluation networks
(:func:`eval_models`) are pure functions of the config that reproduce upstream exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..backends import Backend

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "DistillConfig",
    "IGNORED_KEYS",
    "OWN_KEYS",
    "UPSTREAM_KEYS",
    "effective_batch_syn",
    "eval_iterations",
    "eval_models",
    "list_configs",
    "load_config",
    "sample_start_epoch",
    "start_epoch_upper",
    "validate_against",
]

PixInit = Literal["real", "noise", "samples_predicted_correctly"]
UnrollMode = Literal["exact", "full", "tesla"]  # datm_fast.distill.unroll.UNROLLS


class ConfigError(ValueError):
    """A config that cannot run. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid DATM config{where}: {self.problems[0]}"
        else:
            msg = f"invalid DATM config{where}:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class ConfigWarning(UserWarning):
    """A key that is accepted but has no effect (or a new meaning) in datm_fast."""


@dataclass(frozen=True, slots=True)
class DistillConfig:
    """Every setting of one DATM distillation run. Frozen: derive variants with :meth:`replace`.

    Build it with :func:`load_config`, which also takes upstream's key spellings and checks the
    keys. Direct construction (``DistillConfig(ipc=10)``) coerces and validates the values the same
    way. Defaults are upstream's ``utils/cfg.py``. ``it`` below is the iteration counter, which runs
    ``0 .. iterations`` inclusive.
    """

    # ---- what is distilled ------------------------------------------------------------------------------------
    dataset: str = "CIFAR10"  # dataset name or path for datm_fast.data.load_dataset (case-insensitive: CIFAR10, Tiny)
    subset: str = "imagenette"  # ImageNet class subset; only read when dataset is "ImageNet" (upstream)
    res: int = 32  # image side, px; upstream only uses it in the ImageNet-subset buffer path <dataset>/<subset>/<res>
    ipc: int = 1  # synthetic images per class; the set has num_classes * ipc images
    model: str = "ConvNet"  # network distilled with: datm_fast.models.network_names() (ConvNetD4 for 64 px)
    zca: bool = True  # ZCA-whiten the real data (eps 0.1, fit on train); the experts must have been trained so too

    # ---- trajectory matching ----------------------------------------------------------------------------------
    syn_steps: int = 80  # student SGD steps on the synthetic set per iteration (N)
    expert_epochs: int = 2  # target = expert checkpoint at start_epoch + expert_epochs (M), in epochs
    min_start_epoch: int = 0  # start epochs are drawn uniformly from [min_start_epoch, upper), upper excluded
    current_max_start_epoch: int = 20  # upper at it = 0 (only with sequential_generation), in epochs
    max_start_epoch: int = 25  # final upper, and its cap: the largest start epoch ever drawn is max_start_epoch - 1
    sequential_generation: bool = True  # upstream Sequential_Generation: upper grows linearly from current to max
    expansion_end_epoch: int = 3000  # iterations (not epochs, despite the name) for upper to reach max_start_epoch
    batch_syn: int | None = None  # synthetic images per inner step; None = the whole set (num_classes * ipc)
    threshold: float = 1.0  # images, lr and labels are updated only when the matching loss is <= threshold

    # ---- what is learned, and how fast ------------------------------------------------------------------------
    lr_img: float = 1000.0  # SGD lr of the synthetic images (momentum 0.5)
    lr_teacher: float = 0.01  # initial value of the learned student lr (alpha), per inner SGD step
    lr_lr: float = 1e-5  # SGD lr of the learned student lr (momentum 0.5)
    lr_y: float = 2.0  # SGD lr of the soft labels (logits), momentum momentum_y
    momentum_y: float = 0.9  # SGD momentum of the soft labels (upstream Momentum_y)
    pix_init: PixInit = "samples_predicted_correctly"  # images experts classify right | real (random) | noise (N(0, 1))
    label_model_timestamp: int = -1  # expert checkpoint (epoch index, -1 = last) that picks images / gives logits
    initialize_label_with_another_model: bool = False  # label/select with initialize_label_model instead of model
    initialize_label_model: str = ""  # network name used when initialize_label_with_another_model

    # ---- augmentation -------------------------------------------------------------------------------------------
    dsa: bool = True  # Differentiable Siamese Augmentation in the inner loop and at evaluation
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"  # '_'-joined DSA groups (datm_fast.augment), or none
    no_aug: bool = False  # no DSA in the inner loop (evaluation still augments when dsa)

    # ---- schedule and evaluation --------------------------------------------------------------------------------
    iterations: int = 5000  # upstream Iteration: it runs 0..iterations inclusive, i.e. iterations + 1 updates
    eval_it: int = 100  # evaluate every eval_it iterations (see eval_iterations)
    skip_first_eval: bool = False  # upstream skip_first_eva: no evaluation at it = 0
    num_eval: int = 5  # networks trained from scratch per evaluation
    epoch_eval_train: int = 1000  # evaluation training length; upstream trains epoch_eval_train + 1 epochs
    batch_train: int = 256  # evaluation batch size, images
    eval_mode: str = "S"  # which networks evaluate the set: S (the model, minus BN), C, M, W, D, A, P, N, BN
    parallel_eval: bool = False  # upstream parall_eva: evaluate with DataParallel on every GPU

    # ---- files --------------------------------------------------------------------------------------------------
    data_path: str = "../dataset/"  # root of the real datasets
    buffer_path: str = "../buffer_storage/"  # root of the expert buffers (<buffer_path>/<dataset>/<model>/...)
    load_all: bool = False  # hold every expert file in memory instead of one file at a time
    max_files: int | None = None  # use only the first max_files expert files; None = all
    max_experts: int | None = None  # use only the first max_experts experts of each file; None = all
    force_save: bool = False  # save image grids even when ipc >= 50
    project: str = "TEST"  # experiment / logger project name (upstream: the wandb project)

    # ---- datm_fast's own keys (not in upstream) -----------------------------------------------------------------
    seed: int = 0  # seeds every generator of the run (upstream seeds 0, then get_network reseeds from the clock)
    unroll: UnrollMode = "exact"  # exact: checkpointed, full gradient; full: autograd graph; tesla: upstream's TESLA
    backend: Backend = "auto"  # op backend (datm_fast.backend_info()): auto picks the fastest live one
    device: str = "auto"  # torch device ("cuda", "cuda:1", "cpu"); auto = cuda when available, else cpu
    memory_budget_gb: float | None = None  # GiB; exact runs the full-graph engine when its estimate fits; None = never
    micro_batch: int | None = (
        None  # most images per forward/backward chunk of an inner step; None = auto (<= 256 MiB graph)
    )
    checkpoint_every: int = 500  # iterations between resumable checkpoints in out_dir; 0 = none
    out_dir: str | None = None  # run directory (config, checkpoints, images); None = the caller decides

    def __post_init__(self) -> None:
        problems: list[str] = []
        mistyped: list[str] = []
        hints = _type_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                coerced = _coerce(f.name, hints[f.name], value)
            except _BadValue as e:
                problems.append(str(e))
                mistyped.append(f.name)
                coerced = f.default  # only so that the value checks below can run; the error is raised anyway
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        # report impossible values too, except those that involve a mistyped key (already reported)
        problems += [m for m in _check_values(self) if not any(re.search(rf"\b{n}\b", m) for n in mistyped)]
        if problems:
            raise ConfigError(problems)

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget_gb`` in bytes (GiB = 2**30), as ``trajectory_matching_loss(memory_budget=...)`` takes it."""
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 2**30)

    def to_dict(self, *, upstream: bool = False) -> dict[str, Any]:
        """Plain ``{key: value}`` in field order. :func:`load_config` reads it back to an equal config.

        ``upstream=True`` gives upstream's key spellings (``Iteration``, ``Momentum_y``, ...) without
        datm_fast's own keys (:data:`OWN_KEYS`). Floats stay floats: upstream's yacs would reject
        ``lr_img: 100.0`` (its default is an int), so write ``lr_img`` as an int to feed upstream.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not upstream:
            return out
        return {_TO_UPSTREAM.get(k, k): v for k, v in out.items() if k not in OWN_KEYS}

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """YAML text of :meth:`to_dict`. When ``path`` is given, also write it there atomically."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            from ..utils import atomic_write

            with atomic_write(path, "w") as f:
                f.write(text)
        return text

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with ``changes`` applied, checked like :func:`load_config` (upstream spellings work)."""
        return dataclasses.replace(self, **_normalise(changes, "replace()"))


# ---- key tables ----------------------------------------------------------------------------------------------------

_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DistillConfig))

#: datm_fast's own keys, not present upstream.
OWN_KEYS: tuple[str, ...] = (
    "seed",
    "unroll",
    "backend",
    "device",
    "memory_budget_gb",
    "micro_batch",
    "checkpoint_every",
    "out_dir",
)

# upstream spelling -> field name, for the keys whose spelling differs
_ALIASES = MappingProxyType(
    {
        "Iteration": "iterations",
        "Sequential_Generation": "sequential_generation",
        "Momentum_y": "momentum_y",
        "skip_first_eva": "skip_first_eval",
        "parall_eva": "parallel_eval",
        "Initialize_Label_With_Another_Model": "initialize_label_with_another_model",
        "Initialize_Label_Model": "initialize_label_model",
        "Label_Model_Timestamp": "label_model_timestamp",
    }
)
_TO_UPSTREAM = MappingProxyType({v: k for k, v in _ALIASES.items()})

# older upstream spellings (early configs/ and utils/cfg.py), read as today's keys with a warning
_LEGACY = MappingProxyType({"Initial_Step": "current_max_start_epoch", "learn_end_epoch": "expansion_end_epoch"})

#: Keys upstream's ``utils/cfg.py`` defines but ``distill/DATM.py`` never reads: key -> why.
IGNORED_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "ema_decay": "an EMA of the synthetic images is FTD's; DATM never reads it",
        "lr_init": "an MTT leftover; DATM starts the learned lr at lr_teacher",
        "batch_real": "it only sizes per-class ImageNet loaders that DATM never uses",
        "texture": "MTT's texture distillation; DATM never reads it",
        "canvas_size": "MTT's texture distillation; DATM never reads it",
        "canvas_samples": "MTT's texture distillation; DATM never reads it",
        "record_loss": "DATM never reads it",
        "Initialize_Label_Model_Dir": "DATM never reads it (label experts come from buffer_path)",
    }
)

#: Every key of upstream's final ``utils/cfg.py`` (the spellings its YAML files use).
UPSTREAM_KEYS: tuple[str, ...] = (
    tuple(_TO_UPSTREAM.get(k, k) for k in _FIELD_NAMES if k not in OWN_KEYS) + ("device",) + tuple(IGNORED_KEYS)
)

# eval_mode -> the networks upstream's get_eval_pool evaluates with ("S" and "C" depend on model)
_EVAL_POOLS = MappingProxyType(
    {
        "M": ("ConvNet", "AlexNet", "VGG11", "ResNet18"),
        "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),
        "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),
        "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL"),
        "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),
        "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),
        "BN": ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "AlexNet", "VGG11", "ResNet18_AP"),
    }
)
_EVAL_MODES: tuple[str, ...] = ("S", "C") + tuple(_EVAL_POOLS)

_PATH_FIELDS = frozenset({"dataset", "data_path", "buffer_path", "out_dir"})
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null", "~"})


def _label(name: str) -> str:
    """How a field is named in messages: ``momentum_y (Momentum_y)`` when upstream spells it differently."""
    up = _TO_UPSTREAM.get(name)
    return f"{name} ({up})" if up else name


def _close(word: str, choices: Sequence[str]) -> str | None:
    """The choice closest to ``word`` (case-insensitive), or None."""
    lowered: dict[str, str] = {}
    for c in choices:
        lowered.setdefault(c.lower(), c)
    hit = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def _did_you_mean(word: object, choices: Sequence[str]) -> str:
    close = _close(str(word), choices)
    return f"; did you mean {close!r}?" if close else ""


# ---- coercion ------------------------------------------------------------------------------------------------------


class _BadValue(Exception):
    pass


_HINTS: dict[str, Any] = {}


def _type_hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(get_type_hints(DistillConfig))
    return _HINTS


def _number(name: str, value: Any, what: str) -> float:
    """A finite float from an int, float or numeric string; ``_BadValue`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise _BadValue(f"{_label(name)} must be {what}, got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        if not _NUMBER.fullmatch(value.strip()):
            raise _BadValue(f"{_label(name)} must be {what}, got the string {value!r}")
        x = float(value)
    else:
        x = float(value)
    if not math.isfinite(x):
        raise _BadValue(f"{_label(name)} must be a finite number, got {value!r}")
    return x


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union or (origin is not None and type(None) in args and len(args) == 2):  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(name, inner, value)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _BadValue(
            f"{_label(name)} must be one of {', '.join(map(repr, args))}, got {value!r}"
            + (_did_you_mean(value, args) if isinstance(value, str) else "")
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadValue(f"{_label(name)} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy integers
            return int(value)
        x = _number(name, value, "a whole number")
        if not x.is_integer():
            raise _BadValue(f"{_label(name)} must be a whole number, got {value!r}")
        return int(x)
    if tp is float:
        if type(value) is float and math.isfinite(value):
            return value
        return _number(name, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if name in _PATH_FIELDS and isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _BadValue(f"{_label(name)} must be a string, got {value!r} ({type(value).__name__})")
    raise TypeError(f"DistillConfig.{name}: unsupported annotation {tp!r}")  # pragma: no cover - a bug here


# ---- value checks --------------------------------------------------------------------------------------------------


def _check_values(c: DistillConfig) -> list[str]:
    """Every impossible value of ``c`` (already of the right types), one message each."""
    p: list[str] = []

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            p.append(f"{_label(name)} must be {expected}, got {getattr(c, name)!r}")

    for name in ("ipc", "syn_steps", "expert_epochs", "eval_it", "num_eval", "batch_train", "res"):
        need(getattr(c, name) >= 1, name, ">= 1")
    for name in ("min_start_epoch", "iterations", "epoch_eval_train", "seed", "checkpoint_every"):
        need(getattr(c, name) >= 0, name, ">= 0")
    for name in ("batch_syn", "max_files", "max_experts", "micro_batch"):
        v = getattr(c, name)
        need(v is None or v >= 1, name, ">= 1 or null")
    need(c.lr_teacher > 0, "lr_teacher", "> 0 (the student's initial SGD lr)")
    for name in ("lr_img", "lr_lr", "lr_y"):
        need(getattr(c, name) >= 0, name, ">= 0 (an SGD learning rate)")
    need(0 <= c.momentum_y < 1, "momentum_y", "in [0, 1)")
    need(c.threshold > 0, "threshold", "> 0 (the matching loss is >= 0; a threshold <= 0 skips every update)")
    need(c.memory_budget_gb is None or c.memory_budget_gb > 0, "memory_budget_gb", "> 0 or null")
    need(c.dataset.strip() != "", "dataset", "a dataset name or path")

    # the start-epoch window: randint(min_start_epoch, upper) needs upper > min_start_epoch at every iteration
    if c.max_start_epoch <= c.min_start_epoch:
        p.append(
            f"min_start_epoch must be < max_start_epoch (start epochs are drawn from "
            f"[min_start_epoch, max_start_epoch)), got {c.min_start_epoch} and {c.max_start_epoch}"
        )
    elif c.sequential_generation and not c.min_start_epoch < c.current_max_start_epoch <= c.max_start_epoch:
        p.append(
            f"current_max_start_epoch must be in ({c.min_start_epoch}, {c.max_start_epoch}] = "
            f"(min_start_epoch, max_start_epoch] when sequential_generation is on (the window at iteration 0 "
            f"is [min_start_epoch, current_max_start_epoch)), got {c.current_max_start_epoch}"
        )
    if c.sequential_generation:
        need(c.expansion_end_epoch >= 1, "expansion_end_epoch", ">= 1 iteration when sequential_generation is on")

    from ..models.registry import network_names

    names = network_names()
    if c.model not in names:
        p.append(f"model: unknown network {c.model!r}{_did_you_mean(c.model, names)} (valid: {', '.join(names)})")
    if c.initialize_label_with_another_model and c.initialize_label_model not in names:
        p.append(
            f"{_label('initialize_label_model')}: unknown network {c.initialize_label_model!r}"
            f"{_did_you_mean(c.initialize_label_model, names)} (needed because "
            f"{_TO_UPSTREAM['initialize_label_with_another_model']} is true)"
        )

    from ..augment import DSA_GROUPS

    if c.dsa_strategy not in ("", "none", "None"):
        groups = c.dsa_strategy.split("_")
        bad = [g for g in groups if g not in DSA_GROUPS]
        if bad:
            hints = "".join(_did_you_mean(g, DSA_GROUPS) for g in bad[:1])
            p.append(
                f"dsa_strategy: unknown DSA group(s) {', '.join(map(repr, bad))} in {c.dsa_strategy!r}{hints} "
                f"(groups: {', '.join(DSA_GROUPS)}, joined by '_'; or 'none')"
            )
        elif len(set(groups)) != len(groups):
            p.append(f"dsa_strategy: a DSA group is repeated in {c.dsa_strategy!r}")

    if c.device != "auto":
        import torch

        try:
            torch.device(c.device)  # parses only; initialises nothing
        except (RuntimeError, ValueError):
            p.append(f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got {c.device!r}")
    return p


# ---- reading -------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that records keys given twice (YAML keeps the last one, as upstream does)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int]] = []


def _mapping_with_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                loader.duplicates.append((key, key_node.start_mark.line + 1))
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping reports it
            pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_duplicates)


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source) from None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        _warn(f"{source}: key {key!r} is given more than once (line {line}); the last value is used, as upstream does")
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping of keys to values"
        raise ConfigError([f"the file is {what}"], source)
    return data


def _shipped_dir():
    return resources.files("datm_fast").joinpath("configs")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_configs() -> tuple[str, ...]:
    """Names of the configs shipped in ``datm_fast/configs/`` (paper values), e.g. ``"cifar10-ipc10"``."""
    d = _shipped_dir()
    if not d.is_dir():
        return ()
    names = [e.name[: -len(".yaml")] for e in d.iterdir() if e.name.endswith(".yaml")]
    return tuple(sorted(names, key=_natural))


def _read(source: Any) -> tuple[dict[str, Any], str]:
    """(raw mapping, label for messages) of a mapping, a shipped config name or a YAML path."""
    if isinstance(source, Mapping):
        return dict(source), "<mapping>"
    if isinstance(source, DistillConfig):
        return source.to_dict(), "<DistillConfig>"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_config: expected a config name, a path or a mapping, got {type(source).__name__}")
    if isinstance(source, str) and source in list_configs():
        entry = _shipped_dir().joinpath(source + ".yaml")
        return _parse_yaml(entry.read_text(encoding="utf-8"), f"config {source!r}"), f"config {source!r}"
    path = Path(source).expanduser()
    s = os.fspath(source)
    looks_like_path = isinstance(source, os.PathLike) or os.sep in s or path.suffix.lower() in (".yaml", ".yml")
    if not path.is_file():
        if looks_like_path:
            raise ConfigError([f"config file not found: {s}"])
        shipped = list_configs()
        raise ConfigError(
            [f"no config named {s!r}{_did_you_mean(s, shipped)} (shipped: {', '.join(shipped)}; or give a YAML path)"]
        )
    return _parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path)


def _warn(message: str) -> None:
    warnings.warn(message, ConfigWarning, stacklevel=4)


def _is_gpu_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    )


def _normalise(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map every key of ``raw`` to a field name; warn on ignored and legacy keys; error on unknown ones."""
    out: dict[str, Any] = {}
    written_as: dict[str, str] = {}
    problems: list[str] = []
    valid = _FIELD_NAMES + tuple(_ALIASES) + tuple(_LEGACY) + tuple(IGNORED_KEYS)
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
            continue
        if key in IGNORED_KEYS:
            _warn(f"{source}: key {key!r} is ignored: {IGNORED_KEYS[key]}")
            continue
        if key == "device" and _is_gpu_list(value):
            _warn(
                f"{source}: upstream's device: {list(value)} (GPU ids for CUDA_VISIBLE_DEVICES) is ignored; datm_fast "
                "runs on one device: set device to 'cuda:N', 'cpu' or 'auto', or set CUDA_VISIBLE_DEVICES yourself"
            )
            continue
        if key in _LEGACY:
            name = _LEGACY[key]
            _warn(f"{source}: {key!r} is an older upstream name, read as {name!r}")
        elif key in _ALIASES:
            name = _ALIASES[key]
        elif key in _FIELD_NAMES:
            name = key
        else:
            problems.append(f"unknown key {key!r}{_did_you_mean(key, valid)}")
            continue
        if name in out:
            problems.append(f"{name} is given twice, as {written_as[name]!r} and as {key!r}")
            continue
        if name == "eval_mode" and isinstance(value, str) and value not in _EVAL_MODES:
            _warn(
                f"{source}: eval_mode {value!r} is not one of {', '.join(_EVAL_MODES)}; like upstream, only the "
                "distilled model itself is evaluated"
            )
        out[name] = value
        written_as[name] = key
    if problems:
        raise ConfigError(problems, source)
    return out


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | DistillConfig, **overrides: Any) -> DistillConfig:
    """Read a DATM config and check it, then apply ``overrides`` (later wins).

    Args:
        source: a shipped config name (:func:`list_configs`, e.g. ``"cifar10-ipc10"``), a path to a
            YAML file (upstream's ``configs/**/*.yaml`` load as they are), or a mapping of keys to values.
        overrides: more keys, in either spelling (``lr_img=50``, ``Iteration=100``).

    Returns the :class:`DistillConfig`. Raises :class:`ConfigError` (a ``ValueError``) for unknown
    keys (with the closest valid key), wrong types and impossible values, listing every problem.
    Ignored and legacy upstream keys give a :class:`ConfigWarning`. The YAML is parsed with a
    ``yaml.SafeLoader`` (as ``yaml.safe_load``) that also reports keys given twice.
    """
    raw, label = _read(source)
    values = _normalise(raw, label)
    values.update(_normalise(overrides, "overrides") if overrides else {})
    try:
        return DistillConfig(**values)
    except ConfigError as e:
        raise ConfigError(e.problems, label) from None


# ---- checks against the data ---------------------------------------------------------------------------------------


def validate_against(
    config: DistillConfig,
    *,
    buffer_epochs: int,
    class_sizes: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> None:
    """Check ``config`` against the expert buffer and the real data before any work starts.

    Args:
        buffer_epochs: epochs each expert was trained for, i.e. ``len(trajectory) - 1``. Upstream's
            ``buffer_FTD.py`` saves the initialisation as checkpoint 0 and then one checkpoint per epoch.
        class_sizes: real training images per class, in class order.
        class_names: optional names for the messages.

    Raises :class:`ConfigError` listing every problem:

    * the largest target epoch, ``max_start_epoch - 1 + expert_epochs``, is beyond ``buffer_epochs``
      (upstream fails with an IndexError when it first draws such a start epoch);
    * ``label_model_timestamp`` is not a checkpoint index of the buffer (with ``samples_predicted_correctly``);
    * a class has fewer than ``ipc`` real images (the class is named).

    Whether every class has ``ipc`` images that an expert classifies correctly
    (``pix_init: samples_predicted_correctly``) can only be known with the experts loaded. Upstream
    loops forever when a class has too few.
    """
    if isinstance(buffer_epochs, bool) or not isinstance(buffer_epochs, numbers.Integral) or buffer_epochs < 0:
        raise ValueError(f"buffer_epochs must be an int >= 0, got {buffer_epochs!r}")
    p: list[str] = []
    last_target = config.max_start_epoch - 1 + config.expert_epochs
    if last_target > buffer_epochs:
        p.append(
            f"max_start_epoch ({config.max_start_epoch}) and expert_epochs ({config.expert_epochs}) need expert "
            f"epochs up to {last_target} (start epochs reach max_start_epoch - 1 = {config.max_start_epoch - 1}, "
            f"targets are expert_epochs later), but the buffer has {buffer_epochs} epochs: lower max_start_epoch to "
            f"at most {buffer_epochs - config.expert_epochs + 1} or train the experts for {last_target} epochs"
        )
    ts = config.label_model_timestamp
    if config.pix_init == "samples_predicted_correctly" and not -(buffer_epochs + 1) <= ts <= buffer_epochs:
        p.append(
            f"{_label('label_model_timestamp')} = {ts} is not a checkpoint of the buffer "
            f"(indices -{buffer_epochs + 1}..{buffer_epochs})"
        )
    sizes = list(class_sizes)
    if not sizes:
        p.append("class_sizes is empty: the dataset has no classes")
    if class_names is not None and len(class_names) != len(sizes):
        raise ValueError(f"class_names has {len(class_names)} names for {len(sizes)} classes")
    small = [(c, int(n)) for c, n in enumerate(sizes) if n < config.ipc]
    if small:
        shown = ", ".join(
            f"class {c}" + (f" ({class_names[c]!r})" if class_names is not None else "") + f" has {n}"
            for c, n in small[:10]
        )
        more = f" and {len(small) - 10} more classes" if len(small) > 10 else ""
        p.append(f"ipc = {config.ipc} is more images than some classes have: {shown}{more}")
    if p:
        raise ConfigError(p)


# ---- schedule ------------------------------------------------------------------------------------------------------


def _iteration(iteration: Any) -> int:
    if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral) or iteration < 0:
        raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    return int(iteration)


def start_epoch_upper(config: DistillConfig, iteration: int) -> int:
    """Upper bound (excluded) of the start epochs drawn at ``iteration``. This is DATM's difficulty window.

    With ``sequential_generation`` the window widens linearly. The bound starts at
    ``current_max_start_epoch`` at iteration 0 and reaches ``max_start_epoch`` after
    ``expansion_end_epoch`` iterations. Without it the bound is ``max_start_epoch`` throughout.
    ``iteration`` is upstream's loop counter ``it``, which counts every iteration, whether or not
    its update was skipped by ``threshold``. Upstream recomputes the bound at every iteration.

    Equivalent upstream code (``distill/DATM.py``)::

        if args.Sequential_Generation:
            Upper_Bound = args.current_max_start_epoch + int(
                (args.max_start_epoch - args.current_max_start_epoch) * it / args.expansion_end_epoch)
            Upper_Bound = min(Upper_Bound, args.max_start_epoch)
        else:
            Upper_Bound = args.max_start_epoch
    """
    it = _iteration(iteration)
    if not config.sequential_generation:
        return config.max_start_epoch
    cur, top = config.current_max_start_epoch, config.max_start_epoch
    return min(cur + int((top - cur) * it / config.expansion_end_epoch), top)


def sample_start_epoch(config: DistillConfig, iteration: int, generator: Any) -> int:
    """Draw the start epoch for ``iteration``: uniform on ``[min_start_epoch, start_epoch_upper(...))``.

    The upper bound is never drawn, as in upstream's ``np.random.randint(args.min_start_epoch, Upper_Bound)``.
    ``generator`` is a ``torch.Generator`` (a CPU one avoids a device sync), a ``numpy.random.Generator``
    or a ``numpy.random.RandomState``. A ``RandomState`` in the state of upstream's global numpy RNG
    draws what upstream draws. There is no global-RNG fallback.
    """
    low, high = config.min_start_epoch, start_epoch_upper(config, iteration)
    import numpy as np
    import torch

    if isinstance(generator, torch.Generator):
        return int(torch.randint(low, high, (1,), generator=generator, device=generator.device).item())
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(low, high))
    if isinstance(generator, np.random.RandomState):
        return int(generator.randint(low, high))
    raise TypeError(
        "sample_start_epoch: generator must be a torch.Generator, numpy.random.Generator or "
        f"numpy.random.RandomState, got {type(generator).__name__}"
    )


def eval_iterations(config: DistillConfig) -> list[int]:
    """Iterations at which upstream evaluates the set (before that iteration's update).

    Equivalent upstream code::

        start = args.eval_it if args.skip_first_eva else 0
        eval_it_pool = np.arange(start, args.Iteration + 1, args.eval_it).tolist()
    """
    start = config.eval_it if config.skip_first_eval else 0
    return list(range(start, config.iterations + 1, config.eval_it))


def eval_models(config: DistillConfig) -> tuple[str, ...]:
    """Networks that evaluate the set, by ``eval_mode``, as upstream's ``get_eval_pool``.

    ``S``: the distilled model, with any ``BN`` suffix and what follows cut off (``ConvNetBN`` ->
    ``ConvNet``). ``C``: the model and ``ConvNet``. ``M``/``W``/``D``/``A``/``P``/``N``/``BN``: fixed
    pools. Any other mode: the model alone, as upstream does.
    """
    model, mode = config.model, config.eval_mode
    if mode == "S":
        return (model[: model.index("BN")],) if "BN" in model else (model,)
    if mode == "C":
        return (model, "ConvNet")
    return _EVAL_POOLS.get(mode, (model,))


def effective_batch_syn(config: DistillConfig, num_classes: int) -> int:
    """Synthetic images per inner step: ``batch_syn`` capped at the set size (None = the whole set).

    Upstream takes the steps' batches from ``torch.split(randperm(n), batch_syn)`` and pops the
    *last* chunk first. When ``batch_syn`` does not divide ``n``, the first step of each permutation
    therefore gets the short remainder chunk.
    """
    n = num_classes * config.ipc
    return n if config.batch_syn is None else min(config.batch_syn, n)
