"""Small shared helpers: atomic file writes, the cache directory, devices and process-level CPU tuning.

Everything that datm_fast writes to disk goes through :func:`atomic_write`, so a run killed at any
moment leaves either the old file or the new one, never a truncated file under the final name.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import os
import sys
import tempfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "DirectoryLocked",
    "atomic_write",
    "available_memory_bytes",
    "check_writable",
    "exclusive_lock",
    "locked_file",
    "dataclass_arguments",
    "dataclass_from_arguments",
    "default_cache_dir",
    "peak_rss_bytes",
    "resolve_device",
    "retain_freed_memory",
    "tensor_digest",
]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.

    Example::

        with atomic_write("out.npy") as f:
            np.save(f, array)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600; give it the permissions an ordinary open() would (0666 & ~umask)
    # so that a cache or a run directory can be shared between users.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # Make the rename itself durable: fsync the directory entry (not possible on every platform).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class DirectoryLocked(RuntimeError):
    """Another process holds a directory's lock (:func:`exclusive_lock`)."""


def locked_file(path: str | os.PathLike[str], *, shared: bool = False) -> IO[str]:
    """``path`` opened (``"a+"``, created if missing) and ``flock``-ed without waiting, exclusively or
    ``shared``; the lock lives as long as the file is open, and the OS frees it when the process dies
    (``kill -9`` included). Raises ``BlockingIOError`` (the file closed) while another process holds it in
    a conflicting mode. Where ``flock`` is missing (Windows) the file is returned unlocked."""
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return f
    try:
        fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise
    return f


def exclusive_lock(directory: str | os.PathLike[str], what: str) -> Any:
    """An open file holding an exclusive ``flock`` on ``directory/.lock``, for one writer at a time.

    The lock lives as long as the returned file is open: released by ``close()``, or by the OS when
    the process dies (``kill -9`` included), so a lock left by a killed process is taken over by the
    next writer. The file records the holder's pid for the message. A second writer gets
    :class:`DirectoryLocked` at once, naming ``what`` is locked and by which pid. Where ``flock`` is
    missing (Windows) nothing is locked.
    """
    path = Path(directory) / ".lock"
    try:
        f = locked_file(path)  # held open (and locked) for the writer's lifetime
    except BlockingIOError:
        holder = path.read_text().strip() or "another process"
        raise DirectoryLocked(
            f"{directory}: {holder} is writing this {what} (it holds {path}); wait for it to finish or write to "
            "another directory"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()}\n")
    f.flush()
    return f


def check_writable(directory: str | os.PathLike[str]) -> Path:
    """Make ``directory`` (and its parents) and write a probe file in it: a read-only place, a full disk
    or a file in the way fails here, before any work, as one ``OSError`` that names the directory."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        # The same kind of error (PermissionError, ...) with its errno, said as one line without "[Errno N]".
        error = type(exc)(f"{path}: cannot write here ({exc.strerror or exc}); choose another place")
        error.errno = exc.errno
        raise error from None
    return path


def tensor_digest(*tensors: torch.Tensor, extra: str = "") -> str:
    """sha256 (first 16 hex digits) of the tensors' dtypes, shapes and bytes, and ``extra``: what tells two
    sets, splits or plans apart when the ranks of a job compare them. Any dtype (bfloat16 too: the bytes
    are read as uint8)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{flat.dtype}{tuple(t.shape)};".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where decoded datasets and fitted transforms are cached.

    ``$DATM_FAST_CACHE`` if set, else ``$XDG_CACHE_HOME/datm_fast``, else ``~/.cache/datm_fast``.
    Read at call time, never at import.
    """
    env = os.environ.get("DATM_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "datm_fast"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    On Linux this reads ``VmHWM`` from ``/proc/self/status``, the high-water mark of this process's
    own address space. ``getrusage().ru_maxrss`` is not used there: Linux carries it over ``execve``
    from the parent, so a subprocess started by a large parent would report the parent's peak.
    Elsewhere ``ru_maxrss`` is the best available measure.
    """
    peak = _proc_kilobytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can still get, in bytes: the free memory of a CUDA device
    (``torch.cuda.mem_get_info``), ``MemAvailable`` of ``/proc/meminfo`` on a Linux CPU; None where it
    cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _proc_kilobytes("/proc/meminfo", "MemAvailable") if device.type == "cpu" else None


def _proc_kilobytes(path: str, field: str) -> int | None:
    """A ``field:  N kB`` line of a Linux ``/proc`` file, in bytes; None where there is no such file or line."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU. Checks that a CUDA device exists."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    return dev


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    Why: a CPU training step allocates activations of tens to hundreds of MB (CIFAR ConvNet, batch
    256: 134 MB for one conv output) and frees them at the end of the step. glibc serves blocks above
    32 MB with a fresh ``mmap`` and unmaps them on free, so every step page-faults all of its memory
    in again (measured: about 600,000 minor faults per CIFAR IPC 50 epoch; a fresh zeroed 52 MB tensor
    costs 10 ms against 1 ms for a reused one). With mmap off and trimming out of reach, freed
    blocks are reused: 1.6x per eager evaluation epoch, 1.2-1.3x compiled, on 2 cores (benchmarks/RESULTS.md).

    This is process-wide and permanent: resident memory stays at its peak. Library functions never
    call it; ``datm-fast eval`` does on CPU. The same from the shell:
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.

    Returns True if applied (Linux with glibc), False otherwise.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


# ----- command-line options from a dataclass ------------------------------------------------------------
def _option_type(tp: Any) -> Any:
    """The argparse ``type`` of a field annotation: int, float, str, their Optionals, and tuples of them
    (written comma-separated, ``--ipcs 1,10``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _option_type(args[0])
    if typing.get_origin(tp) is tuple:
        item = args[0]

        def comma_separated(text: str) -> tuple[Any, ...]:
            try:
                return tuple(item(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {text!r}") from None

        return comma_separated
    if tp in (int, float, str):
        return tp
    raise TypeError(f"dataclass_arguments: unsupported field type {tp!r}")


def dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """A ``--field-name`` option for every field of the dataclass ``cls`` (default: the field's default,
    help: its ``metadata["help"]``), so that a new field is a new option; :func:`dataclass_from_arguments`
    reads them back."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        tp = hints[f.name]
        # A Literal of strings is a choice among them (argparse names the bad value and the choices).
        kind = (
            {"choices": typing.get_args(tp)} if typing.get_origin(tp) is typing.Literal else {"type": _option_type(tp)}
        )
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            default=default,
            help=f"{f.metadata.get('help', '')} (default: {shown})",
            **kind,
        )


def dataclass_from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the options :func:`dataclass_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
