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
    """A cache shared by the whole session: real data is decoded once per test run."""
    return tmp_path_factory.mktemp("datm_fast_cache")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    sys.path.insert(0, str(REPO_ROOT / "tests"))
