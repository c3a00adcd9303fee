"""Expert buffers on disk: one safetensors file per expert plus a JSON manifest; upstream buffers too.

Native layout (a directory)::

    manifest.json                 format, model spec, dataset fingerprint, training config, and per
                                  expert: file name, sha256, size, seed, per-epoch train/test loss and accuracy
    expert_00000.safetensors      one float32 tensor "trajectory" of shape (E + 1, P): row e = the flat
    expert_00001.safetensors      parameters after e epochs (row 0 = initialisation), upstream
    ...                           parameters() order; the header metadata repeats the expert's entry

Writing is crash-safe. Each expert file is written to a temporary file, fsynced and renamed
(:func:`datm_fast.utils.atomic_write`), then the manifest is rewritten the same way with the new
entry. A ``kill -9`` at any moment therefore leaves either no file, or a complete file; an expert
counts as finished only once the manifest lists it with its checksum and size. A complete file that
the manifest does not list yet (killed between the two renames) is adopted on resume if its header
says it was made by the same run settings, else it is trained again.

One process writes the manifest (:class:`BufferWriter`, holding the directory's lock); the other ranks
of a ``torchrun`` job write only their experts' files (:class:`ExpertFiles`), which it then lists. A
file's bytes depend on the expert alone (no timings in it, a header with sorted keys), so every run
that trains an expert the same way writes the same file.

Reading never loads a whole buffer: :meth:`ExpertBuffer.params` memory-maps the expert's file and
copies one row (1.3 MB for the CIFAR ConvNet) out of it. Checks:

* on open: the manifest parses and has the expected format; every listed file exists with its listed
  size (a truncated file is refused here, by ``stat`` alone); an expected model spec or dataset
  fingerprint, when given, matches;
* lazily, the first time an expert is read in this process: the whole file's sha256 against the
  manifest (about 0.05 s per 65 MB file), and its safetensors header (name, dtype, shape, index).
  ``verify="eager"`` does this for every file at open, ``verify="none"`` skips the checksum.

Any failed check raises :class:`ExpertBufferError` naming the file and what was expected.

Upstream buffers (MTT / FTD / DATM ``buffer.py``): ``replay_buffer_<n>.pt`` files in a directory, each
a list of experts, each a list of epochs, each a list of parameter tensors in ``parameters()`` order.
:meth:`ExpertBuffer.open` reads them transparently, with ``torch.load(..., weights_only=True)`` (a
downloaded buffer can never run code) and ``mmap=True`` (storages are mapped, not read), so
``params(expert, epoch)`` works the same on both. Upstream files carry no spec: pass ``spec`` or let
it be inferred from the tensor shapes (ConvNet with instance norm, ReLU, average pooling, the
upstream default). :func:`convert_upstream` writes them in the native format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal, Union

import torch
from torch import Tensor

from ..data import DataSpec, ImageDataset
from ..models import ConvNetSpec, convnet_spec_from_name
from ..utils import DirectoryLocked, atomic_write, check_writable, exclusive_lock

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ExpertBuffer",
    "ExpertBufferError",
    "BufferWriter",
    "ExpertFiles",
    "convert_upstream",
    "dataset_info",
    "expert_filename",
    "file_sha256",
    "infer_upstream_spec",
    "manifest_entry",
    "recorded_dataset_info",
    "spec_from_dict",
    "spec_to_dict",
]

FORMAT = "datm_fast.expert_buffer"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSOR_NAME = "trajectory"
_UPSTREAM_RE = re.compile(r"^replay_buffer_(\d+)\.pt$")
_EXPERT_RE = re.compile(r"^expert_(\d{5,})\.safetensors$")

PathLike = Union[str, "os.PathLike[str]"]
Verify = Literal["lazy", "eager", "none"]


class ExpertBufferError(ValueError):
    """An expert buffer is missing, corrupted, truncated, tampered with, or made for another model/dataset.

    The message names the offending file and says what was expected.
    """


def expert_filename(index: int) -> str:
    """``expert_00042.safetensors`` for expert 42."""
    return f"expert_{index:05d}.safetensors"


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# ----- what a manifest records about the model and the data --------------------------------------------------
def spec_to_dict(spec: ConvNetSpec) -> dict[str, Any]:
    """A JSON-ready dict of a :class:`ConvNetSpec` (``image_size`` as a list)."""
    d = asdict(spec)
    d["image_size"] = list(spec.image_size)
    return d


def spec_from_dict(d: dict[str, Any]) -> ConvNetSpec:
    """Inverse of :func:`spec_to_dict`."""
    d = dict(d)
    d["image_size"] = tuple(d["image_size"])
    return ConvNetSpec(**d)


def dataset_info(dataset: ImageDataset) -> dict[str, Any]:
    """What a manifest records about the training data: name, fingerprint, preprocessing and shapes.

    ``fingerprint`` (:attr:`ImageDataset.fingerprint`) identifies the source files and every
    derivation (subsets, long tail, ZCA); two buffers are for the same data iff their infos are equal.
    """
    return {
        "name": dataset.name,
        "fingerprint": dataset.fingerprint,
        "preprocessing": dataset.preprocessing,
        "num_classes": dataset.num_classes,
        "image_shape": [dataset.channels, *dataset.image_size],
        "train_images": int(dataset.train_labels.shape[0]),
        "test_images": int(dataset.test_labels.shape[0]),
    }


def recorded_dataset_info(root: PathLike, dataset: ImageDataset) -> dict[str, Any]:
    """:func:`dataset_info` of ``dataset`` as the buffer at ``root`` records it: the buffer's own record
    where it was written before fingerprints had content roots (2026-12-05) and names this dataset by
    its :attr:`~datm_fast.data.ImageDataset.legacy_fingerprint`, so that such a buffer resumes with the
    identity its files carry; else (a new buffer, or one written since) the dataset's info now."""
    info = dataset_info(dataset)
    try:
        recorded = _read_manifest(Path(root)).get("dataset")
    except ExpertBufferError:
        return info  # no buffer there yet (or not a readable one: BufferWriter says so)
    legacy = {**info, "fingerprint": dataset.legacy_fingerprint}
    if dataset.legacy_fingerprint is not None and _canonical(recorded) == _canonical(legacy):
        return legacy
    return info


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _identity(header: dict[str, Any]) -> str:
    """Hash of what makes two runs interchangeable: format, model, dataset, training config."""
    keys = ("format", "format_version", "model", "dataset", "config")
    return hashlib.sha256(_canonical({k: header.get(k) for k in keys}).encode()).hexdigest()


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExpertBufferError(f"{path}: no manifest (not a datm_fast expert buffer)") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExpertBufferError(f"{path}: corrupted manifest, not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ExpertBufferError(f"{path}: not a datm_fast expert buffer manifest (format {FORMAT!r} expected)")
    if m.get("format_version") != FORMAT_VERSION:
        raise ExpertBufferError(
            f"{path}: buffer format version {m.get('format_version')!r}; this datm_fast reads version {FORMAT_VERSION}"
        )
    for key in ("model", "num_epochs", "experts", "num_params"):
        if key not in m:
            raise ExpertBufferError(f"{path}: manifest has no {key!r} entry")
    if not isinstance(m["experts"], dict):
        raise ExpertBufferError(f"{path}: manifest 'experts' must be a mapping of index -> entry")
    return m


def _check_entry(root: Path, index: str, entry: Any) -> None:
    path = root / MANIFEST_NAME
    if not isinstance(entry, dict) or not all(k in entry for k in ("file", "sha256", "bytes")):
        raise ExpertBufferError(f"{path}: expert {index} entry must have 'file', 'sha256' and 'bytes'")
    name = entry["file"]
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ExpertBufferError(f"{path}: expert {index} has an invalid file name {name!r}")


def _stored_problem(path: Path, entry: dict[str, Any], *, verify: bool, said_by: str) -> str | None:
    """Why the file at ``path`` is not the one ``entry`` describes (missing, another size, with ``verify``
    another sha256; ``said_by`` gave the entry), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"has {size} bytes, {said_by} says {entry['bytes']}"
    if verify and file_sha256(path) != entry["sha256"]:
        return "does not match its checksum"
    return None


# ----- writing ------------------------------------------------------------------------------------------------
def manifest_entry(file_entry: dict[str, Any], run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """An expert's manifest entry: what :meth:`ExpertFiles.write` returned (the file's own entry, then
    ``file``, ``sha256``, ``bytes``) with ``run_info`` (timings: true of one run only) before the file fields."""
    fields = ("file", "sha256", "bytes")
    own = {k: v for k, v in file_entry.items() if k not in fields}
    return {**own, **(run_info or {}), **{k: file_entry[k] for k in fields}}


class ExpertFiles:
    """Writes expert files into a buffer directory, and nothing else: no lock, no manifest.

    For the processes of one job (the ranks of ``torchrun``), each writing the experts it trained while
    the job's :class:`BufferWriter` (rank 0) holds the directory's lock and alone writes the manifest,
    listing the files with :meth:`BufferWriter.record`. Each file is written atomically (a temporary
    file, fsynced, renamed), so a killed writer leaves no file or a complete one, which the next run
    adopts (:meth:`BufferWriter.finished`) since the file carries its own entry and data checksum.

    A file's bytes are a function of the header and the expert's ``info`` alone: the safetensors header
    is written here with sorted keys (``safetensors.torch.save`` orders the metadata by a per-process
    hash, so the same expert saved twice gave different bytes) and ``info`` holds no timings. The same
    expert trained by any rank, in any run, is therefore the same file, checksum included.
    """

    def __init__(self, root: PathLike, header: dict[str, Any]) -> None:
        self.root = Path(root)
        for key in ("model", "dataset", "config", "num_epochs", "num_params"):
            if key not in header:
                raise ValueError(f"expert buffer header needs {key!r}")
        base = {"format": FORMAT, "format_version": FORMAT_VERSION}
        self.header = {**base, **header}
        self.identity = _identity(self.header)

    def write(self, index: int, trajectory: Tensor, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write expert ``index``'s file atomically; returns ``info`` with ``file``, ``sha256`` and ``bytes``."""
        expected = (self.header["num_epochs"] + 1, self.header["num_params"])
        if tuple(trajectory.shape) != expected:
            raise ValueError(f"BufferWriter.add: trajectory must be {expected}, got {tuple(trajectory.shape)}")
        if not bool(torch.isfinite(trajectory).all()):
            raise ValueError(f"BufferWriter.add: expert {index}'s trajectory has non-finite values")
        entry = dict(info or {})
        tensor = trajectory.detach().to("cpu", torch.float32).contiguous()
        data = memoryview(tensor.numpy()).cast("B")  # the file's data region, without a copy
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "expert": str(index),
            "identity": self.identity,
            "model": _canonical(self.header["model"]),
            "entry": _canonical(entry),
            # Makes the file self-verifying, so that a complete file the manifest does not list yet
            # (killed between the two renames) can be adopted on resume without trusting it blindly.
            "data_sha256": hashlib.sha256(data).hexdigest(),
        }
        head = _safetensors_head(tensor, meta)
        name = expert_filename(index)
        with atomic_write(self.root / name) as f:
            f.write(head)
            f.write(data)
        digest = hashlib.sha256(head)
        digest.update(data)
        entry.update(file=name, sha256=digest.hexdigest(), bytes=len(head) + len(data))
        return entry


