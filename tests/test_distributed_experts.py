"""``datm-fast buffer`` on 2 gloo ranks (torchrun): the buffer one process makes, file for file; a job with a
killed rank resumes to it; ranks given different inputs refuse before any work.

Every run trains scikit-learn's digits (300 train / 100 test images), 3 experts of 2 epochs with SGD, so
that the ranks get 2 experts and 1. The single-process reference runs with one thread, as torchrun gives
each rank: CPU kernels sum in another order on another number of threads (a last-bit difference).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from torchrun import torchrun, torchrun_command

from datm_fast.experts import BufferWriter, ExpertBuffer, ExpertBufferError, ExpertConfig, build_buffer
from datm_fast.experts.buffer import ExpertFiles, expert_filename, manifest_entry, spec_to_dict
from datm_fast.models import ConvNetSpec

EXPERTS = 3


def _args(out: Path, cache: Path, experts: int = EXPERTS) -> list[str]:
    return [
        *("buffer", "--dataset", "digits", "--max-train-images", "300", "--max-test-images", "100"),
        *("--experts", str(experts), "--epochs", "2", "--optimizer", "sgd", "--device", "cpu", "--no-progress"),
        *("--out", str(out), "--cache-dir", str(cache)),
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """The buffer one plain process makes (no torchrun)."""
    out = tmp_path_factory.mktemp("single") / "buf"
    cmd = [sys.executable, "-m", "datm_fast.cli", *_args(out, cache)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{EXPERTS} experts x 2 epochs" in done.stdout and "on 2 ranks" not in done.stdout
    return out


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def _without_timings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest less each expert's ``seconds``: a timing, true of one run only."""
    experts = {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in manifest["experts"].items()}
    return {**manifest, "experts": experts}


def _assert_same_buffer(got: Path, want: Path) -> None:
    names = [expert_filename(i) for i in range(EXPERTS)]
    assert sorted(p.name for p in got.glob("expert_*.safetensors")) == names
    assert sorted(p.name for p in want.glob("expert_*.safetensors")) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), f"{name} differs"
    assert _without_timings(_manifest(got)) == _without_timings(_manifest(want))
    assert ExpertBuffer.open(got, verify="eager").num_experts == EXPERTS
    assert not list(got.glob(".*.tmp")) and not list(got.glob(".rank-probe-*"))  # nothing left behind


@pytest.mark.slow
def test_two_ranks_make_the_buffer_one_process_makes(tmp_path: Path, single: Path, cache: Path) -> None:
    out = tmp_path / "buf"
    done = torchrun(2, "-m", "datm_fast.cli", *_args(out, cache), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("buffer ")]
    assert len(summaries) == 1 and f"{EXPERTS} experts x 2 epochs" in summaries[0], done.stdout  # rank 0 only
    assert f"trained {EXPERTS} on 2 ranks" in summaries[0] and "0 already done" in summaries[0]
    assert "rank 1 of 2: trained 1 expert(s) [1] on cpu" in done.stderr  # k mod 2: rank 0 has 0 and 2
    _assert_same_buffer(out, single)
    # The timings are the only difference, and they are there.
    assert all("seconds" in e for e in _manifest(out)["experts"].values())


