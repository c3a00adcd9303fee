import os

# Triton decides at import whether it interprets; without a GPU its kernels only run interpreted.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    # Benchmark files are named bench_*.py so that the test run never collects them by accident.
    config.addinivalue_line("python_files", "bench_*.py")
