"""DATM's configuration: every key of upstream's YAML configs, in sections, checked before any work starts.

Upstream (NUS-HPC-AI-Lab/DATM) merges a YAML file into the yacs defaults of ``utils/cfg.py`` and turns
every key into an argparse flag. It checks nothing. A start epoch beyond the expert buffer, a class
with fewer images than ``ipc`` or ``pix_init: noise`` all fail minutes or hours into a run, and
some mistakes (an unknown ``eval_mode``) fail silently. Here a frozen :class:`DistillConfig` holds all
of DATM's keys plus datm_fast's own, in sections (frozen dataclasses, :mod:`datm_fast.distill.settings`):

=============  =====================================================================================
``data``       what is distilled: dataset, ZCA, where the data are (:class:`DataSection`)
``matching``   the trajectories matched: the student, its unroll, the start-epoch window, DSA
``learning``   what is learned and how fast: the set's size and initialisation, the learning rates
``engine``     how the unroll's gradient is computed (:class:`~datm_fast.distill.unroll.EngineOptions`)
``schedule``   iterations, evaluation points, checkpoints
``evaluation`` how a candidate set is evaluated during distillation
``run``        seed, device and files
=============  =====================================================================================

Files and overrides stay flat, as upstream writes them (``ipc: 10``, ``Iteration: 5000``); each key
belongs to exactly one section, and ``config.ipc`` reads ``config.learning.ipc``. :func:`load_config`
reads upstream's files as they are and raises a :class:`ConfigError` before any work starts. The error
names the key, the value and what was expected, and for an unknown key it suggests the closest valid
one. Everything a key needs (its section, upstream spelling, check, whether it is a placement key, its
``datm-fast distill`` flag) is declared once, on its field.

Example::

    from datm_fast.distill.config import load_config, validate_against, sample_start_epoch

    cfg = load_config("cifar10-ipc10")                       # a shipped config, paper values
    cfg = load_config("DATM/configs/CIFAR-10/ConvIN/IPC10.yaml", lr_img=50, seed=1)  # upstream file
    cfg.learning.lr_img, cfg.lr_img                          # 50.0 50.0
    validate_against(cfg, buffer_epochs=50, class_sizes=[5000] * 10)
    start = sample_start_epoch(cfg, iteration=0, generator=torch.Generator().manual_seed(cfg.seed))

Keys. Fields are snake_case. Upstream's spellings are aliases: ``Iteration``, ``Sequential_Generation``,
``Momentum_y``, ``skip_first_eva`` and ``Label_Model_Timestamp``. Giving both spellings of a key is an
error. Older upstream configs name the window ``Initial_Step`` (= ``current_max_start_epoch``) and
``learn_end_epoch`` (= ``expansion_end_epoch``; an intermediate ``DATM.py`` uses it in the same formula).
These are read as the new names, with a :class:`ConfigWarning`. Keys that datm_fast does not act on
(:data:`IGNORED_KEYS`: FTD's and MTT's leftovers that ``distill/DATM.py`` never reads, and a few it reads
that mean nothing here, such as ``load_all`` and ``parall_eva``) are accepted and dropped, with a
:class:`ConfigWarning` where the value given would have changed upstream's run. Upstream's
``device: [0, 1]`` (a list of GPUs for ``CUDA_VISIBLE_DEVICES``) is dropped with a warning too.
datm_fast runs on the one device that the string key ``device`` names. A key that YAML gives twice keeps
its last value, as upstream does, and gives a warning.

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
import numbers
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

import yaml

from ..augment import DSA_GROUPS
from ..data import DataSpec
from ..models import EVAL_POOLS, network_names
from ..utils import atomic_write
from .settings import (
    ConfigError,
    ConfigWarning,
    Section,
    above,
    at_least,
    did_you_mean,
    label,
    section_keys,
    setting,
    within,
)
from .unroll import EngineOptions

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "DataSection",
    "DistillConfig",
    "EvaluationSection",
    "IGNORED_KEYS",
    "IgnoredKey",
    "KEYS",
    "LearningSection",
    "MatchingSection",
    "OWN_KEYS",
    "PLACEMENT_KEYS",
    "RunSection",
    "ScheduleSection",
    "UPSTREAM_KEYS",
    "add_config_flags",
    "effective_batch_syn",
    "eval_iterations",
    "eval_models",
    "flag_overrides",
    "list_configs",
    "load_config",
    "sample_start_epoch",
    "start_epoch_upper",
    "validate_against",
]

PixInit = Literal["real", "noise", "samples_predicted_correctly"]

# eval_mode: S and C depend on the model (eval_models); the others name a fixed pool of networks
_EVAL_MODES: tuple[str, ...] = ("S", "C") + tuple(EVAL_POOLS)


# ---- the sections --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSection(Section):
    """What is distilled. The data a run used is recorded as a :class:`~datm_fast.data.DataSpec` in its
    ``run.json`` (and a native buffer's manifest); :meth:`spec` makes one from these keys."""

    dataset: str = setting(
        "CIFAR10", path=True, help="dataset name or path for datm_fast.data.load_dataset (case-insensitive: CIFAR10)"
    )
    subset: str = setting("imagenette", help="ImageNet class subset; read only when dataset is ImageNet (upstream)")
    res: int = setting(32, check=at_least(1), help="image side, px; upstream reads it only in ImageNet's buffer path")
    zca: bool = setting(True, help="ZCA-whiten the real data (eps 0.1, fit on train), as the experts must have been")
    data_path: str = setting("../dataset/", path=True, placement=True, help="folder dataset names resolve against")

    def relations(self) -> list[str]:
        return [] if self.dataset.strip() else [f"dataset must be a dataset name or path, got {self.dataset!r}"]

    def spec(self, root: str | os.PathLike[str] | None = None) -> DataSpec:
        """The data these keys name, under ``root`` (default ``data_path``): ZCA or per-channel normalisation."""
        return DataSpec(
            self.dataset,
            root=os.fspath(root) if root is not None else self.data_path,
            preprocessing="zca" if self.zca else "normalize",
        )


@dataclass(frozen=True)
class MatchingSection(Section):
    """The expert trajectories matched, and the student's unroll that matches them."""

    model: str = setting("ConvNet", help="network distilled with: datm_fast.models.network_names() (ConvNetD4: 64 px)")
    syn_steps: int = setting(80, check=at_least(1), help="student SGD steps on the synthetic set per iteration (N)")
    expert_epochs: int = setting(
        2, check=at_least(1), help="target = expert checkpoint at start_epoch + expert_epochs (M), in epochs"
    )
    min_start_epoch: int = setting(
        0, check=at_least(0), help="start epochs are drawn uniformly from [min_start_epoch, upper), upper excluded"
    )
    current_max_start_epoch: int = setting(20, help="upper at iteration 0 (only with sequential_generation), epochs")
    max_start_epoch: int = setting(25, help="final upper, and its cap: the largest start epoch drawn is this - 1")
    sequential_generation: bool = setting(
        True, upstream="Sequential_Generation", help="upper grows linearly from current_max to max_start_epoch"
    )
    expansion_end_epoch: int = setting(
        3000, help="iterations (not epochs, despite the name) for upper to reach max_start_epoch"
    )
    batch_syn: int | None = setting(
        None, check=at_least(1), help="synthetic images per inner step; null = the whole set (num_classes * ipc)"
    )
    threshold: float = setting(
        1.0,
        check=above(0, "the matching loss is >= 0; a threshold <= 0 skips every update"),
        help="images, lr and labels are updated only when the matching loss is <= threshold",
    )
    dsa: bool = setting(True, help="Differentiable Siamese Augmentation in the inner loop and at evaluation")
    dsa_strategy: str = setting(
        "color_crop_cutout_flip_scale_rotate", help="'_'-joined DSA groups (datm_fast.augment), or none"
    )
    no_aug: bool = setting(False, help="no DSA in the inner loop (evaluation still augments when dsa)")
    max_files: int | None = setting(
        None, check=at_least(1), help="match only the experts of the buffer's first max_files files; null = all"
    )
    max_experts: int | None = setting(
        None, check=at_least(1), help="match only the first max_experts experts of each file; null = all"
    )
    segments: int = setting(
        1,
        check=at_least(1),
        help="expert segments matched per iteration, their losses averaged: 1 as DATM; more is datm_fast's change "
        "of algorithm (several ranks each match their own segments)",
    )

    def relations(self) -> list[str]:
        p: list[str] = []
        # the start-epoch window: randint(min_start_epoch, upper) needs upper > min_start_epoch at every iteration
        if self.max_start_epoch <= self.min_start_epoch:
            p.append(
                f"min_start_epoch must be < max_start_epoch (start epochs are drawn from "
                f"[min_start_epoch, max_start_epoch)), got {self.min_start_epoch} and {self.max_start_epoch}"
            )
        elif self.sequential_generation and not (
            self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch
        ):
            p.append(
                f"current_max_start_epoch must be in ({self.min_start_epoch}, {self.max_start_epoch}] = "
                f"(min_start_epoch, max_start_epoch] when sequential_generation is on (the window at iteration 0 "
                f"is [min_start_epoch, current_max_start_epoch)), got {self.current_max_start_epoch}"
            )
        if self.sequential_generation and self.expansion_end_epoch < 1:
            p.append(
                f"expansion_end_epoch must be >= 1 iteration when sequential_generation is on, "
                f"got {self.expansion_end_epoch}"
            )
        names = network_names()
        if self.model not in names:
            p.append(
                f"model: unknown network {self.model!r}{did_you_mean(self.model, names)} (valid: {', '.join(names)})"
            )
        if self.dsa_strategy not in ("", "none", "None"):
            groups = self.dsa_strategy.split("_")
            bad = [g for g in groups if g not in DSA_GROUPS]
            if bad:
                hints = "".join(did_you_mean(g, DSA_GROUPS) for g in bad[:1])
                p.append(
                    f"dsa_strategy: unknown DSA group(s) {', '.join(map(repr, bad))} in {self.dsa_strategy!r}{hints} "
                    f"(groups: {', '.join(DSA_GROUPS)}, joined by '_'; or 'none')"
                )
            elif len(set(groups)) != len(groups):
                p.append(f"dsa_strategy: a DSA group is repeated in {self.dsa_strategy!r}")
        return p


@dataclass(frozen=True)
class LearningSection(Section):
    """What is learned (the set, its labels, the student's lr) and how fast."""

    ipc: int = setting(1, check=at_least(1), help="synthetic images per class; the set has num_classes * ipc images")
    pix_init: PixInit = setting(
        "samples_predicted_correctly", help="images experts classify right | real (random) | noise (N(0, 1))"
    )
    label_model_timestamp: int = setting(
        -1,
        upstream="Label_Model_Timestamp",
        help="expert checkpoint (epoch index, -1 = last) that picks the images and gives the logits",
    )
    lr_img: float = setting(
        1000.0, check=at_least(0, "an SGD learning rate"), help="SGD lr of the images (momentum 0.5)"
    )
    lr_teacher: float = setting(
        0.01,
        check=above(0, "the student's initial SGD lr"),
        help="initial value of the learned student lr (alpha), per inner SGD step",
    )
    lr_lr: float = setting(
        1e-5, check=at_least(0, "an SGD learning rate"), help="SGD lr of the learned lr (momentum 0.5)"
    )
    lr_y: float = setting(
        2.0, check=at_least(0, "an SGD learning rate"), help="SGD lr of the soft labels (logits), momentum momentum_y"
    )
    momentum_y: float = setting(0.9, upstream="Momentum_y", check=within(0, 1), help="SGD momentum of the soft labels")


@dataclass(frozen=True)
class ScheduleSection(Section):
    """How long the run is, when it evaluates and when it checkpoints."""

    iterations: int = setting(
        5000,
        upstream="Iteration",
        check=at_least(0),
        flag=True,
        help="the loop runs it = 0 .. iterations inclusive, i.e. iterations + 1 updates",
    )
    eval_it: int = setting(100, check=at_least(1), help="evaluate every eval_it iterations (see eval_iterations)")
    skip_first_eval: bool = setting(False, upstream="skip_first_eva", help="no evaluation at iteration 0")
    checkpoint_every: int = setting(
        500, own=True, placement=True, check=at_least(0), help="iterations between resumable checkpoints; 0 = none"
    )


@dataclass(frozen=True)
class EvaluationSection(Section):
    """How a candidate set is evaluated during distillation (DATM's protocol, datm_fast.evaluate)."""

    num_eval: int = setting(5, check=at_least(1), help="networks trained from scratch per evaluation")
    epoch_eval_train: int = setting(
        1000, check=at_least(0), help="evaluation training length; upstream trains epoch_eval_train + 1 epochs"
    )
    batch_train: int = setting(256, check=at_least(1), help="evaluation batch size, images")
    eval_mode: str = setting(
        "S", help="which networks evaluate the set: S (the model, minus BN), C, M, W, D, A, P, N, BN (eval_models)"
    )


@dataclass(frozen=True)
class RunSection(Section):
    """Seed, device and files: where a run goes, and which random draws it makes."""

    seed: int = setting(
        0,
        own=True,
        check=at_least(0),
        flag=True,
        help="seeds every random draw of the run (upstream reseeds from the clock)",
    )
    device: str = setting(
        "auto", own=True, placement=True, flag=True, help="torch device (cuda, cuda:1, cpu); auto: cuda when available"
    )
    out_dir: str | None = setting(
        None, own=True, placement=True, path=True, help="run directory (config, checkpoints, sets); null: the caller's"
    )
    buffer_path: str = setting(
        "../buffer_storage/",
        path=True,
        placement=True,
        help="root of the expert buffers: the experts are <buffer_path>/<dataset>/<model> (see expert_dir)",
    )
    project: str = setting("TEST", placement=True, help="experiment-tracker project name (upstream: the wandb project)")
    force_save: bool = setting(False, placement=True, help="send image grids to the trackers also when ipc >= 50")

    def relations(self) -> list[str]:
        if self.device == "auto":
            return []
        import torch

        try:
            torch.device(self.device)  # parses only; initialises nothing
        except (RuntimeError, ValueError):
            return [f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}"]
        return []


#: The sections of :class:`DistillConfig`, in order: attribute name -> section class.
SECTIONS: Mapping[str, type[Section]] = MappingProxyType(
    {
        "data": DataSection,
        "matching": MatchingSection,
        "learning": LearningSection,
        "engine": EngineOptions,
        "schedule": ScheduleSection,
        "evaluation": EvaluationSection,
        "run": RunSection,
    }
)

#: Every key: name -> (section attribute, field). Derived from the sections' fields.
KEYS: Mapping[str, tuple[str, dataclasses.Field]] = MappingProxyType(
    {name: (section, f) for section, cls in SECTIONS.items() for name, f in section_keys(cls).items()}
)
#: datm_fast's own keys, not present upstream.
OWN_KEYS: tuple[str, ...] = tuple(k for k, (_, f) in KEYS.items() if f.metadata["own"])
#: Keys that say where and how fast a run goes, not what it computes.
PLACEMENT_KEYS: tuple[str, ...] = tuple(k for k, (_, f) in KEYS.items() if f.metadata["placement"])

# upstream spelling -> key, for the keys whose spelling differs
_ALIASES = MappingProxyType({f.metadata["upstream"]: k for k, (_, f) in KEYS.items() if f.metadata["upstream"]})

# older upstream spellings (early configs/ and utils/cfg.py), read as today's keys with a warning
_LEGACY = MappingProxyType({"Initial_Step": "current_max_start_epoch", "learn_end_epoch": "expansion_end_epoch"})


class IgnoredKey(NamedTuple):
    """A key datm_fast accepts and drops: why, and the values under which dropping it changes nothing."""

    why: str
    inert: tuple[Any, ...] = ()  # values that give no warning (none: every value warns)
    always_inert: bool = False  # no value warns (read only together with another ignored key)

    def warns(self, value: Any) -> bool:
        """Whether dropping ``value`` changes what upstream would have run (then a ConfigWarning says so)."""
        return not self.always_inert and value not in self.inert


#: Keys that datm_fast accepts and drops (:class:`IgnoredKey`). FTD's and MTT's leftovers warn whatever
#: their value; keys DATM reads but that mean nothing here warn only when set to change upstream's run.
IGNORED_KEYS: Mapping[str, IgnoredKey] = MappingProxyType(
    {
        "ema_decay": IgnoredKey("an EMA of the synthetic images is FTD's; DATM never reads it"),
        "lr_init": IgnoredKey("an MTT leftover; DATM starts the learned lr at lr_teacher"),
        "batch_real": IgnoredKey("it only sizes per-class ImageNet loaders that DATM never uses"),
        "texture": IgnoredKey("MTT's texture distillation; DATM never reads it"),
        "canvas_size": IgnoredKey("MTT's texture distillation; DATM never reads it"),
        "canvas_samples": IgnoredKey("MTT's texture distillation; DATM never reads it"),
        "record_loss": IgnoredKey("DATM never reads it"),
        "Initialize_Label_Model_Dir": IgnoredKey("DATM never reads it (label experts come from buffer_path)"),
        "load_all": IgnoredKey("datm_fast memory-maps the expert files and reads one epoch at a time", (False,)),
        "parall_eva": IgnoredKey(
            "datm_fast trains the evaluation runs together on one device (EvalConfig.parallel_runs)", (False,)
        ),
        "Initialize_Label_With_Another_Model": IgnoredKey(
            "datm_fast initialises the images and labels with the distilled model's own experts", (False,)
        ),
        "Initialize_Label_Model": IgnoredKey("read only with Initialize_Label_With_Another_Model", always_inert=True),
    }
)
# snake_case spellings of ignored upstream keys (what earlier datm_fast versions wrote in config.yaml)
_IGNORED_SPELLINGS = MappingProxyType(
    {
        "parallel_eval": "parall_eva",
        "initialize_label_with_another_model": "Initialize_Label_With_Another_Model",
        "initialize_label_model": "Initialize_Label_Model",
    }
)

#: Every key of upstream's final ``utils/cfg.py`` (the spellings its YAML files use).
UPSTREAM_KEYS: tuple[str, ...] = (
    tuple(f.metadata["upstream"] or k for k, (_, f) in KEYS.items() if not f.metadata["own"])
    + ("device",)
    + tuple(IGNORED_KEYS)
)


# ---- the config ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillConfig:
    """Every setting of one DATM distillation run, in sections. Frozen: derive variants with :meth:`replace`.

    Build it with :func:`load_config`, which takes flat keys in either spelling and checks them
    (``DistillConfig.from_keys(ipc=10)`` does the same for keyword arguments). Defaults are upstream's
    ``utils/cfg.py``. A key reads from its section or from the config itself: ``config.learning.ipc``
    and ``config.ipc`` are the same value.
    """

    data: DataSection = field(default_factory=DataSection)
    matching: MatchingSection = field(default_factory=MatchingSection)
    learning: LearningSection = field(default_factory=LearningSection)
    engine: EngineOptions = field(default_factory=EngineOptions)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    run: RunSection = field(default_factory=RunSection)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a flat key, read from its section.
        where = KEYS.get(name)
        if where is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} has no attribute or config key {name!r}")
        return getattr(object.__getattribute__(self, where[0]), name)

    @classmethod
    def from_keys(cls, source: str | None = None, **values: Any) -> DistillConfig:
        """A config from flat keys (today's spellings), every problem of every section in one ConfigError."""
        unknown = [k for k in values if k not in KEYS]
        if unknown:
            raise ConfigError([f"unknown key {k!r}{did_you_mean(k, list(KEYS))}" for k in unknown], source)
        sections: dict[str, Section] = {}
        problems: list[str] = []
        for name, section_cls in SECTIONS.items():
            own = {k: v for k, v in values.items() if KEYS[k][0] == name}
            try:
                sections[name] = section_cls(**own)
            except ConfigError as e:
                problems += e.problems
        if problems:
            raise ConfigError(problems, source)
        return cls(**sections)  # type: ignore[arg-type]

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget_gb`` in bytes (GiB = 2**30)."""
        return self.engine.memory_budget_bytes

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` of every key, section by section."""
        for name in SECTIONS:
            section = getattr(self, name)
            for key in section_keys(type(section)):
                yield key, getattr(section, key)

    def to_dict(self, *, upstream: bool = False) -> dict[str, Any]:
        """Plain flat ``{key: value}``, section by section. :func:`load_config` reads it back to an equal config.

        ``upstream=True`` gives upstream's key spellings (``Iteration``, ``Momentum_y``, ...) without
        datm_fast's own keys (:data:`OWN_KEYS`). Floats stay floats: upstream's yacs would reject
        ``lr_img: 100.0`` (its default is an int), so write ``lr_img`` as an int to feed upstream.
        """
        out = dict(self.items())
        if not upstream:
            return out
        return {KEYS[k][1].metadata["upstream"] or k: v for k, v in out.items() if k not in OWN_KEYS}

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """YAML text of :meth:`to_dict`. When ``path`` is given, also write it there atomically."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            with atomic_write(path, "w") as f:
                f.write(text)
        return text

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with ``changes`` (flat keys, upstream spellings too) applied, checked like :func:`load_config`."""
        return DistillConfig.from_keys("replace()", **{**self.to_dict(), **_normalise(changes, "replace()")})

    def differences(self, other: DistillConfig, *, placement: bool = False) -> list[str]:
        """The keys whose values differ from ``other``'s; placement keys (:data:`PLACEMENT_KEYS`) only with
        ``placement=True``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if mine[k] != theirs[k] and (placement or k not in PLACEMENT_KEYS)]

    def expert_dir(self) -> Path:
        """Where upstream's ``DATM.py`` reads the experts: ``<buffer_path>/<dataset>/<model>``, with
        ``<subset>/<res>`` after the dataset for ImageNet."""
        path = Path(self.run.buffer_path).expanduser() / self.data.dataset
        if self.data.dataset == "ImageNet":
            path = path / self.data.subset / str(self.data.res)
        return path / self.matching.model


# ---- command-line flags --------------------------------------------------------------------------------------------
def _flag_dest(key: str) -> str:
    return f"config_key_{key}"


def add_config_flags(parser: Any) -> None:
    """Add a ``--key`` option (an ``argparse`` parser's) for every key declared with ``flag=True``, its
    help and choices taken from the key's declaration; :func:`flag_overrides` reads them back."""
    for key, (section, f) in KEYS.items():
        if not f.metadata["flag"]:
            continue
        hint = get_type_hints(SECTIONS[section])[key]
        choices = get_args(hint) if get_origin(hint) is Literal else None
        parser.add_argument(
            "--" + key.replace("_", "-"),
            dest=_flag_dest(key),
            default=None,
            choices=choices,
            metavar=None if choices else key.upper(),
            help=f"{f.metadata['help']} (config key {key})",
        )


def flag_overrides(args: Any) -> dict[str, Any]:
    """The config keys given as ``--key`` options (see :func:`add_config_flags`); values are checked by
    :func:`load_config`."""
    return {
        key: getattr(args, _flag_dest(key))
        for key, (_, f) in KEYS.items()
        if f.metadata["flag"] and getattr(args, _flag_dest(key), None) is not None
    }


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
            [f"no config named {s!r}{did_you_mean(s, shipped)} (shipped: {', '.join(shipped)}; or give a YAML path)"]
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
    valid = tuple(KEYS) + tuple(_ALIASES) + tuple(_LEGACY) + tuple(IGNORED_KEYS)
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
            continue
        if key in IGNORED_KEYS or key in _IGNORED_SPELLINGS:
            ignored = IGNORED_KEYS[_IGNORED_SPELLINGS.get(key, key)]
            if ignored.warns(value):
                _warn(f"{source}: key {key!r} is ignored: {ignored.why}")
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
        elif key in KEYS:
            name = key
        else:
            problems.append(f"unknown key {key!r}{did_you_mean(key, valid)}")
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
    raw, where = _read(source)
    values = _normalise(raw, where)
    values.update(_normalise(overrides, "overrides") if overrides else {})
    return DistillConfig.from_keys(where, **values)


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
    m, learning = config.matching, config.learning
    last_target = m.max_start_epoch - 1 + m.expert_epochs
    if last_target > buffer_epochs:
        p.append(
            f"max_start_epoch ({m.max_start_epoch}) and expert_epochs ({m.expert_epochs}) need expert "
            f"epochs up to {last_target} (start epochs reach max_start_epoch - 1 = {m.max_start_epoch - 1}, "
            f"targets are expert_epochs later), but the buffer has {buffer_epochs} epochs: lower max_start_epoch to "
            f"at most {buffer_epochs - m.expert_epochs + 1} or train the experts for {last_target} epochs"
        )
    ts = learning.label_model_timestamp
    if learning.pix_init == "samples_predicted_correctly" and not -(buffer_epochs + 1) <= ts <= buffer_epochs:
        p.append(
            f"{label(KEYS['label_model_timestamp'][1])} = {ts} is not a checkpoint of the buffer "
            f"(indices -{buffer_epochs + 1}..{buffer_epochs})"
        )
    sizes = list(class_sizes)
    if not sizes:
        p.append("class_sizes is empty: the dataset has no classes")
    if class_names is not None and len(class_names) != len(sizes):
        raise ValueError(f"class_names has {len(class_names)} names for {len(sizes)} classes")
    small = [(c, int(n)) for c, n in enumerate(sizes) if n < learning.ipc]
    if small:
        shown = ", ".join(
            f"class {c}" + (f" ({class_names[c]!r})" if class_names is not None else "") + f" has {n}"
            for c, n in small[:10]
        )
        more = f" and {len(small) - 10} more classes" if len(small) > 10 else ""
        p.append(f"ipc = {learning.ipc} is more images than some classes have: {shown}{more}")
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
    m = config.matching
    if not m.sequential_generation:
        return m.max_start_epoch
    cur, top = m.current_max_start_epoch, m.max_start_epoch
    return min(cur + int((top - cur) * it / m.expansion_end_epoch), top)


def sample_start_epoch(config: DistillConfig, iteration: int, generator: Any) -> int:
    """Draw the start epoch for ``iteration``: uniform on ``[min_start_epoch, start_epoch_upper(...))``.

    The upper bound is never drawn, as in upstream's ``np.random.randint(args.min_start_epoch, Upper_Bound)``.
    ``generator`` is a ``torch.Generator`` (a CPU one avoids a device sync), a ``numpy.random.Generator``
    or a ``numpy.random.RandomState``. A ``RandomState`` in the state of upstream's global numpy RNG
    draws what upstream draws. There is no global-RNG fallback.
    """
    low, high = config.matching.min_start_epoch, start_epoch_upper(config, iteration)
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
    schedule = config.schedule
    start = schedule.eval_it if schedule.skip_first_eval else 0
    return list(range(start, schedule.iterations + 1, schedule.eval_it))


def eval_models(config: DistillConfig) -> tuple[str, ...]:
    """Networks that evaluate the set, by ``eval_mode``, as upstream's ``get_eval_pool``.

    ``S``: the distilled model, with any ``BN`` suffix and what follows cut off (``ConvNetBN`` ->
    ``ConvNet``). ``C``: the model and ``ConvNet``. ``M``/``W``/``D``/``A``/``P``/``N``/``BN``: fixed
    pools. Any other mode: the model alone, as upstream does.
    """
    model, mode = config.matching.model, config.evaluation.eval_mode
    if mode == "S":
        return (model[: model.index("BN")],) if "BN" in model else (model,)
    if mode == "C":
        return (model, "ConvNet")
    return EVAL_POOLS.get(mode, (model,))


def effective_batch_syn(config: DistillConfig, num_classes: int) -> int:
    """Synthetic images per inner step: ``batch_syn`` capped at the set size (None = the whole set).

    Upstream takes the steps' batches from ``torch.split(randperm(n), batch_syn)`` and pops the
    *last* chunk first. When ``batch_syn`` does not divide ``n``, the first step of each permutation
    therefore gets the short remainder chunk.
    """
    n = num_classes * config.learning.ipc
    batch_syn = config.matching.batch_syn
    return n if batch_syn is None else min(batch_syn, n)
