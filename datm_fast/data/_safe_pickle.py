"""Read the CIFAR Python pickles without letting a pickle run code.

``pickle.load`` calls any importable function a file names, so a file that merely claims to be
``data_batch_1`` could run ``os.system``. :class:`RestrictedUnpickler` resolves only the globals that a
dict of NumPy arrays, lists, strings and numbers needs, and refuses every other one before anything is
called. Allowed (module, name) pairs:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``,
  ``numpy.dtype``: how every NumPy version pickles an array with protocols 0-4 (the real CIFAR files
  were written by Python 2 with protocol 2).
- ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``: the same with protocol 5,
  the default from Python 3.14.
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: a NumPy scalar (e.g. a label
  stored as ``np.int64``), built from a dtype and raw bytes.
- ``_codecs.encode``, restricted to ``(str, "latin1")``: how Python 3 writes ``bytes`` with protocol 2.

Each of them only builds data from data. The names are mapped to the functions directly, so the
deprecated ``numpy.core`` module is never imported.
"""

from __future__ import annotations

import codecs
import os
import pickle
from typing import Any

import numpy as np

from ._dataset import DatasetError

__all__ = ["RefusedGlobal", "RestrictedUnpickler", "load_pickle"]


def _numpy_private(module: str, name: str) -> Any:
    # numpy >= 2 keeps these under numpy._core, numpy 1.x under numpy.core.
    try:
        mod = __import__(f"numpy._core.{module}", fromlist=[name])
    except ImportError:  # pragma: no cover - numpy 1.x
        mod = __import__(f"numpy.core.{module}", fromlist=[name])
    return getattr(mod, name)


def _latin1_encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to what pickle protocol 2 emits for ``bytes``: ``encode(str, 'latin1')``."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise RefusedGlobal(f"refused _codecs.encode({type(obj).__name__}, {encoding!r}, {errors!r})")
    return obj.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    # Built per unpickler (not a module global) so nothing is imported or cached at import time.
    reconstruct = _numpy_private("multiarray", "_reconstruct")
    frombuffer = _numpy_private("numeric", "_frombuffer")
    scalar = _numpy_private("multiarray", "scalar")
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        table[(f"{pkg}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{pkg}.numeric", "_frombuffer")] = frombuffer
        table[(f"{pkg}.multiarray", "scalar")] = scalar
    table[("_codecs", "encode")] = _latin1_encode
    return table


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list: it could run code, so nothing is loaded."""


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only NumPy's array-reconstruction globals (see module doc)."""

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._table = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._table[(module, name)]
        except KeyError:
            raise RefusedGlobal(
                f"refused to load global {module}.{name}: only NumPy array reconstruction is allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("refused a persistent id: not used by dataset pickles")


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; any failure is a :class:`DatasetError` naming it.

    Strings are decoded as latin1 (as torchvision does) so Python 2 pickles such as the original CIFAR
    batches load, including the raw pixel buffers of their arrays.
    """
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except RefusedGlobal as e:
        raise DatasetError(f"{path}: not a safe dataset pickle ({e})") from e
    except Exception as e:  # truncated or garbage files raise EOFError, ValueError, TypeError, ...
        raise DatasetError(f"{path}: corrupted or not a pickle ({type(e).__name__}: {e})") from e