def _safetensors_head(tensor: Tensor, metadata: dict[str, str]) -> bytes:
    """The safetensors prefix of a file holding ``tensor`` (float32) as ``TENSOR_NAME``: the header's length
    (8 bytes, little endian), then its JSON with sorted keys, padded with spaces to 8 bytes as safetensors
    pads it. The data region that follows is the tensor's bytes, which are little endian on every machine
    torch runs on (checked here rather than assumed)."""
    if sys.byteorder != "little":
        raise RuntimeError("writing expert files needs a little-endian machine (safetensors stores little endian)")
    size = tensor.numel() * tensor.element_size()
    header = {
        "__metadata__": metadata,
        TENSOR_NAME: {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, size]},
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class BufferWriter:
    """Appends experts to a native buffer directory, crash-safely (see the module docstring).

    ``header`` holds ``model``, ``dataset``, ``config`` (and optionally ``source``, ``num_epochs`` is
    required): an existing manifest must have the same, else :class:`ExpertBufferError` says which
    entry differs. Use :meth:`finished` to skip experts on resume and :meth:`add` to store one.

    One writer per directory at a time: the writer holds an exclusive lock on ``<dir>/.lock``
    (``flock``; released by :meth:`close`, on exit of a ``with`` block, or by the OS when the process
    dies, ``kill -9`` included), so a second command writing the same buffer fails at once with a
    clear error instead of interleaving. Holding the lock, the writer deletes temporary files that a
    killed writer left behind.
    """

    def __init__(self, root: PathLike, header: dict[str, Any]) -> None:
        self.root = Path(root)
        self.files = ExpertFiles(self.root, header)  # checks the header
        self.header = self.files.header
        self.identity = self.files.identity
        if self.root.exists() and not self.root.is_dir():
            raise ExpertBufferError(f"{self.root}: exists and is not a directory")
        check_writable(self.root)  # a read-only place or a full disk: one OSError naming it, before training
        try:
            self._lock = exclusive_lock(self.root, "buffer")
        except DirectoryLocked as exc:
            raise ExpertBufferError(str(exc)) from None
        try:
            for stale in self.root.glob(".*.tmp"):  # atomic_write's temporaries of a killed writer
                if stale.name.startswith((f".{MANIFEST_NAME}.", ".expert_")):
                    stale.unlink(missing_ok=True)
            manifest_path = self.root / MANIFEST_NAME
            if manifest_path.exists():
                m = _read_manifest(self.root)
                for key in ("model", "dataset", "config", "num_epochs", "num_params"):
                    if _canonical(m.get(key)) != _canonical(self.header[key]):
                        raise ExpertBufferError(
                            f"{manifest_path}: this buffer was made with a different {key}:\n"
                            f"  buffer: {_canonical(m.get(key))}\n  now:    {_canonical(self.header[key])}\n"
                            "write to another directory, or run with the buffer's settings to resume it"
                        )
                self.manifest = m
            else:
                self.manifest = {**self.header, "identity": self.identity, "experts": {}}
            self.manifest["identity"] = self.identity
            if "data" in self.header:  # where the data are now (not part of the identity: data move)
                self.manifest["data"] = self.header["data"]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory lock (idempotent)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()

    def __enter__(self) -> BufferWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _save_manifest(self) -> None:
        m = dict(self.manifest)
        m["experts"] = {k: m["experts"][k] for k in sorted(m["experts"], key=int)}
        self.manifest = m
        with atomic_write(self.root / MANIFEST_NAME, "w") as f:
            json.dump(m, f, indent=1)
            f.write("\n")

    def finished(self, *, verify: bool = True) -> set[int]:
        """Indices of experts stored completely. Entries whose file is missing, has the wrong size or
        (with ``verify``) the wrong checksum are dropped from the manifest with a warning (trained again);
        complete files the manifest does not list yet are adopted when made by the same settings."""
        done: set[int] = set()
        changed = False
        for key, entry in list(self.manifest["experts"].items()):
            _check_entry(self.root, key, entry)
            path = self.root / entry["file"]
            problem = _stored_problem(path, entry, verify=verify, said_by="the manifest")
            if problem is None:
                done.add(int(key))
            else:
                warnings.warn(f"{path} {problem}; expert {key} will be trained again", RuntimeWarning, stacklevel=2)
                del self.manifest["experts"][key]
                changed = True
        for path in sorted(self.root.glob("expert_*.safetensors")):
            m = _EXPERT_RE.match(path.name)
            if m is None or int(m.group(1)) in done:
                continue
            entry = self._adoptable(path, int(m.group(1)))
            if entry is not None:
                self.manifest["experts"][str(int(m.group(1)))] = entry
                done.add(int(m.group(1)))
                changed = True
        if changed:
            self._save_manifest()
        return done

    def _adoptable(self, path: Path, index: int) -> dict[str, Any] | None:
        """The manifest entry of a complete expert file written by this run's settings, else None."""
        try:
            meta, shape, dtype = _safetensors_header(path)
            entry = json.loads(meta.get("entry", "null"))
            expected_shape = [self.header["num_epochs"] + 1, self.header["num_params"]]
            if (
                meta.get("identity") != self.identity
                or meta.get("expert") != str(index)
                or shape != expected_shape
                or dtype != "F32"
                or not isinstance(entry, dict)
                or meta.get("data_sha256") != _data_sha256(path)
            ):
                return None
        except (ExpertBufferError, json.JSONDecodeError, OSError):
            return None
        return {**entry, "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}

    def add(
        self,
        index: int,
        trajectory: Tensor,
        info: dict[str, Any] | None = None,
        *,
        run_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store expert ``index``'s trajectory ``(num_epochs + 1, num_params)`` and its ``info`` (seed,
        per-epoch stats; JSON-ready). Writes the file atomically, then the manifest. Returns the entry.

        ``run_info`` (e.g. the training time) goes into the manifest only, not into the file, so that
        the file's bytes depend on what was trained alone and are the same in every run that trains it.
        """
        entry = manifest_entry(self.files.write(index, trajectory, info), run_info)
        self._list({index: entry})  # written just now by this process: its size and sha256 are the bytes'
        return entry

    def record(self, entries: dict[int, dict[str, Any]]) -> None:
        """List expert files that another process of this job wrote (:class:`ExpertFiles`) in the manifest,
        after checking that each is here under its name with the size and sha256 its writer reported
        (which also proves that this process sees the writer's directory). Saves the manifest once."""
        for index, entry in sorted(entries.items()):
            _check_entry(self.root, str(index), entry)
            path = self.root / entry["file"]
            if entry["file"] != expert_filename(index):
                raise ExpertBufferError(f"{path}: reported for expert {index}, whose file is {expert_filename(index)}")
            problem = _stored_problem(path, entry, verify=True, said_by="its writer")
            if problem == "is missing":
                raise ExpertBufferError(
                    f"{path}: missing, though its writer reported it written (is {self.root} one directory that "
                    "every rank sees?)"
                )
            if problem is not None:
                raise ExpertBufferError(f"{path}: {problem}, though its writer reported it written: changed since")
        self._list(entries)

    def _list(self, entries: dict[int, dict[str, Any]]) -> None:
        for index, entry in entries.items():
            self.manifest["experts"][str(index)] = entry
        self._save_manifest()

    def set(self, **fields: Any) -> None:
        """Set informational top-level manifest fields (e.g. ``requested_experts``) and save."""
        self.manifest.update(fields)
        self._save_manifest()


def _data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's data region (everything after the header)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _safetensors_header(path: Path) -> tuple[dict[str, str], list[int], str]:
    """``(metadata, shape, dtype)`` of the trajectory tensor in a safetensors file, read from its header."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ExpertBufferError(f"{path}: truncated (no safetensors header)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > 100 << 20:
                raise ExpertBufferError(f"{path}: corrupted safetensors header (length {n})")
            header_bytes = f.read(n)
        if len(header_bytes) != n:
            raise ExpertBufferError(f"{path}: truncated (safetensors header cut short)")
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExpertBufferError(f"{path}: corrupted safetensors header ({e})") from None
    info = header.get(TENSOR_NAME)
    if not isinstance(info, dict):
        raise ExpertBufferError(f"{path}: no {TENSOR_NAME!r} tensor (not a datm_fast expert file)")
    meta = header.get("__metadata__") or {}
    return meta, list(info.get("shape", [])), str(info.get("dtype"))


# ----- reading ------------------------------------------------------------------------------------------------
class _NativeExpert:
    def __init__(self, root: Path, index: int, entry: dict[str, Any]) -> None:
        self.index = index
        self.path = root / entry["file"]
        self.sha256 = entry["sha256"]
        self.bytes = entry["bytes"]
        self.entry = entry
        self.verified = False
        self._handle: Any = None

    def check_size(self) -> None:
        if not self.path.is_file():
            raise ExpertBufferError(f"{self.path}: missing (listed in the manifest for expert {self.index})")
        size = self.path.stat().st_size
        if size != self.bytes:
            raise ExpertBufferError(f"{self.path}: truncated or changed: {size} bytes, the manifest says {self.bytes}")

    def verify(self, shape: tuple[int, int]) -> None:
        self.check_size()
        digest = file_sha256(self.path)
        if digest != self.sha256:
            raise ExpertBufferError(
                f"{self.path}: checksum mismatch (sha256 {digest[:16]}..., the manifest says {self.sha256[:16]}...): "
                "the file was modified or corrupted"
            )
        meta, got_shape, dtype = _safetensors_header(self.path)
        if dtype != "F32" or got_shape != list(shape) or meta.get("expert") != str(self.index):
            raise ExpertBufferError(
                f"{self.path}: holds {dtype} {got_shape} for expert {meta.get('expert')}, expected F32 "
                f"{list(shape)} for expert {self.index}"
            )
        self.verified = True

    def slice(self) -> Any:
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ExpertBufferError(f"{self.path}: cannot be read as safetensors ({e})") from None
        return self._handle.get_slice(TENSOR_NAME)


def _upstream_load_error(e: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a ``replay_buffer_<n>.pt``, without torch's advice.

    torch's weights-only refusal suggests re-running with ``weights_only=False`` (or allow-listing the
    global), which would unpickle, i.e. run, whatever the file names: never pass that on. Name the offending
    global instead, which is what tells a user the file is not a buffer (or not one from upstream).
    """
    msg = str(e)
    if "weights_only" in msg or "Weights only load failed" in msg:
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found is None:  # not a pickle at all, e.g. "Unsupported operand 103" for a foreign file
            reason = re.search(r"Unsupported [^\n.]*", msg)
            detail = f" ({reason.group(0).strip()})" if reason else ""
            return f"cannot be read as an upstream replay buffer (lists of tensors only): not such a pickle{detail}"
        return (
            f"cannot be read as an upstream replay buffer: it holds a {found.group(1)} object, but such a buffer "
            "holds lists of tensors only (anything else is refused unread, since unpickling it could run code)"
        )
    return f"cannot be read as an upstream replay buffer (lists of tensors only): {type(e).__name__}: {msg[:300]}"


class _UpstreamFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                    raise
                # Legacy (pre-1.6, non-zip) files cannot be memory-mapped: they are read whole.
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for truncated / foreign files
            raise ExpertBufferError(f"{path}: {_upstream_load_error(e)}") from None
        if not isinstance(obj, (list, tuple)) or not obj:
            raise ExpertBufferError(f"{path}: expected a non-empty list of experts, got {type(obj).__name__}")
        self.experts = obj

    def epoch_tensors(self, local: int, epoch: int) -> list[Tensor]:
        return list(self.experts[local][epoch])


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])


