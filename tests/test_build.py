"""Packaging: `pip wheel .` builds a wheel with the compiled extension and the Triton kernels inside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["setup.py", "pyproject.toml", "README.md", "csrc", "kernels", "datm_fast"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the extension")
def test_pip_wheel_contains_compiled_extension_and_kernels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    wheel_dir = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("DATM_FAST_SKIP_EXT", "DATM_FAST_CUDA")}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "-q",
        str(src),
        "-w",
        str(wheel_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(wheel_dir.glob("datm_fast-*.whl"))
    assert len(wheels) == 1, list(wheel_dir.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("datm_fast/_C") and n.endswith(".so") for n in names), names
    assert "datm_fast/kernels/distance.py" in names
    assert "datm_fast/configs/cifar10-ipc10.yaml" in names, "shipped DATM configs must be in the wheel"
    assert not any(n.startswith("kernels/") for n in names), "no top-level 'kernels' package may be installed"

    # The unpacked wheel imports on its own (outside the source tree) and its C++ backend is live.
    site = tmp_path / "site"
    zipfile.ZipFile(wheels[0]).extractall(site)
    code = "import datm_fast, sys; s = datm_fast.backend_info()['cpp']; print(s); sys.exit(0 if s.live else 1)"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(site)}
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "datm_fast._C" in run.stdout
