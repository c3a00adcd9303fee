"""Fault injection: every way a run was found to lose or mix data, tried as a user tries it.

The ``datm-fast`` commands on scikit-learn's bundled digits with a tiny config (IPC 1, 5 unrolled
steps, 2-epoch segments, 6 iterations), each case ending either with a one-line error and nothing
changed on disk, or with the correct result; then ``kill -9`` of ``buffer``, ``distill``, ``eval`` and
``reproduce`` at random points, run again and compared with ``torch.equal`` to uninterrupted runs. The
kill points are drawn from ``DATM_FAST_FAULT_SEED`` (default 0; set it to try others).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_run import BUFFER_ARGS, TINY_YAML

from datm_fast.cli import main
from datm_fast.distill.loop import SANE_MAX_ABS_IMAGE, SANE_MAX_ABS_LABEL, SANE_MAX_LR
from datm_fast.distill.rundir import RunDir
from datm_fast.experts import ExpertBuffer

pytest.importorskip("sklearn", reason="the bundled digits need scikit-learn")

pytestmark = pytest.mark.slow

FAULT_SEED = int(os.environ.get("DATM_FAST_FAULT_SEED", "0"))


@pytest.fixture(autouse=True)
def _in_this_process(request, monkeypatch):
    # The commands run in this process here: leave pytest's allocator as it is, and read the data
    # through the module's cache.
    monkeypatch.setattr("datm_fast.utils.retain_freed_memory", lambda: False)
    if "tiny" in request.fixturenames:
        monkeypatch.setenv("DATM_FAST_CACHE", str(request.getfixturevalue("tiny")["cache"]))


def _command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "datm_fast.cli", *map(str, args)]


def _run(*args: str | Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATM_FAST_CACHE": str(cache)}
    return subprocess.run(_command(*args), capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A digits buffer, the tiny config and a finished run of it (each made once, by the commands)."""
    root = tmp_path_factory.mktemp("faults")
    cache = root / "cache"
    config = root / "tiny.yaml"
    config.write_text(TINY_YAML)
    done = _run("buffer", *BUFFER_ARGS, "--out", root / "buffer", cache=cache)
    assert done.returncode == 0, done.stderr
    done = _run("distill", *_distill_args(config, root / "buffer", root / "run"), cache=cache)
    assert done.returncode == 0, done.stderr
    return {"root": root, "cache": cache, "config": config, "buffer": root / "buffer", "run": root / "run"}