# Image sides of the datasets trajectory matching is run on: sklearn digits (8), USPS (16), MNIST / Fashion-MNIST /
# MedMNIST (28), CIFAR / SVHN (32), Tiny ImageNet / MedMNIST+ (64), STL-10 (96), ImageNet subsets / MedMNIST+
# (128), MedMNIST+ / ImageNet (224, 256). Pooling makes a whole range of sizes give the same parameter shapes (a
# depth-3 net maps 4..11 px 1-channel images to 1x1), so the inference prefers these within that range.
_COMMON_IMAGE_SIZES = (8, 16, 28, 32, 64, 96, 128, 224, 256)


def _feasible_image_sizes(
    make: Callable[[int], ConvNetSpec], shapes: list[tuple[int, ...]], side: int, depth: int, pooled: bool
) -> list[int]:
    """Every square image size whose spec ``make(size)`` has exactly ``shapes`` (ascending).

    The head's feature side is ``side``; each pooling halves the map (floor) and a 1-channel first conv pads
    by 3, so the sizes lie within a few pixels of ``side * 2**depth`` .. ``(side + 1) * 2**depth``: scanning
    that window with the real spec (rather than inverting the layer arithmetic here) keeps one source of truth.
    """
    scale = 2**depth if pooled else 1
    out = []
    for size in range(max(1, side * scale - 8), (side + 1) * scale + 8):
        try:
            spec = make(size)
        except ValueError:  # feature map pooled down to nothing, and the like
            continue
        if [tuple(s) for _, s in spec.param_shapes()] == shapes:
            out.append(size)
    return out


