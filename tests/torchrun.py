"""Launch a command on N CPU ranks with torchrun (gloo), for the distributed tests.

``torchrun(2, "-m", "datm_fast.cli", "distill", ...)`` or ``torchrun(2, script_path, args...)``:
``python -m torch.distributed.run --standalone --nproc-per-node N ...`` in a subprocess (a free port of
its own), returning the completed process with its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun_command(nproc: int, *args: str | os.PathLike[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *map(str, args),
    ]


def torchrun(
    nproc: int,
    *args: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``args`` on ``nproc`` ranks; one thread per rank (the CI machine has 2 cores)."""
    # A rank that aborts (SIGABRT) prints its Python stack: which call it died in.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run(
        torchrun_command(nproc, *args), capture_output=True, text=True, env=environment, timeout=timeout, cwd=cwd
    )


def rank_rows(directory: Path, nproc: int) -> list[dict]:
    """The rows ``row<rank>.json`` each rank wrote into ``directory``, in rank order. Files, not stdout: the
    ranks share torchrun's stdout, where two ranks' lines were seen joined into one (2026-12-04)."""
    return [json.loads((directory / f"row{rank}.json").read_text()) for rank in range(nproc)]


# The last line of a script that torchrun runs on several ranks: leave without the interpreter's finalisation,
# where gloo's worker threads may still free the last collective's tensors and abort the process (see
# datm_fast.cli.console, which does the same for the command). Reached only when the script succeeded.
LEAVE = "\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_sys.stderr.flush()\n_os._exit(0)\n"
