"""On-disk dataset layouts: recognise one, list the files it depends on, decode it to uint8 arrays.

Supported layouts (``Source.layout``):

==================  ================================================================================
``cifar10``         torchvision's ``cifar-10-batches-py/``: data_batch_1..5, test_batch, batches.meta
``cifar100``        torchvision's ``cifar-100-python/``: train, test, meta (fine labels)
``tinyimagenet``    ``tiny-imagenet-200/``: wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
                    val/images/*.JPEG + val/val_annotations.txt (val is the test split)
``imagefolder``     ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val/``; with both,
                    ``val/`` becomes the val split)
``npz-pixels``      Keras style: x_train (N,H,W[,C]) uint8, y_train, x_test, y_test, optional classes
``npz-jpeg``        train_bytes + train_offsets (N+1), test_*, y_train, y_test, optional classes
``npz-medmnist``    official MedMNIST: {train,val,test}_images (N,H,W[,3]) uint8, *_labels (N,1)
==================  ================================================================================

Readers return :class:`RawDataset`: uint8 ``(N, C, H, W)`` images and int64 labels, the form that is
cached. Nothing here writes anywhere. Pickles go through :mod:`._safe_pickle`; archives are opened with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from ._dataset import DatasetError
from ._decode import decode_images
from ._safe_pickle import load_pickle

__all__ = ["LAYOUTS", "RawDataset", "Source", "detect_source", "read_source"]

LAYOUTS = ("cifar10", "cifar100", "tinyimagenet", "imagefolder", "npz-pixels", "npz-jpeg", "npz-medmnist")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})

_CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
_CIFAR100_FILES = ("train", "test")

_NPZ_KEYS = MappingProxyType(
    {
        "npz-pixels": ("x_train", "y_train", "x_test", "y_test"),
        "npz-jpeg": ("train_bytes", "train_offsets", "test_bytes", "test_offsets", "y_train", "y_test"),
        "npz-medmnist": ("train_images", "train_labels", "test_images", "test_labels"),
    }
)

# Official MedMNIST v2 label names (the archives themselves carry none). Others fall back to "0", "1", ...
_ORGAN = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
          "lung-right", "pancreas", "spleen")  # fmt: skip
MEDMNIST_CLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "breastmnist": ("malignant", "normal, benign"),
        "pneumoniamnist": ("normal", "pneumonia"),
        "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                      "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                       "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                       "vascular lesions"),
        "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                       "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                       "monocyte", "neutrophil", "platelet"),
        "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                        "Proximal Tubule Segments", "Thick Ascending Limb"),
        "organamnist": _ORGAN,
        "organcmnist": _ORGAN,
        "organsmnist": _ORGAN,
    }
)  # fmt: skip


@dataclass
class RawDataset:
    """Decoded pixels as stored in the cache: uint8 ``(N, C, H, W)`` images, int64 ``(N,)`` labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None


@dataclass(frozen=True)
class _TreeIndex:
    """Image files and labels of a folder layout, found by scanning once (also feeds the fingerprint)."""

    classes: tuple[str, ...]
    splits: Mapping[str, tuple[tuple[Path, ...], tuple[int, ...]]]  # split -> (files, labels)
    extra_files: tuple[Path, ...] = ()  # annotation files the labels come from


@dataclass(frozen=True)
class Source:
    """A recognised dataset on disk.

    ``files`` lists every file whose bytes the decoded data depends on: the cache fingerprint is computed
    from them, so editing, adding or removing any of them invalidates the cached pixels.
    """

    path: Path
    layout: str
    name: str
    files: tuple[Path, ...]
    index: _TreeIndex | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------
# Recognition
# ----------------------------------------------------------------------------------------------------------


