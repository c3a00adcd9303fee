"""How a config section declares its keys: one :func:`setting` per field, everything else derived.

A section is a frozen dataclass whose fields are :func:`setting`\\ s. The field's metadata says what every
other part of datm_fast needs to know about the key, so that adding a key touches its section only:

=================  ====================================================================================
``help``           one line for ``--help``, the report and the docs
``upstream``       upstream DATM's spelling when it differs (``Iteration``); ``own=True``: not upstream's
``check``          a value check (:func:`at_least`, :func:`above`, :func:`within`), its message derived
``placement``      the key says where or how fast a run goes, not what it computes (device, backend,
                   micro-batch): a run may resume under another value, and results stay comparable
``flag``           ``datm-fast distill`` gets a ``--key`` option for it
=================  ====================================================================================

Constructing a section coerces each value to the field's annotated type (YAML 1.1 strings such as
``"1e-5"`` are numbers; ``"None"`` is null) and checks it; every problem is collected and raised as one
:class:`ConfigError` that names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "Section",
    "above",
    "at_least",
    "did_you_mean",
    "label",
    "setting",
    "section_keys",
    "within",
]


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


Check = tuple[Callable[[Any], bool], str]  # (value -> ok, what is expected, e.g. ">= 1")


def at_least(minimum: float, why: str = "") -> Check:
    """Values ``>= minimum`` (None allowed when the field is optional)."""
    return (lambda v: v >= minimum), f">= {minimum}" + (f" ({why})" if why else "")


def above(bound: float, why: str = "") -> Check:
    """Values ``> bound``."""
    return (lambda v: v > bound), f"> {bound}" + (f" ({why})" if why else "")


def within(low: float, high: float) -> Check:
    """Values in ``[low, high)``."""
    return (lambda v: low <= v < high), f"in [{low}, {high})"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    upstream: str | None = None,
    own: bool = False,
    check: Check | None = None,
    placement: bool = False,
    flag: bool = False,
    path: bool = False,
) -> Any:
    """A config key: a dataclass field with the metadata of the module docstring.

    ``path=True``: the value is a file or folder (an ``os.PathLike`` is accepted for it).
    """
    metadata = {
        "help": help,
        "upstream": upstream,
        "own": own,
        "check": check,
        "placement": placement,
        "flag": flag,
        "path": path,
    }
    return field(default=default, metadata=metadata)


def label(f: dataclasses.Field) -> str:
    """How a key is named in messages: ``momentum_y (Momentum_y)`` when upstream spells it differently."""
    up = f.metadata.get("upstream")
    return f"{f.name} ({up})" if up else f.name


# ---- coercion ------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null", "~"})


class _BadValue(Exception):
    pass


def did_you_mean(word: object, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``word`` (case-insensitive), or ``""``."""
    lowered: dict[str, str] = {}
    for c in choices:
        lowered.setdefault(c.lower(), c)
    hit = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[hit[0]]!r}?" if hit else ""


def _number(name: str, value: Any, what: str) -> float:
    """A finite float from an int, float or numeric string; ``_BadValue`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise _BadValue(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        if not _NUMBER.fullmatch(value.strip()):
            raise _BadValue(f"{name} must be {what}, got the string {value!r}")
        x = float(value)
    else:
        x = float(value)
    if not math.isfinite(x):
        raise _BadValue(f"{name} must be a finite number, got {value!r}")
    return x


def _coerce(name: str, tp: Any, value: Any, path: bool) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union or (origin is not None and type(None) in args and len(args) == 2):  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(name, inner, value, path)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _BadValue(
            f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}"
            + (did_you_mean(value, args) if isinstance(value, str) else "")
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadValue(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy integers too
            return int(value)
        x = _number(name, value, "a whole number")
        if not x.is_integer():
            raise _BadValue(f"{name} must be a whole number, got {value!r}")
        return int(x)
    if tp is float:
        if type(value) is float and math.isfinite(value):
            return value
        return _number(name, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if path and isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _BadValue(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    raise TypeError(f"config key {name}: unsupported annotation {tp!r}")  # pragma: no cover - a bug here


# ---- sections ------------------------------------------------------------------------------------------------------
class Section:
    """Base of a config section (a frozen dataclass of :func:`setting` fields): coerces and checks on
    construction. A subclass adds checks between its own keys in :meth:`relations`."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        mistyped: list[str] = []
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                coerced = _coerce(label(f), hints[f.name], value, f.metadata.get("path", False))
            except _BadValue as e:
                problems.append(str(e))
                mistyped.append(f.name)
                continue
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            check = f.metadata.get("check")
            if check is not None and coerced is not None and not check[0](coerced):
                optional = type(None) in get_args(hints[f.name])
                problems.append(f"{label(f)} must be {check[1]}{' or null' if optional else ''}, got {coerced!r}")
        if not mistyped:  # relations between keys need every key typed
            problems += self.relations()
        if problems:
            raise ConfigError(problems)

    def relations(self) -> list[str]:
        """Problems between this section's keys (each one line); none by default."""
        return []

    def replace(self, **changes: Any) -> Any:
        """A copy with some keys changed, checked again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def section_keys(cls: type) -> Mapping[str, dataclasses.Field]:
    """``{key: field}`` of a section class, in declaration order."""
    return {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
