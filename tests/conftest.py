import os
import sys
from pathlib import Path

# Triton decides at decoration time whether it interprets, so the flag must be set before any
# datm_fast.kernels module is imported. Without a GPU, kernels can only run in the interpreter.
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

import pytest
import torch

# Under pytest-xdist (README's test command runs two workers on the CI's two cores) every worker computes
# on one thread, and so does every process it starts (torchrun ranks, CLI runs): two workers of two
# threads each on two cores made ops wait for their sibling thread to be scheduled (2026-12-05: slower
# than one process); one thread each: 4:11 and 5:03 for the suite in two clean clones, against 6:10 in one
# process.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATM_FAST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real datasets beside the repository (../shared/data); skip where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set DATM_FAST_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private cache directory, so tests never touch the user's cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("DATM_FAST_CACHE", str(d))
    return d


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    """A cache shared by the whole session: real data is decoded once per test run. Under xdist, one for
    all the workers of the run (cache files are written atomically, so two that decode at once agree)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    cache = root / "datm_fast_cache"
    cache.mkdir(exist_ok=True)
    return cache


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    sys.path.insert(0, str(REPO_ROOT / "tests"))