def _rank_pid(launcher: int, rank: int, deadline: float) -> int:
    """The pid of torchrun ``launcher``'s worker of rank ``rank`` (from /proc)."""
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid == launcher and f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                    return int(stat.parent.name)
            except (OSError, IndexError, ValueError):
                continue  # a process that ended meanwhile
        time.sleep(0.02)
    raise AssertionError(f"no rank {rank} under torchrun process {launcher}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_job_with_a_killed_rank_resumes_to_the_same_buffer(tmp_path: Path, single: Path, cache: Path) -> None:
    out = tmp_path / "buf"
    args = torchrun_command(2, "-m", "datm_fast.cli", *_args(out, cache))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(args, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            rank1 = _rank_pid(proc.pid, 1, deadline)
            # Rank 1's only expert, written by the rank that does not hold the lock: kill it the moment its
            # file is there, while rank 0 trains expert 2 (the ranks move in step, epoch by epoch).
            first = out / expert_filename(1)
            while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(rank1, signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log_text = (tmp_path / "killed.log").read_text()
    assert first.exists(), f"rank 1 never wrote its expert: {log_text[-3000:]}"
    assert proc.returncode != 0, "the job finished before rank 1 was killed; the test proves nothing"
    listed = set(_manifest(out)["experts"]) if (out / "manifest.json").exists() else set()
    assert "1" not in listed  # only rank 0 lists experts, and it had not heard of expert 1 yet
    complete = sorted(p.name for p in out.glob("expert_*.safetensors"))  # final names only: complete files
    kept = first.stat().st_ino

    done = torchrun(2, "-m", "datm_fast.cli", *_args(out, cache), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Only what was missing is trained: every complete file is kept (the killed rank's adopted, not retrained).
    missing = EXPERTS - len(complete)
    assert (f"trained {missing} on 2 ranks" if missing else "nothing to train") in done.stdout, done.stdout
    assert f"{len(complete)} already done" in done.stdout
    assert first.stat().st_ino == kept
    _assert_same_buffer(out, single)


DISAGREE = textwrap.dedent(
    """
    import os, sys
    from datm_fast.cli import console

    args = {args!r}
    experts = args.index("--experts") + 1
    args[experts] = "3" if os.environ["RANK"] == "0" else "4"
    sys.argv = ["datm-fast", *args]
    console()  # as the command ends
    """
)


@pytest.mark.slow
def test_ranks_given_different_inputs_refuse_before_any_work(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "buf"
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREE.format(args=_args(out, cache)))
    done = torchrun(2, script, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=300)
    assert done.returncode != 0
    refusal = (
        "datm-fast buffer: error: the ranks disagree on the number of experts (rank 0: 3; rank 1: 4); "
        "every rank must be given the same"
    )
    assert done.stderr.count(refusal) == 1, done.stderr[-3000:]  # said once, by rank 0
    assert not (out / "manifest.json").exists() and not list(out.glob("expert_*")) and not (out / ".lock").exists()


# ----- in this process: the pieces that let several ranks write one directory -----------------------------------
TINY = ConvNetSpec(channels=1, num_classes=4, image_size=8, width=4, depth=1)


def _header() -> dict[str, Any]:
    return {
        "model": {"name": "tiny", "spec": spec_to_dict(TINY)},
        "dataset": {"name": "toy", "fingerprint": "toy-0"},
        "config": {"epochs": 1},
        "num_epochs": 1,
        "num_params": TINY.num_params,
    }


def test_rank_0_lists_what_other_ranks_wrote_only_if_it_sees_those_bytes(tmp_path: Path) -> None:
    import torch

    trajectory = torch.arange(2 * TINY.num_params, dtype=torch.float32).view(2, -1)
    with BufferWriter(tmp_path, _header()) as writer:
        other = ExpertFiles(tmp_path, _header())  # another rank: no lock, no manifest
        entry = manifest_entry(other.write(0, trajectory, {"seed": 7}), {"seconds": 1.5})
        assert list(entry) == ["seed", "seconds", "file", "sha256", "bytes"]
        again = other.write(0, trajectory, {"seed": 7})  # the same expert, the same bytes
        assert again["sha256"] == entry["sha256"]
        path = tmp_path / expert_filename(0)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(ExpertBufferError, match="expert_00000.safetensors: .* its writer reported"):
            writer.record({0: entry})
        path.unlink()
        with pytest.raises(ExpertBufferError, match="missing, though its writer reported it written"):
            writer.record({0: entry})
        assert writer.manifest["experts"] == {}
        other.write(0, trajectory, {"seed": 7})
        writer.record({0: entry})
    buf = ExpertBuffer.open(tmp_path, verify="eager")
    assert buf.stats(0) == entry and torch.equal(buf.trajectory(0), trajectory)


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_new_job_waits_for_ranks_of_an_earlier_one_still_writing(tmp_path: Path) -> None:
    import fcntl

    import torch

    from datm_fast.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 8, 8, generator=g), torch.arange(24) % 4
    ds = ImageDataset("toy", x[:16], y[:16], x[16:], y[16:], classes=("a", "b", "c", "d"), fingerprint="toy-0")
    cfg = ExpertConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.01, dsa=None)
    with open(tmp_path / ".ranks.lock", "a+") as stale:  # a rank of an earlier job, still alive
        fcntl.flock(stale.fileno(), fcntl.LOCK_SH)
        with pytest.raises(ExpertBufferError, match="ranks of another job still write expert files here"):
            build_buffer(tmp_path, ds, TINY, cfg, 1, backend="torch", device="cpu")
    assert build_buffer(tmp_path, ds, TINY, cfg, 1, backend="torch", device="cpu").trained == (0,)