def canonical_name(stem: str) -> str:
    """``"cifar10-jpeg"`` -> ``"cifar10"``, ``"Fashion-MNIST"`` -> ``"fashion_mnist"``: a short dataset name."""
    s = stem.lower()
    for suffix in ("-jpeg", "_jpeg", "-pixels", "_pixels"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    return {
        "cifar-10-batches-py": "cifar10",
        "cifar-10": "cifar10",
        "cifar-100-python": "cifar100",
        "cifar-100": "cifar100",
        "tiny-imagenet-200": "tinyimagenet",
        "fashion-mnist": "fashion_mnist",
        "fashionmnist": "fashion_mnist",
    }.get(s, s.replace("-", "_"))


def detect_source(path: Path, *, name: str | None = None) -> Source:
    """Recognise the layout at ``path`` (a file or folder) and list its files.

    Raises :class:`DatasetError` naming ``path`` when it is missing or matches no supported layout.
    """
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    name = name or canonical_name(path.stem if path.is_file() else path.name)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(
                f"{path}: unknown dataset file type {path.suffix!r}; expected a .npz archive (or a folder: "
                "cifar-10-batches-py/, cifar-100-python/, tiny-imagenet-200/ or an ImageFolder tree)"
            )
        return Source(path, _npz_layout(path), name, (path,))
    if all((path / f).is_file() for f in (*_CIFAR10_FILES, "batches.meta")):
        return Source(path, "cifar10", name, tuple(path / f for f in (*_CIFAR10_FILES, "batches.meta")))
    if all((path / f).is_file() for f in (*_CIFAR100_FILES, "meta")):
        return Source(path, "cifar100", name, tuple(path / f for f in (*_CIFAR100_FILES, "meta")))
    if (path / "wnids.txt").is_file() and (path / "train").is_dir():
        index = _scan_tiny_imagenet(path)
        return Source(path, "tinyimagenet", name, _index_files(index), index)
    if (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir()):
        index = _scan_imagefolder(path)
        return Source(path, "imagefolder", name, _index_files(index), index)
    missing_cifar = [f for f in (*_CIFAR10_FILES, "batches.meta") if not (path / f).is_file()]
    hint = f" (CIFAR-10 files missing: {', '.join(missing_cifar)})" if len(missing_cifar) < 7 else ""
    inside = sorted(
        e.name
        for e in os.scandir(path)
        if e.name.lower().endswith(".npz") or e.name in ("cifar-10-batches-py", "cifar-100-python", "tiny-imagenet-200")
    )
    if inside:  # a folder of datasets, e.g. shared/data
        hint += f" (it holds datasets: {', '.join(inside[:6])}; pass one of them, or a name with root={path})"
    raise DatasetError(
        f"{path}: unknown dataset layout{hint}; expected cifar-10-batches-py (data_batch_1..5, test_batch, "
        "batches.meta), cifar-100-python (train, test, meta), tiny-imagenet-200 (wnids.txt, train/), or an "
        "ImageFolder tree (train/<class>/ and test/<class>/ or val/<class>/)"
    )


def read_source(source: Source) -> RawDataset:
    """Decode ``source`` into uint8 arrays and check labels against images and classes."""
    reader = {
        "cifar10": _read_cifar10,
        "cifar100": _read_cifar100,
        "tinyimagenet": _read_tree,
        "imagefolder": _read_tree,
        "npz-pixels": _read_npz,
        "npz-jpeg": _read_npz,
        "npz-medmnist": _read_npz,
    }[source.layout]
    raw = reader(source)
    _check_raw(raw, source.path)
    return raw


# ----------------------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------------------


def _labels(arr: Any, where: str, n_images: int) -> np.ndarray:
    """Labels as int64 ``(N,)``; accepts ``(N,)`` or ``(N, 1)`` (MedMNIST) integer arrays or lists."""
    a = np.asarray(arr)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DatasetError(
            f"{where}: labels have shape {a.shape}, expected (N,) or (N, 1) single-label class indices"
            + (" (multi-label data is not supported)" if a.ndim == 2 else "")
        )
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(f"{where}: labels have dtype {a.dtype}, expected integer class indices")
    if a.shape[0] != n_images:
        raise DatasetError(f"{where}: {a.shape[0]} labels for {n_images} images, expected one label per image")
    if a.size and int(a.min()) < 0:
        raise DatasetError(f"{where}: negative label {int(a.min())}, expected class indices >= 0")
    return a.astype(np.int64, copy=False)


def _check_raw(raw: RawDataset, path: Path) -> None:
    c = len(raw.classes)
    if c == 0:
        raise DatasetError(f"{path}: no classes")
    if len(set(raw.classes)) != c:
        raise DatasetError(f"{path}: duplicate class names in {raw.classes}")
    splits = [("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)]
    if raw.val_x is not None:
        splits.append(("val", raw.val_x, raw.val_y))
    for split, x, y in splits:
        assert x.dtype == np.uint8 and x.ndim == 4, (x.dtype, x.shape)  # readers guarantee this
        if y is None or y.shape != (x.shape[0],):
            raise DatasetError(f"{path}: {split} labels do not match the {x.shape[0]} {split} images")
        if y.size and int(y.max()) >= c:
            raise DatasetError(
                f"{path}: {split} label {int(y.max())} out of range, expected 0..{c - 1} for {c} classes"
            )
        if x.shape[1:] != raw.train_x.shape[1:]:
            raise DatasetError(f"{path}: {split} images are {x.shape[1:]}, train images {raw.train_x.shape[1:]}")
    counts = np.bincount(raw.train_y, minlength=c)
    if (counts == 0).any():
        k = int(np.flatnonzero(counts == 0)[0])
        raise DatasetError(f"{path}: class {raw.classes[k]!r} (label {k}) has no train images; every class needs some")


def _default_classes(name: str, *labels: np.ndarray) -> tuple[str, ...]:
    known = MEDMNIST_CLASSES.get(name)
    n = 1 + max((int(y.max()) for y in labels if y.size), default=-1)
    if known is not None and n <= len(known):
        return known
    return tuple(str(i) for i in range(n))


# ----------------------------------------------------------------------------------------------------------
# CIFAR pickles
# ----------------------------------------------------------------------------------------------------------


def _key(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    found = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d))
    raise DatasetError(f"{path}: missing key {key!r} (found: {found})")


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    data = _key(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: 'data' is {type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}, "
            "expected a uint8 array of shape (N, 3072) (3x32x32 images, channel-major)"
        )
    labels = _labels(_key(d, label_key, path), f"{path} ({label_key!r})", data.shape[0])
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(
            f"{path}: label {int(labels.max())} out of range, expected 0..{num_classes - 1} for the "
            f"{num_classes} classes in the meta file"
        )
    # Rows are R(1024) G(1024) B(1024), each row-major 32x32: exactly (C, H, W).
    return data.reshape(-1, 3, 32, 32), labels


def _names(meta_path: Path, key: str) -> tuple[str, ...]:
    names = _key(load_pickle(meta_path), key, meta_path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise DatasetError(f"{meta_path}: {key!r} should be a list of class names")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def _read_cifar10(src: Source) -> RawDataset:
    classes = _names(src.path / "batches.meta", "label_names")
    train = [_cifar_batch(src.path / f"data_batch_{i}", "labels", len(classes)) for i in range(1, 6)]
    test_x, test_y = _cifar_batch(src.path / "test_batch", "labels", len(classes))
    return RawDataset(
        name=src.name,
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
        classes=classes,
    )


def _read_cifar100(src: Source) -> RawDataset:
    classes = _names(src.path / "meta", "fine_label_names")
    train_x, train_y = _cifar_batch(src.path / "train", "fine_labels", len(classes))
    test_x, test_y = _cifar_batch(src.path / "test", "fine_labels", len(classes))
    return RawDataset(
        name=src.name,
        train_x=np.ascontiguousarray(train_x),
        train_y=train_y,
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
        classes=classes,
    )


# ----------------------------------------------------------------------------------------------------------
# .npz archives
# ----------------------------------------------------------------------------------------------------------


class _Npz:
    """``np.load(allow_pickle=False)`` whose every failure is a :class:`DatasetError` naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._z = np.load(path, allow_pickle=False)
        except Exception as e:  # BadZipFile, ValueError ("pickled data"), OSError, EOFError
            raise DatasetError(f"{path}: corrupted or not a .npz archive ({type(e).__name__}: {e})") from e
        if not isinstance(self._z, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: holds a single array, expected a .npz archive of named arrays")
        self.keys = frozenset(self._z.files)

    def __enter__(self) -> _Npz:
        return self

    def __exit__(self, *exc: object) -> None:
        self._z.close()

    def get(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise DatasetError(f"{self.path}: missing array {key!r} (found: {', '.join(sorted(self.keys))})")
        try:
            return self._z[key]
        except ValueError as e:
            if "pickle" in str(e):
                raise DatasetError(
                    f"{self.path}: array {key!r} holds Python objects; refused (allow_pickle=False), expected "
                    "plain numeric or string arrays"
                ) from e
            raise DatasetError(f"{self.path}: array {key!r} is corrupted ({e})") from e
        except Exception as e:  # zlib.error, BadZipFile (CRC), EOFError on truncated members
            raise DatasetError(f"{self.path}: array {key!r} is corrupted ({type(e).__name__}: {e})") from e


def _npz_layout(path: Path) -> str:
    with _Npz(path) as z:
        for layout, keys in _NPZ_KEYS.items():
            if all(k in z.keys for k in keys):
                return layout
        expected = "; ".join(f"{layout}: {', '.join(keys)}" for layout, keys in _NPZ_KEYS.items())
        raise DatasetError(
            f"{path}: unknown .npz layout (arrays: {', '.join(sorted(z.keys)) or 'none'}); expected one of {expected}"
        )


def _pixels(a: np.ndarray, where: str) -> np.ndarray:
    """Keras-style ``(N, H, W)`` or ``(N, H, W, C)`` uint8 -> ``(N, C, H, W)``."""
    if a.dtype != np.uint8:
        raise DatasetError(f"{where}: images have dtype {a.dtype}, expected uint8 pixels in 0..255")
    if a.ndim == 3:
        return np.ascontiguousarray(a[:, None])
    if a.ndim == 4 and a.shape[3] in (1, 3):
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    raise DatasetError(f"{where}: images have shape {a.shape}, expected (N, H, W) or (N, H, W, C) with C = 1 or 3")


def _encoded(z: _Npz, split: str) -> np.ndarray:
    data, offsets = z.get(f"{split}_bytes"), z.get(f"{split}_offsets")
    where = f"{z.path}: {split}_offsets"
    if data.dtype != np.uint8 or data.ndim != 1:
        raise DatasetError(f"{z.path}: {split}_bytes is {data.dtype} {data.shape}, expected a 1-D uint8 byte array")
    if offsets.ndim != 1 or offsets.shape[0] < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise DatasetError(f"{where}: shape {offsets.shape} dtype {offsets.dtype}, expected (N+1,) integers, N >= 1")
    if offsets[0] != 0 or offsets[-1] != data.shape[0] or (np.diff(offsets) <= 0).any():
        raise DatasetError(
            f"{where}: expected increasing offsets from 0 to len({split}_bytes) = {data.shape[0]}, got "
            f"{int(offsets[0])} .. {int(offsets[-1])}"
        )
    offs = offsets.astype(np.int64).tolist()
    views = [memoryview(data)[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]
    return decode_images(views, describe=lambda i: f"{z.path}: {split} image {i}")


def _read_npz(src: Source) -> RawDataset:
    path = src.path
    with _Npz(path) as z:
        val_x = val_y = None
        if src.layout == "npz-pixels":
            train_x, test_x = _pixels(z.get("x_train"), f"{path}: x_train"), _pixels(z.get("x_test"), f"{path}: x_test")
            train_y = _labels(z.get("y_train"), f"{path}: y_train", train_x.shape[0])
            test_y = _labels(z.get("y_test"), f"{path}: y_test", test_x.shape[0])
        elif src.layout == "npz-jpeg":
            # Check label counts against the offsets before spending seconds on decoding.
            n_train, n_test = z.get("train_offsets").shape[0] - 1, z.get("test_offsets").shape[0] - 1
            train_y = _labels(z.get("y_train"), f"{path}: y_train", n_train)
            test_y = _labels(z.get("y_test"), f"{path}: y_test", n_test)
            train_x, test_x = _encoded(z, "train"), _encoded(z, "test")
        else:  # npz-medmnist
            train_x = _pixels(z.get("train_images"), f"{path}: train_images")
            test_x = _pixels(z.get("test_images"), f"{path}: test_images")
            train_y = _labels(z.get("train_labels"), f"{path}: train_labels", train_x.shape[0])
            test_y = _labels(z.get("test_labels"), f"{path}: test_labels", test_x.shape[0])
            if "val_images" in z.keys or "val_labels" in z.keys:
                val_x = _pixels(z.get("val_images"), f"{path}: val_images")
                val_y = _labels(z.get("val_labels"), f"{path}: val_labels", val_x.shape[0])
        if "classes" in z.keys:
            names = z.get("classes")
            if names.ndim != 1 or names.dtype.kind not in "US":
                raise DatasetError(f"{path}: classes is {names.dtype} {names.shape}, expected a 1-D string array")
            classes = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names.tolist())
        else:
            classes = _default_classes(src.name, train_y, test_y, *([] if val_y is None else [val_y]))
    return RawDataset(src.name, train_x, train_y, test_x, test_y, classes, val_x, val_y)


# ----------------------------------------------------------------------------------------------------------
# Folder trees
# ----------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, like torchvision's ImageFolder), sorted, hidden ones skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return out


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_imagefolder(root: Path) -> _TreeIndex:
    classes = _class_dirs(root / "train")
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class folders, expected train/<class>/<image files>")
    lookup = {c: i for i, c in enumerate(classes)}
    # test/ is the test split; val/ is the test split when there is no test/, else a separate val split.
    split_dirs = {"train": "train", "test": "test" if (root / "test").is_dir() else "val"}
    if split_dirs["test"] == "test" and (root / "val").is_dir():
        split_dirs["val"] = "val"
    splits: dict[str, tuple[tuple[Path, ...], tuple[int, ...]]] = {}
    for split, dirname in split_dirs.items():
        files: list[Path] = []
        labels: list[int] = []
        for c in _class_dirs(root / dirname):
            if c not in lookup:
                raise DatasetError(
                    f"{root / dirname / c}: class folder not found in {root / 'train'}; expected the classes "
                    f"of train/ ({len(classes)}: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
                )
            found = _image_files(root / dirname / c)
            if not found:
                raise DatasetError(
                    f"{root / dirname / c}: class folder has no images (expected files ending in "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            files += found
            labels += [lookup[c]] * len(found)
        if not files:
            raise DatasetError(f"{root / dirname}: no class folders with images")
        splits[split] = (tuple(files), tuple(labels))
    return _TreeIndex(tuple(classes), MappingProxyType(splits))


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e


def _scan_tiny_imagenet(root: Path) -> _TreeIndex:
    wnids_file, words_file, ann_file = root / "wnids.txt", root / "words.txt", root / "val" / "val_annotations.txt"
    # Sorted WordNet ids, the order torchvision's ImageFolder gives train/ (wnids.txt itself is unsorted).
    wnids = sorted(set(_read_lines(wnids_file)))
    if not wnids:
        raise DatasetError(f"{wnids_file}: no WordNet ids, expected one id (e.g. n01443537) per line")
    lookup = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if words_file.is_file():
        for line in _read_lines(words_file):
            wnid, _, text = line.partition("\t")
            words[wnid] = text.strip()
    classes = tuple(words.get(w) or w for w in wnids)
    if len(set(classes)) != len(classes):  # two wnids with one description: keep them apart
        classes = tuple(f"{c} ({w})" for c, w in zip(classes, wnids))

    train_files: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        folder = root / "train" / w / "images"
        found = _image_files(folder) if folder.is_dir() else []
        if not found:
            raise DatasetError(f"{folder}: class {w} has no images, expected train/{w}/images/*.JPEG")
        train_files += found
        train_labels += [lookup[w]] * len(found)

    test_files: list[Path] = []
    test_labels: list[int] = []
    for lineno, line in enumerate(_read_lines(ann_file), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            raise DatasetError(f"{ann_file}:{lineno}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        file, wnid = parts[0], parts[1]
        if wnid not in lookup:
            raise DatasetError(f"{ann_file}:{lineno}: WordNet id {wnid!r} is not in {wnids_file}")
        image = root / "val" / "images" / file
        if not image.is_file():
            raise DatasetError(f"{ann_file}:{lineno}: image {image} not found")
        test_files.append(image)
        test_labels.append(lookup[wnid])
    if not test_files:
        raise DatasetError(f"{ann_file}: no annotated validation images (the test split)")
    splits = {"train": (tuple(train_files), tuple(train_labels)), "test": (tuple(test_files), tuple(test_labels))}
    extra = (wnids_file, ann_file) + ((words_file,) if words_file.is_file() else ())
    return _TreeIndex(classes, MappingProxyType(splits), extra)


def _index_files(index: _TreeIndex) -> tuple[Path, ...]:
    def it() -> Iterator[Path]:
        yield from index.extra_files
        for files, _ in index.splits.values():
            yield from files

    return tuple(it())


def _read_tree(src: Source) -> RawDataset:
    assert src.index is not None
    decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (files, labels) in src.index.splits.items():
        x = decode_images(files, describe=_describe_files(files))
        decoded[split] = (x, np.asarray(labels, dtype=np.int64))
    # One channel count for all splits: if any split has colour, repeat grey splits into RGB.
    c = max(x.shape[1] for x, _ in decoded.values())
    decoded = {s: (np.repeat(x, c, axis=1) if x.shape[1] != c else x, y) for s, (x, y) in decoded.items()}
    val = decoded.get("val")
    return RawDataset(
        name=src.name,
        train_x=decoded["train"][0],
        train_y=decoded["train"][1],
        test_x=decoded["test"][0],
        test_y=decoded["test"][1],
        classes=src.index.classes,
        val_x=None if val is None else val[0],
        val_y=None if val is None else val[1],
    )


def _describe_files(files: Sequence[Path]) -> Callable[[int], str]:
    return lambda i: str(files[i])