def _distill_args(config: Path, buffer: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["--config", config, "--buffer", buffer, "--out", out, "--quiet", *extra]


def _distill(tiny: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["distill", *map(str, _distill_args(tiny["config"], tiny["buffer"], out, *extra))])


def _copy_run(tiny: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny["run"], out)
    return out


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file's sha256 by relative path. ``.lock`` aside: it records the last process that held it."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def _saved_tensors_are_sane(run: Path) -> None:
    """No file of the run holds a non-finite value or a set outside the sane range."""
    for path in run.glob("*.pt"):
        if path.name == RunDir.CHECKPOINT:
            RunDir(run).load_checkpoint()  # verified: checksum and finite
            continue
        t = torch.load(path, weights_only=True)
        assert torch.isfinite(t).all(), path
        bound = {"images": SANE_MAX_ABS_IMAGE, "labels": SANE_MAX_ABS_LABEL, "lr": SANE_MAX_LR}[path.stem.split("_")[0]]
        assert float(t.abs().max()) <= bound, path


# ----- 1. an existing run directory ------------------------------------------------------------------------
def test_a_finished_run_is_not_overwritten_or_mixed(tiny, tmp_path, capsys):
    run = _copy_run(tiny, tmp_path)
    before = _snapshot(run)
    assert _distill(tiny, run, "--set", "lr_img=50") == 2
    _one_line_error(capsys, "holds a run already", "--resume", "--overwrite")
    assert _snapshot(run) == before

    # --overwrite deletes the old run: no old images_<it>.pt beside the new ones, metrics not appended to.
    assert _distill(tiny, run, "--overwrite", "--set", "lr_img=50", "--set", "checkpoint_every=3", "--no-eval") == 0
    assert sorted(p.name for p in run.glob("images_*.pt")) == ["images_2.pt", "images_5.pt", "images_best.pt"]
    rows = RunDir(run).read_metrics().rows
    assert [r["iteration"] for r in rows] == list(range(7))
    assert "lr_img: 50" in (run / RunDir.CONFIG).read_text()


# ----- 2. a second writer ----------------------------------------------------------------------------------
def test_a_second_writer_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        _command("distill", *_distill_args(tiny["config"], tiny["buffer"], out, "--set", "iterations=200")),
        env={**os.environ, "DATM_FAST_CACHE": str(tiny["cache"])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: _rows(out) >= 1, first)
        assert _distill(tiny, out, "--overwrite", "--set", "lr_img=50") == 2
        _one_line_error(capsys, f"process {first.pid} is writing this run directory")
        assert _distill(tiny, out, "--resume") == 2
        _one_line_error(capsys, "is writing this run directory")
        assert "lr_img: 100" in (out / RunDir.CONFIG).read_text()  # the config of the run that writes
    finally:
        first.kill()
        first.wait()


# ----- 3. a damaged checkpoint -----------------------------------------------------------------------------
def test_a_damaged_checkpoint_is_refused_by_name(tiny, tmp_path, capsys):
    run = _copy_run(tiny, tmp_path)
    checkpoint = run / RunDir.CHECKPOINT
    data = bytearray(checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])  # eight flipped bytes
    checkpoint.write_bytes(bytes(data))
    before = _snapshot(run)
    assert _distill(tiny, run, "--resume", "--set", "iterations=10") == 2
    _one_line_error(capsys, str(checkpoint), "damaged")
    assert _snapshot(run) == before

    # A checksum that matches but a set that is not finite (written by something else): refused too.
    state = RunDir(tiny["run"]).load_checkpoint()
    state["images"][0, 0, 0, 0] = float("nan")
    RunDir(run).save_checkpoint({k: v for k, v in state.items() if k != "format"})
    assert _distill(tiny, run, "--resume", "--set", "iterations=10") == 2
    _one_line_error(capsys, str(checkpoint), "non-finite values in images")


# ----- 4. honest resume ------------------------------------------------------------------------------------
def test_resume_under_another_config_is_refused_naming_each_key(tiny, tmp_path, capsys):
    run = _copy_run(tiny, tmp_path)
    before = _snapshot(run)
    assert _distill(tiny, run, "--resume", "--set", "lr_img=50") == 2
    _one_line_error(capsys, "lr_img (100.0 -> 50.0)")
    assert _distill(tiny, run, "--resume", "--set", "syn_steps=10", "--unroll", "tesla") == 2
    _one_line_error(capsys, "syn_steps (5 -> 10)", "unroll ('exact' -> 'tesla')")
    assert _snapshot(run) == before

    # Placement keys and a longer run are the same run: resumed, and config.yaml says what ran.
    assert _distill(tiny, run, "--resume", "--backend", "torch", "--set", "iterations=8", "--no-eval") == 0
    config = (run / RunDir.CONFIG).read_text()
    assert "backend: torch" in config and "iterations: 8" in config
    assert [r["iteration"] for r in RunDir(run).read_metrics().rows] == list(range(9))


