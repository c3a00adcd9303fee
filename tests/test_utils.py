"""Atomic writes and image grids."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from datm_fast.utils import (
    DirectoryLocked,
    atomic_write,
    available_memory_bytes,
    check_writable,
    default_cache_dir,
    exclusive_lock,
)
from datm_fast.viz import image_grid, save_image_grid


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with atomic_write(target) as f:
        f.write(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as f:
            f.write(b"half-written")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first", "a failed write must leave the old file untouched"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"], "no temporary file may be left behind"


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f") as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_atomic_write_rejects_append_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", mode="ab"):
            pass


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATM_FAST_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DATM_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "datm_fast"


def test_image_grid_places_each_image(tmp_path):
    images = torch.zeros(5, 3, 4, 6)
    for i in range(5):
        images[i, i % 3] = 1.0  # image i is pure red, green or blue
    grid = image_grid(images, nrow=3, padding=1)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        pixel = grid[1 + r * 5 + 2, 1 + c * 7 + 3]
        expected = np.zeros(3, np.uint8)
        expected[i % 3] = 255
        np.testing.assert_array_equal(pixel, expected)
    np.testing.assert_array_equal(grid[0, 0], [255, 255, 255])  # padding is white
    np.testing.assert_array_equal(grid[6, 15], [255, 255, 255])  # the empty sixth cell is white too

    path = save_image_grid(images, tmp_path / "grid.png", nrow=3, padding=1, scale=2)
    with Image.open(path) as img:
        assert img.size == (3 * (12 + 1) + 1, 2 * (8 + 1) + 1)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_image_grid_clips_and_handles_grey():
    grid = image_grid(torch.tensor([[[[2.0, -1.0]]]]), nrow=1, padding=0)
    np.testing.assert_array_equal(grid[0], [[255, 255, 255], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        image_grid(torch.zeros(2, 2, 4, 4), nrow=1)


_FAULTS = """
import resource, sys, torch
from datm_fast.utils import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1); del x   # a 64 MB activation, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = torch.empty(64 << 20, dtype=torch.uint8); y.fill_(1); del y
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)
def test_retain_freed_memory_stops_page_faults_on_reused_blocks():
    """What it is for: a block as large as an activation, freed and allocated again, is reused instead of
    being unmapped and faulted back in (64 MB: 16,384 pages per allocation with glibc's default)."""
    runs = {}
    for mode in ("retain", "default"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        runs[mode] = (applied, int(faults))
    assert runs["retain"][0] == "True"
    assert runs["default"][1] > 5 * 10_000  # each 64 MB allocation faults its pages in again
    # The freed block is reused: measured 16,384 faults in all (one block's pages) against 81,920.
    assert 3 * runs["retain"][1] < runs["default"][1], runs


def test_dataclass_options_round_trip():
    """Every field becomes an option (help from its metadata); a new field is a new option."""
    import argparse
    from dataclasses import dataclass, field

    from datm_fast.utils import dataclass_arguments, dataclass_from_arguments

    @dataclass(frozen=True)
    class Budget:
        runs: int = field(default=3, metadata={"help": "networks per set"})
        lr: float = 0.01
        root: str | None = None
        ipcs: tuple[int, ...] = (1, 10)
        precision: Literal["float32", "bfloat16"] = "float32"

    parser = argparse.ArgumentParser()
    dataclass_arguments(parser, Budget)
    assert dataclass_from_arguments(Budget, parser.parse_args([])) == Budget()
    args = parser.parse_args(["--runs", "5", "--root", "/data", "--ipcs", "1,50", "--lr", "1e-3"])
    assert dataclass_from_arguments(Budget, args) == Budget(5, 1e-3, "/data", (1, 50))
    args = parser.parse_args(["--precision", "bfloat16"])
    assert dataclass_from_arguments(Budget, args).precision == "bfloat16"
    assert "networks per set (default: 3)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--ipcs", "1,ten"])
    with pytest.raises(SystemExit):  # a Literal is a choice: argparse names the bad value and the choices
        parser.parse_args(["--precision", "fp16"])


def test_available_memory_is_what_the_kernel_says_on_linux_and_unknown_elsewhere():
    available = available_memory_bytes(torch.device("cpu"))
    if Path("/proc/meminfo").is_file():
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        assert abs(available - int(line.split()[1]) * 1024) < 2**30  # read a moment apart
    assert available_memory_bytes(torch.device("meta")) is None


def test_a_directory_lock_refuses_a_second_writer_and_is_released_on_close(tmp_path):
    held = exclusive_lock(tmp_path, "test directory")
    with pytest.raises(DirectoryLocked, match=rf"process {os.getpid()} is writing this test directory"):
        exclusive_lock(tmp_path, "test directory")
    held.close()
    exclusive_lock(tmp_path, "test directory").close()  # released: taken again


def test_check_writable_names_the_place_in_one_oserror(tmp_path):
    (tmp_path / "file").write_text("")
    assert check_writable(tmp_path / "new" / "dir").is_dir()
    with pytest.raises(OSError, match=r"file/sub: cannot write here"):
        check_writable(tmp_path / "file" / "sub")  # a file in the way, for root too