def infer_upstream_spec(tensors: Sequence[Tensor], model: str | None = None) -> ConvNetSpec:
    """The ConvNet spec whose ``parameters()`` have these shapes (one epoch of an upstream buffer).

    Without ``model``, norm/activation/pooling are upstream's defaults (instance norm, ReLU, average
    pooling: the layers' parameter shapes cannot tell instance, batch and group norm apart); with a
    ConvNet name (``"ConvNetBN"``, ``"ConvNetD4"``, ...) that variant's. Channels, classes, width,
    depth and the (square) image size come from the shapes. Raises :class:`ExpertBufferError` when no
    ConvNet has exactly these shapes.

    With pooling, several image sizes give the same shapes (a depth-3 net on 8 px digits has the
    parameters of one on 4..11 px images). The size is then the one common dataset size in that range
    (8, 16, 28, 32, 64, ...); 1-channel nets fitting both 28 and 32 px are taken as 28 px (MNIST-like,
    upstream's convention). Otherwise the size cannot be told and :class:`ExpertBufferError` lists the
    candidates: open the buffer with an explicit ``spec``.
    """
    shapes = [tuple(t.shape) for t in tensors]
    convs = [s for s in shapes if len(s) == 4]
    if not convs or len(shapes[-2]) != 2 or len(shapes[-1]) != 1:
        raise ExpertBufferError(f"not a ConvNet parameter list: shapes {shapes[:6]}...")
    channels, width, depth = convs[0][1], convs[0][0], len(convs)
    num_classes, features = shapes[-2]
    has_norm = len(shapes) == 4 * depth + 2
    cells = features // width
    side = int(round(cells**0.5))
    if model is not None:
        probe = convnet_spec_from_name(model, channels, num_classes, 32)
        pooled = probe.pooling != "none"
    else:
        pooled = True
    kw: dict[str, Any] = {"width": width, "depth": depth, "norm": "instance" if has_norm else "none"}

    def make(size: int) -> ConvNetSpec:
        if model is not None:
            return convnet_spec_from_name(model, channels, num_classes, size)
        return ConvNetSpec(channels=channels, num_classes=num_classes, image_size=size, **kw)

    feasible = _feasible_image_sizes(make, shapes, side, depth, pooled)
    if not feasible:
        # Name the spec the shapes come closest to, as the error did before (the old single-guess size).
        guess = side * (2**depth if pooled else 1) - (4 if channels == 1 else 0)
        try:
            spec = make(guess)
        except ValueError as e:
            raise ExpertBufferError(f"no ConvNet matches parameter shapes {shapes}: {e}") from None
        want = [tuple(s) for _, s in spec.param_shapes()]
        raise ExpertBufferError(f"parameter shapes {shapes} do not match {spec} (expects {want})")
    common = [s for s in feasible if s in _COMMON_IMAGE_SIZES]
    if channels == 1 and 28 in common and 32 in common:
        common.remove(32)  # upstream's ConvNet pads 1-channel input for 28 px MNIST ("28 means 32")
    if len(feasible) == 1:
        size = feasible[0]
    elif len(common) == 1:
        size = common[0]
    else:
        listed = common or feasible
        raise ExpertBufferError(
            f"parameter shapes fit a {channels}-channel depth-{depth} ConvNet on square images of "
            f"{feasible[0]}..{feasible[-1]} px; cannot tell which of {', '.join(map(str, listed))} px it was "
            "trained on: open the buffer with an explicit spec (ExpertBuffer.open(..., spec=ConvNetSpec(...)))"
        )
    return make(size)