# ----- 5, 6. runs that learn nothing, or garbage -----------------------------------------------------------
# 5 (lr_teacher=1e8 made the fused distance op abort where PyTorch's skipped): such an lr is refused before
# any work now; the op returns inf like PyTorch (tests/test_distance.py) and the loop skips it on every
# backend (tests/test_distill_loop.py::test_an_overflowing_distance_is_skipped_on_every_backend).
def test_an_lr_teacher_outside_the_sane_range_is_refused(tiny, tmp_path, capsys):
    for backend in ("cpp", "torch"):
        assert _distill(tiny, tmp_path / "run", "--backend", backend, "--set", "lr_teacher=1.0e8") == 2
        _one_line_error(capsys, "lr_teacher=1e+08", "sane range")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (["--set", "lr_teacher=100"], ["without one update", "7 above the threshold"]),
        (["--set", "lr_teacher=100", "--set", "threshold=1e30"], ["iteration 0", "diverged"]),
        (["--set", "lr_img=1e38"], ["iteration 0: the images reached", "diverged"]),
    ],
    ids=["all-skipped", "diverged-threshold", "diverged-lr-img"],
)
@pytest.mark.filterwarnings("ignore:distill. iteration .* non-finite loss:RuntimeWarning")
def test_a_run_that_learns_nothing_or_garbage_fails(tiny, tmp_path, capsys, keys, words):
    out = tmp_path / "run"
    assert _distill(tiny, out, "--no-eval", *keys) == 2
    line = _one_line_error(capsys, *words)
    _saved_tensors_are_sane(out)
    # The run directory says why it holds no result, and its report says so first.
    assert RunDir(out).failure() is not None and RunDir(out).failure() in line
    assert main(["report", str(out)]) == 0
    assert f"**This run failed**: {RunDir(out).failure()}" in (out / RunDir.REPORT).read_text()


# ----- 7. a read-only place ---------------------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """Makes a directory unwritable, for root too (``chattr +i`` where the mode bits do not bind root)."""
    frozen: list[Path] = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        if _writable(path) and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(path)], capture_output=True)
            frozen.append(path)
        if _writable(path):
            pytest.skip(f"{path} stays writable: running as root where chattr +i does not hold")
        return path

    yield make
    for path in frozen:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    for path in tmp_path.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)


def _writable(path: Path) -> bool:
    try:
        (path / ".probe").write_text("")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


def test_a_read_only_place_is_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch, read_only):
    locked = read_only(tmp_path / "locked")
    assert _distill(tiny, locked / "run") == 2
    _one_line_error(capsys, str(locked / "run"), "cannot write here")
    assert main(["buffer", *BUFFER_ARGS, "--out", str(locked / "buffer")]) == 2
    _one_line_error(capsys, str(locked / "buffer"), "cannot write here")

    run = _copy_run(tiny, tmp_path)
    before = _snapshot(run)
    read_only(run)
    assert main(["report", str(run)]) == 2
    _one_line_error(capsys, str(run), "cannot write here")

    def no_training(*args, **kwargs):
        raise AssertionError("eval trained before it found the read-only place")

    monkeypatch.setattr("datm_fast.evaluate.protocol.evaluate_models", no_training)
    assert main(["eval", str(run), "--runs", "1", "--epochs", "2", "--quiet"]) == 2
    _one_line_error(capsys, str(run), "cannot write here")
    assert _snapshot(run) == before


# ----- 8. absurd sizes ---------------------------------------------------------------------------------------
def test_an_unroll_that_cannot_fit_is_refused_before_any_work(tiny, tmp_path, capsys):
    started = time.perf_counter()
    assert _distill(tiny, tmp_path / "run", "--set", "syn_steps=100000000") == 2
    _one_line_error(capsys, "syn_steps=100000000", "GB", "lower syn_steps")
    assert time.perf_counter() - started < 60 and not (tmp_path / "run").exists()


# ----- 9. a refused start leaves nothing ---------------------------------------------------------------------
def test_a_refused_start_leaves_no_directory(tiny, tmp_path, capsys):
    assert _distill(tiny, tmp_path / "bad-key", "--set", "ipc=0") == 2
    _one_line_error(capsys, "ipc")
    # Refused after the directory was taken: by the buffer (6 epochs cannot serve start epoch 9 + 2).
    assert _distill(tiny, tmp_path / "bad-window", "--set", "max_start_epoch=10") == 2
    _one_line_error(capsys, "max_start_epoch")
    assert not (tmp_path / "bad-key").exists() and not (tmp_path / "bad-window").exists()


