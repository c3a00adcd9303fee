"""Tests for datm_fast.data: layouts, cache, long-tail subsampling, transforms and real datasets.

Small datasets are fabricated in tmp_path in each supported on-disk layout; the real datasets in
../shared/data are read through the ``shared_data`` fixture and decoded once per session.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datm_fast.data.cache as data_cache
import datm_fast.data.loading as loading
from datm_fast.data import (
    DatasetError,
    DataSpec,
    ImageDataset,
    Normalize,
    ZCAWhitening,
    load_dataset,
    long_tail_counts,
    long_tailed,
    preprocess,
    subset_dataset,
)
from datm_fast.data import transforms as transforms_mod

# ------------------------------------------------------------------------------------------------------
# Fabricated layouts
# ------------------------------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Py2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote str (SHORT_BINSTRING / BINSTRING), as in the real CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes_py2(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_py2


def _dump(path: Path, obj: object, protocol: int | str = 2) -> None:
    """``pickle.dump``; ``protocol="py2"`` mimics the original Python 2 CIFAR files: bytes keys and names
    as BINSTRING, array buffers as BINSTRING, and NumPy 1's ``numpy.core.multiarray`` global."""
    if protocol == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        return
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _py2(obj: object) -> object:
    """Python 2 dict keys and strings were bytes."""
    if isinstance(obj, dict):
        return {k.encode(): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj.encode() if isinstance(obj, str) else obj


def make_cifar10(root: Path, n: int = 20, protocol: int | str = 2, seed: int = 0) -> tuple[Path, dict]:
    """torchvision's cifar-10-batches-py/ with ``n`` images per batch file; returns the folder and the truth."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    truth = {"train_x": [], "train_y": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        labels[:10] = list(range(10))  # every class present in every batch
        names = [f"{i}.png" for i in range(n)]
        batch = {"batch_label": f"batch {name}", "labels": labels, "data": data, "filenames": names}
        _dump(folder / name, _py2(batch) if protocol == "py2" else batch, protocol)
        if name == "test_batch":
            truth["test_x"], truth["test_y"] = data, labels
        else:
            truth["train_x"].append(data)
            truth["train_y"] += labels
    meta = {"num_cases_per_batch": n, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    _dump(folder / "batches.meta", _py2(meta) if protocol == "py2" else meta, protocol)
    truth["train_x"] = np.concatenate(truth["train_x"])
    return folder, truth


def make_cifar100(root: Path, n: int = 120) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    truth = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [i % 100 for i in range(n)]
        _dump(folder / split, {"filenames": [], "batch_label": split, "fine_labels": fine,
                               "coarse_labels": [f // 5 for f in fine], "data": data})  # fmt: skip
        truth[split] = (data, fine)
    names = [f"class_{i:02d}" for i in range(100)]
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return folder, truth


def _save_image(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array, mode=mode).save(path, format=fmt)


def make_imagefolder(root: Path, splits=("train", "test"), size=(6, 5), seed: int = 0) -> dict:
    """root/<split>/<class>/*.png with random RGB pixels (PNG: lossless, so pixels can be compared exactly)."""
    rng = np.random.default_rng(seed)
    truth: dict = {}
    for split in splits:
        xs, ys = [], []
        for label, cls in enumerate(["cat", "dog", "emu"]):
            for i in range(2 + label):
                a = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
                _save_image(root / split / cls / f"{i:03d}.png", a)
                xs.append(a.transpose(2, 0, 1))
                ys.append(label)
        truth[split] = (np.stack(xs), np.array(ys))
    return truth


WNIDS = ["n02000002", "n01000001", "n03000003"]  # deliberately unsorted, as wnids.txt is
COLOURS = {"n01000001": (200, 30, 30), "n02000002": (30, 200, 30), "n03000003": (30, 30, 200)}


def make_tiny_imagenet(root: Path, per_class: int = 2) -> Path:
    """A 3-class tiny-imagenet-200/ tree of constant-colour 16x16 JPEGs (constant colours survive JPEG)."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    words = ["n01000001\tgoldfish, Carassius auratus", "n02000002\tpolar bear", "n03000003\tteapot", "n09999999\tx"]
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    for w in WNIDS:
        for i in range(per_class):
            a = np.full((16, 16, 3), COLOURS[w], dtype=np.uint8)
            _save_image(folder / "train" / w / "images" / f"{w}_{i}.JPEG", a, "JPEG")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    # Tiny ImageNet has a few greyscale JPEGs: they must come out as RGB.
    grey = np.full((16, 16), 128, np.uint8)
    _save_image(folder / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_grey.JPEG", grey, "JPEG")
    lines = []
    for i, w in enumerate(WNIDS * 2):
        _save_image(folder / "val" / "images" / f"val_{i}.JPEG", np.full((16, 16, 3), COLOURS[w], np.uint8), "JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t15\t15")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def _encode(arrays: np.ndarray, fmt: str = "PNG") -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format=fmt)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets


def make_pixels_npz(path: Path, n_train=30, n_test=12, shape=(5, 4, 3), classes=("a", "b", "c"), seed=0, **over):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % len(classes),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % len(classes),
        "classes": np.array(classes),
    }
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def make_jpeg_npz(path: Path, fmt: str = "PNG", **over) -> dict:
    rng = np.random.default_rng(3)
    x_train = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    train_bytes, train_offsets = _encode(x_train, fmt)
    test_bytes, test_offsets = _encode(x_test, fmt)
    arrays = {
        "train_bytes": train_bytes,
        "train_offsets": train_offsets,
        "test_bytes": test_bytes,
        "test_offsets": test_offsets,
        "y_train": np.arange(12, dtype=np.int64) % 4,
        "y_test": np.arange(6, dtype=np.int64) % 4,
        "classes": np.array(["w", "x", "y", "z"]),
    }
    arrays.update(over)
    np.savez_compressed(path, **arrays)
    return {"x_train": x_train, "x_test": x_test, **arrays}


def make_medmnist_npz(path: Path, rgb: bool = False) -> dict:
    rng = np.random.default_rng(4)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return arrays


def _as_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0)


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------------------------
# CIFAR pickles
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar10_pickles(tmp_path, protocol):
    folder, truth = make_cifar10(tmp_path / "data", protocol=protocol)
    ds = load_dataset(folder, cache_dir=tmp_path / "cache")
    assert ds.name == "cifar10" and ds.classes == tuple(CIFAR10_NAMES)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.train_images.dtype == torch.float32
    assert ds.test_images.shape == (20, 3, 32, 32)
    # Rows are R(1024) G(1024) B(1024), each row-major 32x32: exactly (C, H, W).
    torch.testing.assert_close(ds.train_images, _as_float(truth["train_x"].reshape(-1, 3, 32, 32)), rtol=0, atol=0)
    torch.testing.assert_close(ds.test_images, _as_float(truth["test_x"].reshape(-1, 3, 32, 32)), rtol=0, atol=0)
    assert ds.train_labels.tolist() == truth["train_y"] and ds.train_labels.dtype == torch.int64
    assert ds.test_labels.tolist() == truth["test_y"]
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 3, (32, 32))


def test_cifar10_by_name_under_root(tmp_path):
    make_cifar10(tmp_path / "data")
    ds = load_dataset("cifar10", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert ds.train_labels.shape == (100,)
    assert load_dataset("CIFAR-10", root=tmp_path / "data", cache_dir=tmp_path / "cache").name == "cifar10"


def test_cifar10_bytes_keys(tmp_path):
    """Python 3 pickles of Python 2 dicts (bytes keys and names, _codecs.encode at protocol 2) also load."""
    folder, truth = make_cifar10(tmp_path / "data")
    batch = {b"labels": truth["test_y"], b"data": truth["test_x"], b"filenames": [b"a.png"]}
    _dump(folder / "test_batch", batch, 2)
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]}, 2)
    ds = load_dataset(folder, cache=False)
    assert ds.classes == tuple(CIFAR10_NAMES)
    assert ds.test_labels.tolist() == truth["test_y"]


def test_cifar100_pickles(tmp_path):
    folder, truth = make_cifar100(tmp_path / "data")
    ds = load_dataset("cifar100", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert ds.num_classes == 100 and ds.classes[7] == "class_07"
    torch.testing.assert_close(ds.train_images, _as_float(truth["train"][0].reshape(-1, 3, 32, 32)), rtol=0, atol=0)
    assert ds.train_labels.tolist() == truth["train"][1]  # fine labels, not coarse
    assert ds.test_labels.tolist() == truth["test"][1]


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_malicious_cifar_pickle_refused(tmp_path, payload):
    folder, _ = make_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    evil = _Evil(f"touch {marker}") if payload == "os.system" else _EvalEvil()
    _dump(folder / "data_batch_3", {"data": evil, "labels": [0]}, 4)
    with pytest.raises(DatasetError, match="data_batch_3") as info:
        load_dataset(folder, cache_dir=tmp_path / "cache")
    assert "refused" in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------
# Tiny ImageNet and ImageFolder
# ------------------------------------------------------------------------------------------------------


def test_tiny_imagenet_tree(tmp_path):
    make_tiny_imagenet(tmp_path / "data")
    ds = load_dataset("tiny", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert ds.name == "tinyimagenet"
    # Classes follow sorted WordNet ids (ImageFolder order), named by words.txt.
    assert ds.classes == ("goldfish, Carassius auratus", "polar bear", "teapot")
    assert ds.train_images.shape == (7, 3, 16, 16) and ds.test_images.shape == (6, 3, 16, 16)
    assert ds.class_counts("train").tolist() == [2, 3, 2]  # n02000002 has the extra grey image
    assert ds.class_counts("test").tolist() == [2, 2, 2]
    sorted_wnids = sorted(WNIDS)
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        for img, label in zip(images, labels):
            colour = torch.tensor(COLOURS[sorted_wnids[label]], dtype=torch.float32) / 255
            pixel = img[:, 8, 8]
            if not torch.allclose(pixel, torch.full((3,), 128 / 255), atol=3 / 255):  # the grey image
                torch.testing.assert_close(pixel, colour, atol=4 / 255, rtol=0)


def test_imagefolder_train_test(tmp_path):
    truth = make_imagefolder(tmp_path / "data")
    ds = load_dataset(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert ds.name == "data" and ds.classes == ("cat", "dog", "emu")
    for split in ("train", "test"):
        x, y = truth[split]
        torch.testing.assert_close(getattr(ds, f"{split}_images"), _as_float(x), rtol=0, atol=0)
        assert getattr(ds, f"{split}_labels").tolist() == y.tolist()
    assert ds.val_images is None


def test_imagefolder_val_as_test_and_val_split(tmp_path):
    truth = make_imagefolder(tmp_path / "a", splits=("train", "val"))
    ds = load_dataset(tmp_path / "a", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(ds.test_images, _as_float(truth["val"][0]), rtol=0, atol=0)
    assert ds.val_images is None
    truth = make_imagefolder(tmp_path / "b", splits=("train", "val", "test"))
    ds = load_dataset(tmp_path / "b", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(ds.test_images, _as_float(truth["test"][0]), rtol=0, atol=0)
    torch.testing.assert_close(ds.val_images, _as_float(truth["val"][0]), rtol=0, atol=0)


def test_imagefolder_grey(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        for cls in ("0", "1"):
            arrays[split, cls] = rng.integers(0, 256, (4, 4), dtype=np.uint8)
            _save_image(tmp_path / "d" / split / cls / "x.png", arrays[split, cls])
    ds = load_dataset(tmp_path / "d", cache=False)
    assert ds.channels == 1
    torch.testing.assert_close(ds.train_images[1, 0], _as_float(arrays["train", "1"]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# .npz archives
# ------------------------------------------------------------------------------------------------------


def test_npz_pixels(tmp_path):
    arrays = make_pixels_npz(tmp_path / "toy.npz")
    ds = load_dataset(tmp_path / "toy.npz", cache_dir=tmp_path / "cache")
    assert ds.name == "toy" and ds.classes == ("a", "b", "c")
    torch.testing.assert_close(ds.train_images, _as_float(arrays["x_train"].transpose(0, 3, 1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(ds.test_images, _as_float(arrays["x_test"].transpose(0, 3, 1, 2)), rtol=0, atol=0)
    assert ds.train_labels.tolist() == arrays["y_train"].tolist()
    assert ds.image_size == (5, 4) and ds.channels == 3


def test_npz_pixels_grey_without_classes(tmp_path):
    make_pixels_npz(tmp_path / "g.npz", shape=(6, 6), classes=("a", "b"))
    arrays = dict(np.load(tmp_path / "g.npz"))
    del arrays["classes"]
    np.savez(tmp_path / "g.npz", **arrays)
    ds = load_dataset(tmp_path / "g.npz", cache=False)
    assert ds.channels == 1 and ds.classes == ("0", "1")
    torch.testing.assert_close(ds.train_images[:, 0], _as_float(arrays["x_train"]), rtol=0, atol=0)


def test_npz_encoded_png_exact(tmp_path):
    arrays = make_jpeg_npz(tmp_path / "enc.npz", fmt="PNG")
    ds = load_dataset(tmp_path / "enc.npz", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(ds.train_images, _as_float(arrays["x_train"].transpose(0, 3, 1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(ds.test_images, _as_float(arrays["x_test"].transpose(0, 3, 1, 2)), rtol=0, atol=0)
    assert ds.classes == ("w", "x", "y", "z") and ds.test_labels.tolist() == arrays["y_test"].tolist()


def test_npz_encoded_jpeg(tmp_path):
    # JPEG is lossy; constant-colour images come back within a few levels.
    colours = np.random.default_rng(0).integers(0, 256, (12, 1, 1, 3), dtype=np.uint8)
    x_train = np.ascontiguousarray(np.broadcast_to(colours, (12, 16, 16, 3)))
    train_bytes, train_offsets = _encode(x_train, "JPEG")
    test_bytes, test_offsets = _encode(x_train[:6], "JPEG")
    make_jpeg_npz(
        tmp_path / "mine-jpeg.npz",
        train_bytes=train_bytes,
        train_offsets=train_offsets,
        test_bytes=test_bytes,
        test_offsets=test_offsets,
    )
    ds = load_dataset(tmp_path / "mine-jpeg.npz", cache=False)
    assert ds.name == "mine" and ds.train_images.shape == (12, 3, 16, 16)
    ref = _as_float(x_train.transpose(0, 3, 1, 2))
    torch.testing.assert_close(ds.train_images, ref, rtol=0, atol=6 / 255)


@pytest.mark.parametrize("rgb", [False, True])
def test_npz_medmnist(tmp_path, rgb):
    arrays = make_medmnist_npz(tmp_path / "breastmnist.npz", rgb=rgb)
    ds = load_dataset("breastmnist", root=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.classes == ("malignant", "normal, benign")
    assert ds.channels == (3 if rgb else 1) and ds.image_size == (28, 28)
    assert ds.train_labels.shape == (20,) and ds.train_labels.dtype == torch.int64
    # test is the official test split; val is kept apart, and merged only on request.
    assert ds.test_labels.tolist() == arrays["test_labels"][:, 0].tolist()
    want = arrays["test_images"] if rgb else arrays["test_images"][..., None]
    torch.testing.assert_close(ds.test_images, _as_float(want.transpose(0, 3, 1, 2)), rtol=0, atol=0)
    assert ds.val_images.shape[0] == 6 and ds.val_labels.tolist() == arrays["val_labels"][:, 0].tolist()
    merged = ds.with_val_merged()
    assert merged.train_images.shape[0] == 26 and merged.val_images is None
    torch.testing.assert_close(merged.train_images[20:], ds.val_images)
    assert merged.test_images is ds.test_images


def test_unknown_medmnist_name_gets_numbered_classes(tmp_path):
    make_medmnist_npz(tmp_path / "somethingmnist.npz")
    assert load_dataset(tmp_path / "somethingmnist.npz", cache=False).classes == ("0", "1")


# ------------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------------


def test_cache_hit_skips_decoding_and_data_dir_untouched(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    make_jpeg_npz(data / "enc.npz")
    make_imagefolder(data / "tree")
    before = _snapshot(data)
    cache = tmp_path / "cache"
    first = [load_dataset(data / "enc.npz", cache_dir=cache), load_dataset(data / "tree", cache_dir=cache)]
    assert len(list((cache / "datasets").glob("*.npz"))) == 2

    def no_decode(source):
        raise AssertionError(f"decoded {source.path} again despite the cache")

    monkeypatch.setattr(loading, "read_source", no_decode)
    second = [load_dataset(data / "enc.npz", cache_dir=cache), load_dataset(data / "tree", cache_dir=cache)]
    for a, b in zip(first, second):
        torch.testing.assert_close(a.train_images, b.train_images, rtol=0, atol=0)
        assert a.classes == b.classes and a.fingerprint == b.fingerprint
    assert _snapshot(data) == before


def test_default_cache_dir_used(tmp_path, cache_dir):
    make_pixels_npz(tmp_path / "p.npz")
    load_dataset(tmp_path / "p.npz")
    assert len(list((cache_dir / "datasets").glob("p-npz-pixels-*.npz"))) == 1


def test_cache_disabled_writes_nothing(tmp_path, cache_dir):
    make_pixels_npz(tmp_path / "p.npz")
    load_dataset(tmp_path / "p.npz", cache=False)
    assert not cache_dir.exists()


def test_changed_source_is_decoded_again(tmp_path):
    path = tmp_path / "p.npz"
    make_pixels_npz(path, seed=0)
    a = load_dataset(path, cache_dir=tmp_path / "cache")
    stat = path.stat()
    arrays = make_pixels_npz(path, seed=1)  # same shapes, so the same file size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert path.stat().st_size == stat.st_size
    b = load_dataset(path, cache_dir=tmp_path / "cache")
    assert a.fingerprint != b.fingerprint
    torch.testing.assert_close(b.train_images, _as_float(arrays["x_train"].transpose(0, 3, 1, 2)), rtol=0, atol=0)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npz"))) == 2


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    make_pixels_npz(tmp_path / "p.npz")
    a = load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "datasets").glob("*.npz")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        b = load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(a.train_images, b.train_images, rtol=0, atol=0)
    assert np.load(entry)["train_x"].shape == (30, 3, 5, 4)


def test_cache_inside_data_dir_refused(tmp_path):
    make_imagefolder(tmp_path / "data")
    with pytest.raises(DatasetError, match="inside the data directory"):
        load_dataset(tmp_path / "data", cache_dir=tmp_path / "data" / "cache")
    assert not (tmp_path / "data" / "cache").exists()


# ------------------------------------------------------------------------------------------------------
# Bad input: every error names the file
# ------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path, cache_dir):
    with pytest.raises(DatasetError, match="nope.npz: no such file"):
        load_dataset(tmp_path / "nope.npz", cache=False)
    with pytest.raises(DatasetError, match=r"no 'mnist' dataset found; looked for mnist\.npz"):
        load_dataset("mnist", root=tmp_path, cache=False)
    with pytest.raises(DatasetError, match="missing_root: dataset root not found"):
        load_dataset("mnist", root=tmp_path / "missing_root", cache=False)
    # A name without a root is looked up where downloads go, under the cache directory.
    with pytest.raises(DatasetError, match=r"raw: dataset root not found, looking for 'mnist' \(no root given"):
        load_dataset("mnist", cache=False)


def test_unknown_layouts(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"stuff: unknown dataset layout.*ImageFolder"):
        load_dataset(tmp_path / "stuff", cache=False)
    np.savez(tmp_path / "odd.npz", foo=np.zeros(3))
    with pytest.raises(DatasetError, match=r"odd.npz: unknown .npz layout \(arrays: foo\); expected"):
        load_dataset(tmp_path / "odd.npz", cache=False)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DatasetError, match=r"x.csv: unknown dataset file type"):
        load_dataset(tmp_path / "x.csv", cache=False)
    # A folder of datasets rather than a dataset: say what is inside.
    with pytest.raises(DatasetError, match=r"it holds datasets: odd.npz; pass one of them, or a name with root="):
        load_dataset(tmp_path, cache=False)


def test_incomplete_cifar_folder_names_missing_files(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="CIFAR-10 files missing: data_batch_4"):
        load_dataset(folder, cache=False)


def test_class_with_no_images(tmp_path):
    make_imagefolder(tmp_path / "data")
    (tmp_path / "data" / "train" / "fox").mkdir()
    with pytest.raises(DatasetError, match=r"train[/\\]fox: class folder has no images"):
        load_dataset(tmp_path / "data", cache=False)
    folder = make_tiny_imagenet(tmp_path / "tiny")
    for f in (folder / "train" / WNIDS[2] / "images").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=f"{WNIDS[2]}.images: class {WNIDS[2]} has no images"):
        load_dataset(folder, cache=False)
    # An archive whose labels never use a class.
    make_pixels_npz(tmp_path / "gap.npz", y_train=np.zeros(30, dtype=np.int64))
    with pytest.raises(DatasetError, match=r"gap.npz: class 'b' \(label 1\) has no train images"):
        load_dataset(tmp_path / "gap.npz", cache=False)


def test_label_count_mismatch(tmp_path):
    make_pixels_npz(tmp_path / "short.npz", y_train=np.zeros(29, dtype=np.int64))
    with pytest.raises(DatasetError, match="short.npz: y_train: 29 labels for 30 images"):
        load_dataset(tmp_path / "short.npz", cache=False)
    folder, truth = make_cifar10(tmp_path / "c")
    _dump(folder / "data_batch_2", {"data": truth["test_x"], "labels": [0] * 19})
    with pytest.raises(DatasetError, match="data_batch_2.*19 labels for 20 images"):
        load_dataset(folder, cache=False)
    make_medmnist_npz(tmp_path / "m.npz")
    arrays = dict(np.load(tmp_path / "m.npz"))
    arrays["val_labels"] = arrays["val_labels"][:3]
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(DatasetError, match="m.npz: val_labels: 3 labels for 6 images"):
        load_dataset(tmp_path / "m.npz", cache=False)


def test_label_out_of_range(tmp_path):
    y = np.arange(30, dtype=np.int64) % 3
    y[5] = 7
    make_pixels_npz(tmp_path / "big.npz", y_train=y)
    with pytest.raises(DatasetError, match=r"big.npz: train label 7 out of range, expected 0..2 for 3 classes"):
        load_dataset(tmp_path / "big.npz", cache=False)
    y[5] = -1
    make_pixels_npz(tmp_path / "neg.npz", y_train=y)
    with pytest.raises(DatasetError, match="neg.npz: y_train: negative label -1"):
        load_dataset(tmp_path / "neg.npz", cache=False)
    folder, truth = make_cifar10(tmp_path / "c")
    _dump(folder / "test_batch", {"data": truth["test_x"], "labels": [10] * 20})
    with pytest.raises(DatasetError, match="test_batch: label 10 out of range, expected 0..9"):
        load_dataset(folder, cache=False)
    make_pixels_npz(tmp_path / "float.npz", y_train=y.astype(np.float32))
    with pytest.raises(DatasetError, match="float.npz: y_train: labels have dtype float32"):
        load_dataset(tmp_path / "float.npz", cache=False)


def test_corrupted_archives(tmp_path):
    make_pixels_npz(tmp_path / "full.npz")
    raw = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="trunc.npz: corrupted or not a .npz archive"):
        load_dataset(tmp_path / "trunc.npz", cache=False)
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="junk.npz: corrupted"):
        load_dataset(tmp_path / "junk.npz", cache=False)
    # A damaged member (bytes flipped inside the stored x_train array) fails its CRC check.
    flipped = bytearray(raw)
    start = raw.index(b"x_train.npy") + 200
    flipped[start : start + 16] = bytes(16)
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match="crc.npz: array 'x_train' is corrupted"):
        load_dataset(tmp_path / "crc.npz", cache=False)
    # Object arrays would need pickle: refused, never unpickled.
    make_pixels_npz(tmp_path / "obj.npz", classes=np.array(["a", "b", "c"], dtype=object))
    with pytest.raises(DatasetError, match="obj.npz: array 'classes' holds Python objects; refused"):
        load_dataset(tmp_path / "obj.npz", cache=False)


def test_corrupted_pickle_and_image(tmp_path):
    folder, _ = make_cifar10(tmp_path / "c")
    (folder / "data_batch_5").write_bytes(b"\x80\x02}q\x00(X\x04")
    with pytest.raises(DatasetError, match="data_batch_5: corrupted or not a pickle"):
        load_dataset(folder, cache=False)
    arrays = make_jpeg_npz(tmp_path / "enc.npz")
    data = arrays["train_bytes"].copy()
    lo, hi = arrays["train_offsets"][4], arrays["train_offsets"][5]
    data[lo:hi] = 7  # image 4 is now garbage
    make_jpeg_npz(tmp_path / "bad.npz", train_bytes=data)
    with pytest.raises(DatasetError, match="bad.npz: train image 4: cannot decode image"):
        load_dataset(tmp_path / "bad.npz", cache=False)
    make_jpeg_npz(tmp_path / "offs.npz", train_offsets=arrays["train_offsets"][:-1])
    with pytest.raises(DatasetError, match=r"offs.npz: y_train: 12 labels for 11 images"):
        load_dataset(tmp_path / "offs.npz", cache=False)


def test_mixed_image_sizes(tmp_path):
    make_imagefolder(tmp_path / "d")
    _save_image(tmp_path / "d" / "train" / "dog" / "big.png", np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"big.png: image is 9x9 \(WxH\), expected 5x6"):
        load_dataset(tmp_path / "d", cache=False)


def test_download_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetError, match="download=True needs torchvision"):
        load_dataset("cifar10", root=tmp_path, download=True, cache=False)
    with pytest.raises(DatasetError, match="cannot download 'mnist'"):
        load_dataset("mnist", root=tmp_path, download=True, cache=False)


def test_download_through_torchvision(tmp_path, monkeypatch):
    """download=True calls torchvision's CIFAR10(root, train, download=True) for both splits, then loads."""
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (Path(root) / "cifar-10-batches-py").exists():
                make_cifar10(Path(root))

    fake = types.ModuleType("torchvision.datasets")
    fake.CIFAR10 = FakeCIFAR10
    package = types.ModuleType("torchvision")
    package.datasets = fake
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    ds = load_dataset("cifar10", root=tmp_path / "raw", download=True, cache_dir=tmp_path / "cache")
    assert calls == [(str(tmp_path / "raw"), True, True), (str(tmp_path / "raw"), False, True)]
    assert ds.train_images.shape == (100, 3, 32, 32)
    load_dataset("cifar10", root=tmp_path / "raw", download=True, cache_dir=tmp_path / "cache")
    assert len(calls) == 2  # present now: not downloaded again


def test_image_dataset_validation():
    x = torch.zeros(4, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1])
    ImageDataset("ok", x, y, x, y, ("a", "b"))
    with pytest.raises(DatasetError, match="3 train labels for 4 train images"):
        ImageDataset("bad", x, y[:3], x, y, ("a", "b"))
    with pytest.raises(DatasetError, match=r"test labels span \[0, 1\], expected \[0, 0\]"):
        ImageDataset("bad", x, torch.zeros(4, dtype=torch.int64), x, y, ("a",))
    assert "train=4" in repr(ImageDataset("ok", x, y, x, y, ("a", "b")))


# ------------------------------------------------------------------------------------------------------
# Long-tailed variants
# ------------------------------------------------------------------------------------------------------


def test_long_tail_counts_match_cifar10_lt():
    # The CIFAR-10-LT sizes of Cao et al. 2019: 12,406 images at factor 100, 20,431 at factor 10.
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5000, 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    assert sum(long_tail_counts(5000, 10, 100)) == 12406 and sum(long_tail_counts(5000, 10, 10)) == 20431
    assert sum(long_tail_counts(5000, 10, 50)) == 13996 and sum(long_tail_counts(5000, 10, 200)) == 11203
    assert long_tail_counts(500, 100, 100)[-1] == 5  # CIFAR-100-LT
    assert long_tail_counts(7, 3, 1) == [7, 7, 7]


def _balanced(per_class: int = 60, classes: int = 10) -> ImageDataset:
    n = per_class * classes
    labels = torch.arange(n) % classes
    # Each image holds its own index, so the chosen subset can be read back.
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    names = tuple("abcdefghij"[:classes])
    return ImageDataset("toy", images, labels, images[:20], labels[:20], names, fingerprint="fp")


def test_long_tailed_profile_and_determinism():
    ds = _balanced()
    for factor in (10, 100 / 6):
        lt = long_tailed(ds, factor, seed=0)
        assert lt.class_counts().tolist() == long_tail_counts(60, 10, factor)
        assert lt.test_images is ds.test_images and lt.test_labels is ds.test_labels
        ids = lt.train_images[:, 0, 0, 0].long()
        assert torch.equal(ds.train_labels[ids], lt.train_labels)  # images keep their labels
        assert bool((ids[1:] > ids[:-1]).all())  # original order kept, no duplicates
    a, b, c = (long_tailed(ds, 10, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train_images, b.train_images) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.train_images, c.train_images) and a.fingerprint != c.fingerprint
    assert a.name == "toy-lt10" and a.fingerprint.startswith("fp+lt")


def test_long_tailed_errors():
    ds = _balanced(per_class=60)
    with pytest.raises(DatasetError, match="leaves class 9 with 0.5 < 1 images"):
        long_tailed(ds, 120, seed=0)
    with pytest.raises(DatasetError, match="imbalance_factor must be >= 1"):
        long_tailed(ds, 0.5, seed=0)
    with pytest.raises(DatasetError, match="class 'a' has 60 train images, the long-tail profile needs 100"):
        long_tailed(ds, 10, seed=0, n_max=100)


# ------------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------------


def _correlated_data(n: int = 300, shape=(2, 3, 4), top: float = 2.0, bottom: float = -4.0, seed: int = 0):
    """Images whose pixel covariance has eigenvalues from 10**top down to 10**bottom in random directions."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.logspace(top / 2, bottom / 2, d, dtype=torch.float64)  # standard deviations
    x = 0.5 + (torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ q.T
    return x.float().view(n, *shape)


def _numpy_zca(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """kornia's ZCAWhitening fit, written independently in float64 NumPy."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    mean = flat.mean(0)
    xc = flat - mean
    cov = xc.T @ xc / (flat.shape[0] - 1)
    u, s, _ = np.linalg.svd(cov)  # kornia uses the SVD
    t = u @ np.diag(1 / np.sqrt(s + eps)) @ u.T
    t_inv = u @ np.diag(np.sqrt(s + eps)) @ u.T
    return mean, t, t_inv, u, s


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_zca_matches_numpy(eps):
    x = _correlated_data()
    x_np = x.double().numpy()
    mean, t, t_inv, u, s = _numpy_zca(x_np, eps)
    zca = ZCAWhitening(eps=eps).fit(x)
    np.testing.assert_allclose(zca.mean.numpy(), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(zca.transform_matrix.numpy(), t, rtol=1e-5, atol=1e-5 * np.abs(t).max())
    np.testing.assert_allclose(zca.transform_inv.numpy(), t_inv, rtol=1e-5, atol=1e-5 * np.abs(t_inv).max())

    y = zca(x)
    y_ref = (x_np.reshape(300, -1) - mean) @ t
    assert y.shape == x.shape and y.dtype == torch.float32
    np.testing.assert_allclose(y.reshape(300, -1).numpy(), y_ref, rtol=0, atol=2e-5 * np.abs(y_ref).max())
    # Round trip. T has condition number sqrt((S_max + eps) / (S_min + eps)) ~ 300 here, which scales
    # the float32 rounding of y (|x| ~ 20) into the recovered x.
    torch.testing.assert_close(zca.inverse(y), x, rtol=0, atol=2e-4)
    # Whitened covariance is U diag(S / (S + eps)) U^T: identity where S >> eps, damped below.
    y64 = y.reshape(300, -1).double().numpy()
    cov_y = np.cov(y64, rowvar=False)
    expected = u @ np.diag(s / (s + eps)) @ u.T
    np.testing.assert_allclose(cov_y, expected, rtol=0, atol=1e-4)
    big = s > 100 * eps
    assert big.sum() >= 3
    np.testing.assert_allclose(np.diag(u[:, big].T @ cov_y @ u[:, big]), 1.0, atol=0.011)


def test_zca_fully_whitens_with_tiny_eps():
    x = _correlated_data(n=2000, shape=(1, 2, 3), top=0.0, bottom=-2.0, seed=1)
    y = ZCAWhitening(eps=1e-9).fit(x)(x).reshape(2000, -1).double()
    np.testing.assert_allclose(np.cov(y.numpy(), rowvar=False), np.eye(6), atol=1e-3)


def test_zca_chunking_and_state_dict(monkeypatch):
    x = _correlated_data(n=257)
    whole = ZCAWhitening().fit(x)
    monkeypatch.setattr(transforms_mod, "_CHUNK_BYTES", 24 * 8 * 10)  # 10 rows per chunk
    chunked = ZCAWhitening().fit(x)
    torch.testing.assert_close(chunked.transform_matrix, whole.transform_matrix, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.inverse(whole(x[:7])), x[:7], rtol=0, atol=2e-5)

    buf = io.BytesIO()
    state = whole.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, buf)
    buf.seek(0)
    loaded = ZCAWhitening.from_state_dict(torch.load(buf, weights_only=True))
    assert loaded.eps == 0.1 and loaded.image_shape == (2, 3, 4)
    torch.testing.assert_close(loaded(x), whole(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x[0]), whole(x[:1])[0], rtol=0, atol=0)  # (C, H, W) works too
    with pytest.raises(ValueError, match=r"fitted on images of shape \(2, 3, 4\)"):
        whole(torch.zeros(3, 2, 4, 3))


def test_normalize_stats_and_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 3, 4, 5, generator=g) * torch.tensor([1.0, 0.5, 0.2]).view(1, 3, 1, 1)
    norm = Normalize().fit(x)
    ref = x.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(norm.mean.numpy(), ref.mean(1), rtol=1e-6)
    np.testing.assert_allclose(norm.std.numpy(), ref.std(1), rtol=1e-6)  # population std
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(norm.inverse(y), x, rtol=0, atol=1e-6)
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    buf.seek(0)
    again = Normalize.from_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(again(x), y, rtol=0, atol=0)
    fixed = Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])
    torch.testing.assert_close(fixed(torch.ones(1, 3, 1, 1)).flatten(), torch.tensor([2.0, 1.0, 0.5]))


def test_preprocess_zca_cached_on_disk(tmp_path, monkeypatch):
    make_pixels_npz(tmp_path / "p.npz", n_train=40, shape=(3, 2, 3), classes=("a", "b"))
    ds = load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache")
    out, zca = preprocess(ds, "zca", cache_dir=tmp_path / "cache")
    direct = ZCAWhitening(0.1).fit(ds.train_images)
    torch.testing.assert_close(out.train_images, direct(ds.train_images), rtol=0, atol=0)
    torch.testing.assert_close(out.test_images, direct(ds.test_images), rtol=0, atol=0)
    assert out.preprocessing == "zca" and out.classes == ds.classes and out.train_labels is ds.train_labels
    assert len(list((tmp_path / "cache" / "transforms").glob("zca-*.pt"))) == 1

    def no_fit(self, images):
        raise AssertionError("refitted despite the cache")

    monkeypatch.setattr(ZCAWhitening, "fit", no_fit)
    again, zca2 = preprocess(ds, "zca", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(again.train_images, out.train_images, rtol=0, atol=0)
    # A different eps or a derived train split is a different fit.
    with pytest.raises(AssertionError, match="refitted"):
        preprocess(ds, "zca", eps=0.2, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="already preprocessed"):
        preprocess(out, "zca")


def test_a_copy_elsewhere_has_the_same_fingerprint_and_identity(tmp_path):
    """The fingerprint's root is the decoded content: a copy at another path, with other file times,
    is the same data (the ranks of a job on several machines compare it), a changed pixel is not; the
    source-metadata root stays as the cache key and the legacy fingerprint old buffers recorded."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_pixels_npz(tmp_path / "a" / "p.npz", n_train=40, shape=(4, 4, 3), classes=("a", "b"))
    shutil.copyfile(tmp_path / "a" / "p.npz", tmp_path / "b" / "p.npz")  # a new mtime too
    os.utime(tmp_path / "b" / "p.npz", ns=(1, 1))
    a = load_dataset(tmp_path / "a" / "p.npz", cache_dir=tmp_path / "cache")
    b = load_dataset(tmp_path / "b" / "p.npz", cache_dir=tmp_path / "cache")
    assert a.fingerprint == b.fingerprint and a.identity() == b.identity() and "+" not in a.fingerprint
    assert a.source_fingerprint != b.source_fingerprint  # two cache entries, one per source
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npz"))) == 2
    # Derivations extend both roots alike.
    sub_a, sub_b = subset_dataset(a, max_train=20, seed=1), subset_dataset(b, max_train=20, seed=1)
    assert sub_a.fingerprint == sub_b.fingerprint == a.fingerprint + "+subset(train=20,test=None,seed=1)"
    zca, _ = preprocess(sub_a, "zca", cache_dir=tmp_path / "cache")
    root, _, chain = zca.fingerprint.partition("+")
    assert root == a.fingerprint and zca.legacy_fingerprint == a.source_fingerprint + "+" + chain
    # Another pixel is another dataset; a dataset built in memory is told apart by its tensors.
    make_pixels_npz(tmp_path / "c.npz", n_train=40, shape=(4, 4, 3), classes=("a", "b"), seed=5)
    assert load_dataset(tmp_path / "c.npz", cache=False).fingerprint != a.fingerprint
    moved = a.replace(train_images=a.train_images.flip(0))
    assert moved.fingerprint is None and moved.legacy_fingerprint is None
    assert moved.identity().startswith("tensors:") and moved.identity() != a.replace(fingerprint=None).identity()


def test_a_cache_hit_reads_the_stored_content_fingerprint(tmp_path, monkeypatch):
    """The content fingerprint is computed once, when the source is decoded, and stored in the cache
    entry: a hit reads it (no hashing), and an entry written before it was stored has it computed."""
    make_pixels_npz(tmp_path / "p.npz", n_train=40, shape=(4, 4, 3), classes=("a", "b"))
    first = load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "datasets").glob("*.npz")
    with np.load(entry) as z:
        assert str(z["content"]) == first.fingerprint

    def no_hashing(raw):
        raise AssertionError("a cache hit hashed the arrays again")

    monkeypatch.setattr(loading, "content_fingerprint", no_hashing)
    monkeypatch.setattr(data_cache, "content_fingerprint", no_hashing)
    assert load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache").fingerprint == first.fingerprint
    monkeypatch.undo()
    with np.load(entry) as z:  # an entry from before 2026-12-05: no stored fingerprint
        old = {k: z[k] for k in z.files if k != "content"}
    np.savez(entry, **old)
    assert load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache").fingerprint == first.fingerprint


def test_replace_tensors_drops_fingerprint_so_fits_are_not_cached(tmp_path):
    # Reported: stats fitted on NaN images swapped in with replace() were cached under the clean
    # dataset's fingerprint and served to the next clean load.
    make_pixels_npz(tmp_path / "p.npz", n_train=40, shape=(3, 2, 3), classes=("a", "b"))
    ds = load_dataset(tmp_path / "p.npz", cache_dir=tmp_path / "cache")
    assert ds.fingerprint is not None
    bad = ds.replace(train_images=torch.full_like(ds.train_images, float("nan")))
    assert bad.fingerprint is None
    for field in ("train_labels", "test_images", "test_labels"):
        assert ds.replace(**{field: getattr(ds, field).clone()}).fingerprint is None
    assert ds.replace(val_images=ds.test_images, val_labels=ds.test_labels).fingerprint is None
    # An explicit fingerprint wins; non-tensor changes keep the old one.
    assert ds.replace(train_images=ds.train_images * 1, fingerprint="mine").fingerprint == "mine"
    assert ds.replace(name="renamed").fingerprint == ds.fingerprint

    out, _ = preprocess(bad, "normalize", cache_dir=tmp_path / "cache")
    assert out.fingerprint is None and bool(out.train_images.isnan().all())
    assert not list((tmp_path / "cache" / "transforms").glob("*.pt"))  # nothing cached for unknown data
    clean, _ = preprocess(ds, "normalize", cache_dir=tmp_path / "cache")
    assert bool(clean.train_images.isfinite().all())
    torch.testing.assert_close(clean.train_images.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)


def test_preprocess_normalize_and_none(tmp_path):
    ds = _balanced(per_class=6)
    out, norm = preprocess(ds, "normalize", cache=False)
    torch.testing.assert_close(out.train_images.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(norm.inverse(out.test_images), ds.test_images, rtol=1e-6, atol=1e-4)
    same, ident = preprocess(ds, "none")
    torch.testing.assert_close(same.train_images, ds.train_images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown method 'pca'"):
        preprocess(ds, "pca")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="already preprocessed"):
        long_tailed(out, 2, seed=0)


# ------------------------------------------------------------------------------------------------------
# Real data (../shared/data)
# ------------------------------------------------------------------------------------------------------

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="session")
def cifar10(shared_data, session_cache_dir) -> ImageDataset:
    """CIFAR-10 from cifar10-jpeg.npz, decoded once per session (about 15 s on 2 cores)."""
    return load_dataset("cifar10", root=shared_data, cache_dir=session_cache_dir)


@pytest.mark.parametrize(
    ("name", "train", "test", "classes"),
    [
        ("mnist", MNIST_TRAIN, MNIST_TEST, tuple("0123456789")),
        ("fashion_mnist", [6000] * 10, [1000] * 10, None),
        ("fashionmnist", [6000] * 10, [1000] * 10, None),
    ],
)
def test_real_mnist_like(shared_data, session_cache_dir, name, train, test, classes):
    ds = load_dataset(name, root=shared_data, cache_dir=session_cache_dir)
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.class_counts("train").tolist() == train and ds.class_counts("test").tolist() == test
    assert float(ds.train_images.min()) == 0.0 and float(ds.train_images.max()) == 1.0
    assert ds.num_classes == 10 and (classes is None or ds.classes == classes)
    if name != "mnist":
        assert ds.classes[0] == "T-shirt/top" and ds.name == "fashion_mnist"


def test_real_breastmnist_and_zca(shared_data, session_cache_dir, tmp_path):
    ds = load_dataset("breastmnist", root=shared_data, cache_dir=session_cache_dir)
    assert ds.classes == ("malignant", "normal, benign")
    assert (ds.train_labels.shape[0], ds.val_labels.shape[0], ds.test_labels.shape[0]) == (546, 78, 156)
    assert ds.train_images.shape[1:] == (1, 28, 28)
    assert 0 <= float(ds.train_images.min()) < float(ds.train_images.max()) <= 1
    assert ds.class_counts("train").tolist() == [147, 399] and ds.class_counts("test").tolist() == [42, 114]
    # ZCA on real pixels (D = 784 > N = 546: a singular covariance, regularised by eps).
    out, zca = preprocess(ds, "zca", cache_dir=tmp_path)
    torch.testing.assert_close(zca.inverse(out.test_images), ds.test_images, rtol=0, atol=1e-4)
    mean, t, _, _, _ = _numpy_zca(ds.train_images.numpy(), 0.1)
    np.testing.assert_allclose(zca.transform_matrix.numpy(), t, rtol=0, atol=1e-4 * np.abs(t).max())


def test_real_cifar10(cifar10, shared_data, session_cache_dir, monkeypatch):
    ds = cifar10
    assert ds.name == "cifar10"
    assert ds.classes == tuple(CIFAR10_NAMES)
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.class_counts("train").tolist() == [5000] * 10 and ds.class_counts("test").tolist() == [1000] * 10
    std = ds.train_images.std(dim=(0, 2, 3))
    torch.testing.assert_close(std, torch.tensor([0.245, 0.243, 0.261]), rtol=0, atol=2e-3)
    assert 0.0 <= float(ds.train_images.min()) and float(ds.train_images.max()) <= 1.0
    # The second load comes from the session cache: no decoding, same tensors.
    monkeypatch.setattr(loading, "read_source", lambda source: pytest.fail("decoded CIFAR-10 twice"))
    again = load_dataset("cifar10", root=shared_data, cache_dir=session_cache_dir)
    assert torch.equal(again.train_labels, ds.train_labels) and torch.equal(again.test_images, ds.test_images)
    lt = long_tailed(ds, 100, seed=0)
    assert lt.class_counts().tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_real_data_dir_untouched(shared_data, cifar10, tmp_path):
    before = _snapshot(shared_data)
    load_dataset("breastmnist", root=shared_data, cache_dir=tmp_path / "cache")
    load_dataset(shared_data / "mnist.npz", cache=False)
    assert _snapshot(shared_data) == before


def test_bundled_digits_need_no_files():
    from datm_fast.data import load_dataset

    ds = load_dataset("digits")
    assert ds.train_images.shape == (1438, 1, 8, 8) and ds.test_images.shape == (359, 1, 8, 8)
    assert ds.classes == tuple("0123456789")
    assert float(ds.train_images.min()) == 0.0 and float(ds.train_images.max()) == 1.0
    counts = ds.class_counts("train") + ds.class_counts("test")
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's digits
    again = load_dataset("DIGITS")
    assert torch.equal(again.train_images, ds.train_images) and again.fingerprint == ds.fingerprint


# ----- the data contract ------------------------------------------------------------------------------------
def test_data_spec_rebuilds_the_same_space_in_one_order(tmp_path):
    """load -> long tail -> subset -> fit the preprocessing on the train split left: ZCA fitted on the
    subset, never on the full split (a subset run tested in the full split's whitening is wrong)."""
    pytest.importorskip("sklearn", reason="the bundled digits need scikit-learn")
    spec = DataSpec("digits", preprocessing="zca", long_tail=2.0, max_train=300, max_test=100, seed=3)
    data, zca = spec.load(cache_dir=tmp_path)
    raw = load_dataset("digits")
    step = subset_dataset(long_tailed(raw, 2.0, seed=3), 300, 100, seed=3)
    want, want_zca = preprocess(step, "zca", cache=False)
    assert torch.equal(data.train_images, want.train_images) and torch.equal(data.test_images, want.test_images)
    assert torch.equal(data.train_labels, want.train_labels) and data.fingerprint == want.fingerprint
    whole, _ = preprocess(raw, "zca", cache=False)  # fitted on the whole split: another space
    assert not torch.allclose(zca(raw.test_images[:5]), whole.test_images[:5], atol=1e-3)
    again, _ = spec.load(cache_dir=tmp_path)  # the fit is cached under the subset's fingerprint
    assert torch.equal(again.test_images, data.test_images)


def test_data_spec_round_trips_and_names_bad_records(tmp_path):
    spec = DataSpec("data/x.npz", root=tmp_path, preprocessing="normalize", max_train=10)
    assert spec.root == str(tmp_path.resolve()) and spec.dataset == str((tmp_path / "data" / "x.npz").resolve())
    assert DataSpec.from_json(spec.to_json()) == spec
    assert DataSpec("cifar10").dataset == "cifar10"  # names stay names
    with pytest.raises(ValueError, match="run.json: unknown data spec keys \\['colour'\\]"):
        DataSpec.from_json({**spec.to_json(), "colour": 1}, "run.json")
    with pytest.raises(ValueError, match="DataSpec.preprocessing must be one of"):
        DataSpec("cifar10", preprocessing="whiten")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DataSpec.max_train must be an int >= 1 or None"):
        DataSpec("cifar10", max_train=0)
    with pytest.raises(ValueError, match="DataSpec.long_tail must be None or a number >= 1"):
        DataSpec("cifar10", long_tail=0.5)
