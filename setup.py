"""Build datm_fast and its compiled operator library datm_fast._C.

The C++ CPU operators are always built. The CUDA operators are added when the installed torch is a
CUDA build and nvcc is found; override with DATM_FAST_CUDA=0|1. Other switches:
  DATM_FAST_SKIP_EXT=1     build no extension at all (every op then runs its PyTorch path)
  DATM_FAST_CUDA_ARCHS     e.g. "8.0;9.0" (default: torch's TORCH_CUDA_ARCH_LIST, else 8.0;9.0)
  MAX_JOBS, NVCC_THREADS   parallelism of the build, as in torch.utils.cpp_extension
A failed extension build is not fatal (the extension is marked optional): `datm_fast.backend_info()`
then says why the C++ backend is not live. Build with `pip install --no-build-isolation .` so that
the torch already installed is the one compiled against.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value


def _extensions():
    if _flag("DATM_FAST_SKIP_EXT") == "1":
        print("datm_fast: DATM_FAST_SKIP_EXT=1, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "datm_fast: torch is not importable at build time, building no extension "
            "(install torch first and build with --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}

    cuda_available = torch.version.cuda is not None and CUDA_HOME is not None
    forced = _flag("DATM_FAST_CUDA")
    if forced == "1" and not cuda_available:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc (CUDA_HOME) was not found"
        raise SystemExit(f"DATM_FAST_CUDA=1 but the CUDA extension cannot be built: {why}")
    use_cuda = cuda_available if forced is None else forced == "1"

    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp")) if p.name != "cuda_binding.cpp"]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; at::parallel_for still threads
        cxx_flags.remove("-fopenmp")
    define_macros = [("DATM_FAST_WITH_CUDA", "1" if use_cuda else "0")]
    common = dict(
        name="datm_fast._C",
        include_dirs=[str(CSRC)],
        define_macros=define_macros,
        extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"],
        optional=True,
        py_limited_api=False,
    )
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("DATM_FAST_CUDA_ARCHS", "8.0;9.0")
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
        threads = os.environ.get("NVCC_THREADS")
        if threads:
            nvcc_flags += ["--threads", threads]
        sources += ["csrc/cuda_binding.cpp"] + [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))]
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    print(f"datm_fast: building datm_fast._C ({'C++ + CUDA' if use_cuda else 'C++ CPU'})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["datm_fast", "datm_fast.*"]) + ["datm_fast.kernels"],
    package_dir={"datm_fast.kernels": "kernels"},
    include_package_data=False,
    package_data={"datm_fast": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