# ----- kill -9 at random points --------------------------------------------------------------------------------
def _rows(run: Path) -> int:
    path = run / RunDir.METRICS
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended (rc {process.returncode}) before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.02)


def _kill_at(
    args: list[str | Path], cache: Path, point: Callable[[], bool], delay: float, stderr: Path | None = None
) -> None:
    """Start the command (its standard error to ``stderr`` when given), wait for ``point``, sleep ``delay``
    seconds, ``kill -9`` it (it must still run)."""
    with open(stderr or os.devnull, "wb") as err:
        process = subprocess.Popen(
            _command(*args), env={**os.environ, "DATM_FAST_CACHE": str(cache)}, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        _wait_for(point, process)
        time.sleep(delay)
        assert process.poll() is None, "the command finished before the kill"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def _same_sets(a: Path, b: Path, tags: list[str]) -> None:
    for tag in tags:
        for x, y in zip(RunDir(a).set_files(tag), RunDir(b).set_files(tag)):
            assert torch.equal(torch.load(x, weights_only=True), torch.load(y, weights_only=True)), (x, y)


def test_kill_9_of_buffer_then_rerun_equals_uninterrupted(tiny, tmp_path):
    rng = random.Random(FAULT_SEED)
    out = tmp_path / "buffer"
    done_experts = rng.choice([0, 1])
    point = (lambda: (out / "manifest.json").is_file()) if done_experts == 0 else (lambda: _experts_done(out) >= 1)
    _kill_at(["buffer", *BUFFER_ARGS, "--out", out], tiny["cache"], point, rng.uniform(0.0, 0.5))
    done = _run("buffer", *BUFFER_ARGS, "--out", out, cache=tiny["cache"])
    assert done.returncode == 0, done.stderr
    ours, reference = ExpertBuffer.open(out), ExpertBuffer.open(tiny["buffer"])
    assert ours.num_experts == reference.num_experts == 2
    for e in range(2):
        for epoch in range(reference.num_epochs + 1):
            assert torch.equal(ours.params(e, epoch), reference.params(e, epoch)), (e, epoch)


def _experts_done(buffer: Path) -> int:
    try:
        return len(json.loads((buffer / "manifest.json").read_text()).get("experts", []))
    except (OSError, json.JSONDecodeError):
        return 0


def test_kill_9_of_distill_then_resume_equals_uninterrupted(tiny, tmp_path):
    rng = random.Random(FAULT_SEED + 1)
    out = tmp_path / "run"
    after_rows = rng.randint(1, 5)  # of 7: at least one iteration and the final checkpoint still to come
    args = ["distill", *_distill_args(tiny["config"], tiny["buffer"], out)]
    _kill_at(args, tiny["cache"], lambda: _rows(out) >= after_rows, rng.uniform(0.0, 0.1))
    again = "--resume" if RunDir(out).has_checkpoint() else "--overwrite"  # killed before its first checkpoint
    done = _run(*args, again, cache=tiny["cache"])
    assert done.returncode == 0, (after_rows, done.stderr)
    _same_sets(out, tiny["run"], ["best", "5"])
    assert _computed(out) == _computed(tiny["run"])  # metrics.jsonl: each iteration once, the same numbers


def _computed(run: Path) -> list[dict]:
    """metrics.jsonl's rows without the seconds and memory they took."""
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "peak_memory_gb")} for r in RunDir(run).read_metrics().rows
    ]