class ExpertBuffer:
    """Read access to a buffer of expert trajectories, by expert and epoch, without loading it whole.

    Open with :meth:`open`. ``num_experts`` experts, each with parameters for epochs
    ``0..num_epochs`` (epoch 0 = initialisation; ``num_epochs`` training epochs), of length
    ``spec.num_params``. Expert ``i`` here is the ``i``-th stored expert in index order (for a buffer
    trained to completion, the expert with index ``i``; see ``expert_ids``).

    Example::

        buf = ExpertBuffer.open("buffers/cifar10_zca")
        buf.num_experts, buf.num_epochs, buf.spec      # 100, 50, ConvNetSpec(...)
        start = buf.params(7, 20)                      # (320010,) float32
        target = buf.params(7, 22)
    """

    def __init__(self) -> None:  # use ExpertBuffer.open
        self.root: Path = Path()
        self.kind: Literal["native", "upstream"] = "native"
        self.spec: ConvNetSpec
        self.num_epochs: int = 0
        self.manifest: dict[str, Any] | None = None
        self.verify_mode: Verify = "lazy"
        self.expert_ids: tuple[int, ...] = ()
        self._native: list[_NativeExpert] = []
        self._upstream: list[tuple[_UpstreamFile, int]] = []

    # ----- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        spec: ConvNetSpec | None = None,
        model: str | None = None,
        dataset: ImageDataset | str | None = None,
        verify: Verify = "lazy",
    ) -> ExpertBuffer:
        """Open a native buffer directory (``manifest.json``) or an upstream one (``replay_buffer_*.pt``).

        Args:
            path: the directory (or, for upstream, also a single ``replay_buffer_<n>.pt`` file).
            spec: native: the spec the caller expects (mismatch -> error). Upstream: the spec to read
                the tensors as (default: inferred from the shapes, see :func:`infer_upstream_spec`).
            model: upstream only, a ConvNet name to infer the spec with (e.g. ``"ConvNetBN"``).
            dataset: native only, the dataset (or its fingerprint) the caller expects: the buffer must
                have been trained on data with this fingerprint.
            verify: ``"lazy"`` (default): each file's sha256 is checked the first time it is read;
                ``"eager"``: every file now; ``"none"``: sizes only.
        """
        if verify not in ("lazy", "eager", "none"):
            raise ValueError(f"ExpertBuffer.open: verify must be 'lazy', 'eager' or 'none', got {verify!r}")
        root = Path(path)
        if root.is_file() and _UPSTREAM_RE.match(root.name):
            return cls._open_upstream([root], spec=spec, model=model)
        if root.is_file():
            raise ExpertBufferError(
                f"{root}: a file, not a buffer directory (expected a directory holding {MANIFEST_NAME} or "
                "replay_buffer_<n>.pt files, or one replay_buffer_<n>.pt file)"
            )
        if not root.is_dir():
            raise ExpertBufferError(f"{root}: no such buffer directory")
        if (root / MANIFEST_NAME).exists():
            buf = cls._open_native(root, verify)
            buf.check(spec=spec, dataset=dataset)
            return buf
        files = sorted(
            (p for p in root.iterdir() if _UPSTREAM_RE.match(p.name)),
            key=lambda p: int(_UPSTREAM_RE.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        if not files:
            raise ExpertBufferError(
                f"{root}: neither a datm_fast buffer ({MANIFEST_NAME}) nor an upstream one (replay_buffer_<n>.pt)"
            )
        if dataset is not None:
            warnings.warn(f"{root}: upstream buffers record no dataset; cannot check it", RuntimeWarning, stacklevel=2)
        return cls._open_upstream(files, spec=spec, model=model)

    @classmethod
    def _open_native(cls, root: Path, verify: Verify) -> ExpertBuffer:
        m = _read_manifest(root)
        buf = cls()
        buf.root, buf.kind, buf.manifest, buf.verify_mode = root, "native", m, verify
        mpath = root / MANIFEST_NAME
        try:
            buf.spec = spec_from_dict(m["model"]["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExpertBufferError(f"{mpath}: invalid model spec ({e})") from None
        if buf.spec.num_params != m["num_params"]:
            raise ExpertBufferError(f"{mpath}: num_params {m['num_params']} does not match the spec's")
        buf.num_epochs = int(m["num_epochs"])
        for key, entry in m["experts"].items():
            _check_entry(root, key, entry)
        ids = sorted(int(k) for k in m["experts"])
        buf.expert_ids = tuple(ids)
        buf._native = [_NativeExpert(root, i, m["experts"][str(i)]) for i in ids]
        for e in buf._native:
            e.check_size()
        if verify == "eager":
            for e in buf._native:
                e.verify(buf._shape)
        return buf

    @classmethod
    def _open_upstream(cls, files: list[Path], *, spec: ConvNetSpec | None, model: str | None) -> ExpertBuffer:
        buf = cls()
        buf.root, buf.kind = files[0].parent, "upstream"
        loaded = [_UpstreamFile(p) for p in files]
        first = loaded[0]
        try:
            epoch0 = first.epoch_tensors(0, 0)
        except (IndexError, TypeError) as e:
            raise ExpertBufferError(f"{first.path}: expected experts -> epochs -> tensors ({e})") from None
        if spec is None:
            try:
                spec = infer_upstream_spec(epoch0, model)
            except ExpertBufferError as e:
                raise ExpertBufferError(f"{first.path}: {e}") from None
        want = [tuple(s) for _, s in spec.param_shapes()]
        num_epochs = None
        for f in loaded:
            for local, expert in enumerate(f.experts):
                if not isinstance(expert, (list, tuple)) or not expert:
                    raise ExpertBufferError(f"{f.path}: expert {local} is not a non-empty list of epochs")
                if num_epochs is None:
                    num_epochs = len(expert) - 1
                elif len(expert) - 1 != num_epochs:
                    raise ExpertBufferError(
                        f"{f.path}: expert {local} has {len(expert)} epochs, earlier experts {num_epochs + 1}"
                    )
                for e, tensors in enumerate(expert):
                    shapes = [tuple(t.shape) for t in tensors] if isinstance(tensors, (list, tuple)) else None
                    if shapes != want:
                        raise ExpertBufferError(
                            f"{f.path}: expert {local} epoch {e} has parameter shapes {shapes}, expected {want} "
                            f"for {spec}"
                        )
                buf._upstream.append((f, local))
        buf.spec = spec
        buf.num_epochs = int(num_epochs or 0)
        buf.expert_ids = tuple(range(len(buf._upstream)))
        return buf

    @property
    def data_spec(self) -> DataSpec | None:
        """The data the experts were trained on (``build_buffer(data_spec=...)``), or None where the buffer
        does not record it (upstream buffers, and native ones built from an in-memory dataset)."""
        record = (self.manifest or {}).get("data")
        return None if record is None else DataSpec.from_json(record, str(self.root / MANIFEST_NAME))

    def select(self, *, max_files: int | None = None, max_experts: int | None = None) -> ExpertBuffer:
        """A view of the experts in the first ``max_files`` files, the first ``max_experts`` of each
        (upstream's ``max_files`` / ``max_experts``; a native file holds one expert). None: all."""
        for name, value in (("max_files", max_files), ("max_experts", max_experts)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ExpertBuffer.select: {name} must be an int >= 1 or None, got {value!r}")
        files = max_files if max_files is not None else len(self.expert_ids) + 1
        each = max_experts if max_experts is not None else len(self.expert_ids) + 1
        view = copy.copy(self)
        if self.kind == "native":
            keep = list(range(min(files, len(self._native))))
            view._native = [self._native[i] for i in keep]
        else:
            order = {f: n for n, f in enumerate(dict.fromkeys(f for f, _ in self._upstream))}
            keep = [i for i, (f, local) in enumerate(self._upstream) if order[f] < files and local < each]
            view._upstream = [self._upstream[i] for i in keep]
        view.expert_ids = tuple(self.expert_ids[i] for i in keep)
        return view

    # ----- checks ----------------------------------------------------------------------------------------
    @property
    def _shape(self) -> tuple[int, int]:
        return (self.num_epochs + 1, self.spec.num_params)

    def check(self, *, spec: ConvNetSpec | None = None, dataset: ImageDataset | str | None = None) -> None:
        """Raise :class:`ExpertBufferError` unless this buffer is for ``spec`` and ``dataset`` (when given).

        ``dataset``: an :class:`ImageDataset` (its fingerprint is compared; for a buffer written before
        fingerprints had content roots, its legacy fingerprint) or a fingerprint string. Upstream
        buffers record no dataset; only ``spec`` is checked for them.
        """
        where = self.root / MANIFEST_NAME if self.kind == "native" else self.root
        if spec is not None and spec != self.spec:
            raise ExpertBufferError(f"{where}: buffer is for {self.spec}, expected {spec}")
        if dataset is not None and self.kind == "native":
            want = dataset.fingerprint if isinstance(dataset, ImageDataset) else str(dataset)
            known = dataset.fingerprints if isinstance(dataset, ImageDataset) else (want,)
            got = (self.manifest or {}).get("dataset", {}).get("fingerprint")
            if got not in known:
                raise ExpertBufferError(
                    f"{where}: buffer was trained on data with fingerprint {got!r}, expected {want!r} "
                    "(another dataset, preprocessing or subset)"
                )

    def verify(self) -> None:
        """Check every file's checksum now (native buffers; a no-op for upstream ones)."""
        for e in self._native:
            e.verify(self._shape)

    # ----- reading ---------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self._native) if self.kind == "native" else len(self._upstream)

    def __len__(self) -> int:
        return self.num_experts

    def _check_index(self, expert: int, epoch: int | None = None) -> None:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"{self.root}: expert {expert} out of range; the buffer has {self.num_experts}")
        if epoch is not None and not 0 <= epoch <= self.num_epochs:
            raise IndexError(f"{self.root}: epoch {epoch} out of range; experts have epochs 0..{self.num_epochs}")

    def _native_slice(self, expert: int) -> Any:
        e = self._native[expert]
        if not e.verified:
            if self.verify_mode == "none":
                e.check_size()
                e.verified = True
            else:
                e.verify(self._shape)
        return e.slice()

    def params(self, expert: int, epoch: int, *, device: torch.device | str | None = None) -> Tensor:
        """Flat parameters ``(spec.num_params,)`` float32 of ``expert`` after ``epoch`` epochs.

        Reads one row of the expert's file (memory-mapped); the file's checksum is verified on its first
        read (``verify="lazy"``). A fresh tensor, on ``device`` (default CPU).
        """
        self._check_index(expert, epoch)
        if self.kind == "native":
            out = self._native_slice(expert)[epoch]
        else:
            f, local = self._upstream[expert]
            out = _flat(f.epoch_tensors(local, epoch))
        return out if device is None else out.to(device)

    def trajectory(self, expert: int, *, device: torch.device | str | None = None) -> Tensor:
        """All epochs of ``expert``: ``(num_epochs + 1, spec.num_params)`` float32."""
        self._check_index(expert)
        if self.kind == "native":
            out = self._native_slice(expert)[:]
        else:
            f, local = self._upstream[expert]
            out = torch.stack([_flat(f.epoch_tensors(local, e)) for e in range(self.num_epochs + 1)])
        return out if device is None else out.to(device)

    def stats(self, expert: int) -> dict[str, Any]:
        """The manifest entry of ``expert`` (seed, per-epoch train/test loss and accuracy, file, sha256);
        ``{}`` for upstream buffers, which record none."""
        self._check_index(expert)
        return dict(self._native[expert].entry) if self.kind == "native" else {}

    def __iter__(self) -> Iterator[Tensor]:
        """Each expert's trajectory in turn (one in memory at a time)."""
        for i in range(self.num_experts):
            yield self.trajectory(i)

    def __repr__(self) -> str:
        return (
            f"ExpertBuffer({str(self.root)!r}, kind={self.kind!r}, experts={self.num_experts}, "
            f"epochs={self.num_epochs}, spec={self.spec})"
        )


# ----- conversion ---------------------------------------------------------------------------------------------
def convert_upstream(
    src: PathLike,
    out: PathLike,
    *,
    spec: ConvNetSpec | None = None,
    model: str | None = None,
    dataset: ImageDataset | dict[str, Any] | None = None,
    model_name: str | None = None,
    on_expert: Callable[[int], None] | None = None,
) -> ExpertBuffer:
    """Write an upstream buffer (``replay_buffer_*.pt`` in ``src``) as a native buffer in ``out``.

    ``spec``/``model`` as in :meth:`ExpertBuffer.open`. ``dataset`` (an :class:`ImageDataset` or a
    :func:`dataset_info` dict) is recorded in the manifest so that readers can check it; upstream files
    do not say what they were trained on, so this is the caller's word. The training config is
    recorded as unknown (``null``), per-epoch statistics as absent. Resumable like training: experts
    already converted are skipped. ``on_expert(i)`` is called after each expert (progress display).
    Returns the opened native buffer.
    """
    up = ExpertBuffer.open(src, spec=spec, model=model)
    info = dataset_info(dataset) if isinstance(dataset, ImageDataset) else dataset
    header = {
        "model": {"name": model_name or model or "ConvNet", "spec": spec_to_dict(up.spec)},
        "dataset": info,
        "config": None,
        "num_epochs": up.num_epochs,
        "num_params": up.spec.num_params,
        "source": {"format": "upstream replay_buffer_<n>.pt", "path": str(Path(src).resolve())},
    }
    with BufferWriter(out, header) as writer:
        done = writer.finished()
        for i in range(up.num_experts):
            if i not in done:
                writer.add(i, up.trajectory(i), {"seed": None})
            if on_expert is not None:
                on_expert(i)
        writer.set(requested_experts=up.num_experts)
    return ExpertBuffer.open(out)