def test_kill_9_of_eval_then_rerun_equals_uninterrupted(tiny, tmp_path):
    rng = random.Random(FAULT_SEED + 2)
    args = ["eval", tiny["run"], "--runs", "1", "--epochs", "400", "--device", "cpu"]
    reference = _run(*args, "--quiet", "--out", tmp_path / "reference.json", cache=tiny["cache"])
    assert reference.returncode == 0, reference.stderr
    out, progress = tmp_path / "eval.json", tmp_path / "progress.txt"
    epoch = rng.randint(1, 300)  # killed in training, once the progress bar has passed this epoch
    _kill_at([*args, "--out", out], tiny["cache"], lambda: _epochs_done(progress) >= epoch, 0.0, stderr=progress)
    assert not out.exists()  # the killed eval left no half-written results
    done = _run(*args, "--quiet", "--out", out, cache=tiny["cache"])
    assert done.returncode == 0, done.stderr
    ours = json.loads(out.read_text())["results"]
    theirs = json.loads((tmp_path / "reference.json").read_text())["results"]
    assert [r["accuracies"] for r in ours] == [r["accuracies"] for r in theirs]


def _epochs_done(progress: Path) -> int:
    """The last ``done/total`` of a tqdm bar in ``progress``."""
    found = re.findall(rb"(\d+)/\d+ \[", progress.read_bytes()) if progress.is_file() else []
    return int(found[-1]) if found else 0


def test_kill_9_of_reproduce_then_rerun_equals_uninterrupted(shared_data, session_cache_dir, tmp_path):
    if not (shared_data / "cifar10-jpeg.npz").is_file():
        pytest.skip(f"CIFAR-10 (cifar10-jpeg.npz) not found in {shared_data}")
    rng = random.Random(FAULT_SEED + 3)
    args = ["reproduce", "--preset", "tiny", "--data-root", shared_data, "--device", "cpu", "--quiet"]
    reference = _run(*args, "--out", tmp_path / "reference", cache=session_cache_dir)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    rng_rows = rng.randint(1, 5)
    points = {
        "experts": lambda: (out / "buffer" / "manifest.json").is_file(),
        "ipc1": lambda: _rows(out / "ipc1") >= rng_rows,
        "ipc10": lambda: _rows(out / "ipc10") >= rng_rows,
        "ipc1 evaluated": lambda: (out / "ipc1" / "eval_best_vs_random_real.json").is_file(),
    }
    name = rng.choice(sorted(points))
    _kill_at([*args, "--out", out], session_cache_dir, points[name], rng.uniform(0.0, 0.3))
    done = _run(*args, "--out", out, cache=session_cache_dir)
    assert done.returncode == 0, (name, done.stderr)
    ours = json.loads((out / "results.json").read_text())
    theirs = json.loads((tmp_path / "reference" / "results.json").read_text())
    for key in ("distilled_accuracies", "random_accuracies"):
        assert [r[key] for r in ours["rows"]] == [r[key] for r in theirs["rows"]], (name, key)
    for ipc in (1, 10):
        _same_sets(out / f"ipc{ipc}", tmp_path / "reference" / f"ipc{ipc}", ["best"])


def test_the_configs_own_buffer_path_is_read_without_buffer(tiny, tmp_path, capsys):
    """Upstream's YAML files carry buffer_path: the experts are <buffer_path>/<dataset>/<model>."""
    (tmp_path / "buffers" / "digits").mkdir(parents=True)
    (tmp_path / "buffers" / "digits" / "ConvNet").symlink_to(tiny["buffer"], target_is_directory=True)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML + f"buffer_path: {tmp_path / 'buffers'}\n")
    args = ["distill", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", "--no-eval"]
    assert main(args) == 0
    assert str(tmp_path / "buffers" / "digits" / "ConvNet") in capsys.readouterr().out
    config.write_text(TINY_YAML + f"buffer_path: {tmp_path / 'nowhere'}\n")
    assert main([*args[:-3], str(tmp_path / "run2"), "--quiet", "--no-eval"]) == 2
    _one_line_error(capsys, "nowhere", "--buffer")
    assert not (tmp_path / "run2").exists()
