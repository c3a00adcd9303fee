"""benchmarks/gpu_session.sh, the one prepared run for a lent GPU, checked on the CPU through --dry-run.

The device tool returns at most 8 files from $OUT and only the end of the output, so the script must
keep to 8 files, print its summary last, report every stage (run, skipped or failed) and stop each
stage at the deadline. The GPU run itself can only happen on the lent machine; these tests keep its
plumbing working in between.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
STAGES = ("device", "build", "tests", "engines", "experts", "evaluate", "reproduce", "wheel", "kernels")
FILES = {"summary.md", "session.json", "log.txt", "tests.xml"}
FILES |= {"bench-unroll.json", "experts.json", "evaluate.json", "reproduce.json"}
MAX_FILES = 8  # what the device tool brings back from $OUT

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and GNU timeout"
)


def _run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    environ = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=300
    )
    return done, out


def _checks_common(done: subprocess.CompletedProcess, out: Path) -> dict:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and set(files) <= FILES, files
    assert all((out / f).is_file() for f in files)
    summary = (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip())  # the tool returns the tail: the summary is last
    session = json.loads((out / "session.json").read_text())
    assert [s["key"] for s in session["stages"]] == list(STAGES)  # every stage reported, in priority order
    for n, stage in enumerate(session["stages"], 1):
        assert f"== [{n}/{len(STAGES)}] {stage['title']}" in done.stdout
        assert f"| {n} | {stage['title']} | {stage['status']} |" in summary
    return {s["key"]: s for s in session["stages"]} | {"_session": session}


@pytest.mark.slow  # about a minute on 2 cores: every stage runs, tiny
def test_dry_run_runs_every_stage_into_at_most_8_files(tmp_path, session_cache_dir):
    # The real CIFAR-10 beside the checkout when it is there (the reproduce stage runs the tiny preset on it,
    # decoded once per test session); else an empty folder, and the stage must say that it found none.
    data = SHARED_DATA if (SHARED_DATA / "cifar10-jpeg.npz").is_file() else tmp_path / "no-data"
    if data != SHARED_DATA:
        data.mkdir()
    done, out = _run(tmp_path, "--dry-run", DATA_ROOT=str(data), DATM_FAST_CACHE=str(session_cache_dir))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    stages = _checks_common(done, out)
    status = {k: s["status"] for k, s in stages.items() if k != "_session"}
    with_data = data == SHARED_DATA
    skipped = ("build",) if with_data else ("build", "reproduce")
    assert status == {k: "skipped" if k in skipped else "ok" for k in STAGES}, status
    assert "dry run" in stages["build"]["note"]

    assert set(p.name for p in out.iterdir()) == FILES - (set() if with_data else {"reproduce.json"})
    if with_data:
        reproduce = json.loads((out / "reproduce.json").read_text())
        assert reproduce["preset"]["name"] == "tiny" and [r["ipc"] for r in reproduce["rows"]] == [1]
        assert "IPC 1: " in stages["_session"]["results"]["reproduce"]
        assert "| 1 | " in (out / "summary.md").read_text()  # the table against the paper, in the summary
    else:
        assert "CIFAR-10 not found" in stages["reproduce"]["note"]
    tests = ET.parse(out / "tests.xml").getroot()
    assert any(True for _ in tests.iter("testcase")) and "0 failed" in stages["_session"]["results"]["tests"]
    bench = json.loads((out / "bench-unroll.json").read_text())
    engines = ["exact", "upstream-full", "upstream-tesla", "exact:precision=tf32", "exact:graphs=on"]
    engines += ["exact:precision=bfloat16", "full", "tesla"]
    assert [r["engine"] for r in bench["results"]] == engines  # the ENGINES default, split right
    assert all(r["mean_s"] > 0 and not r["error"] for r in bench["results"])
    profiled = {r["engine"] for r in bench["results"] if r["profile"] is not None}
    assert profiled == {"exact", "exact:graphs=on", "upstream-full"}  # the PROFILE default
    assert "profile exact @ cifar10-ipc1: wall" in (out / "log.txt").read_text()
    experts = json.loads((out / "experts.json").read_text())
    assert experts["exit_code"] == 0
    assert [r["provider"] for r in experts["rows"]] == [
        "upstream-style",
        "datm_fast torch",
        "datm_fast torch graphs",
        "datm_fast torch bfloat16",
    ]
    assert all(r["s_per_cifar10_epoch"] > 0 for r in experts["rows"])
    assert any(c.startswith("# profile datm_fast torch (gsam, 128 images): wall") for c in experts["comments"])
    evaluate = json.loads((out / "evaluate.json").read_text())
    assert evaluate["exit_code"] == 0 and {r["provider"] for r in evaluate["rows"]} == {
        "upstream",
        "functional",
        "functional+graphs",
        "functional+bfloat16",
    }
    assert any(c.startswith("# profile functional (IPC 1 x 1 runs, one pass): wall") for c in evaluate["comments"])
    wheel = stages["_session"]["wheel"]
    # The wheel was installed in a fresh venv and imported from there, beside the torch it was built with.
    assert wheel["from_venv"] and wheel["torch_matches_build"] and wheel["wheel"].endswith(".whl")
    assert wheel["backends"]["torch"]["live"]
    # The block kernels' rows (pytest-benchmark's JSON, digested into session.json: no ninth file).
    kernels = stages["_session"]["kernels"]
    assert {(r["provider"], r["device"], r["mode"]) for r in kernels} == {("cpp", "cpu", "forward")}
    assert len(kernels) == 3 and all(r["median_us"] > 0 for r in kernels)
    assert stages["_session"]["results"]["kernels"].startswith("median us (cpp): ")
    log = (out / "log.txt").read_text()
    for n in range(1, len(STAGES) + 1):
        assert f"===== [{n}/{len(STAGES)}]" in log


def test_the_deadline_skips_stages_and_says_why(tmp_path):
    done, out = _run(tmp_path, "--dry-run", DEADLINE="0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    stages = _checks_common(done, out)
    for key in STAGES:
        assert stages[key]["status"] == "skipped" and "too little time left" in stages[key]["note"], stages[key]
    assert sorted(p.name for p in out.iterdir()) == ["session.json", "summary.md"]  # nothing ran


def test_a_failed_stage_is_reported_and_fails_the_run(tmp_path):
    # ENGINES is overridable; an engine the bench does not know fails the stage before any work.
    done, out = _run(tmp_path, "--dry-run", STAGES="engines", ENGINES="exact;no-such-engine")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    stages = _checks_common(done, out)
    assert stages["engines"]["status"].startswith("FAILED") and "no-such-engine" in stages["engines"]["note"]
    assert all(stages[k]["note"] == "not in STAGES=engines" for k in STAGES if k != "engines")
    assert "no-such-engine" in (out / "log.txt").read_text()


def test_unknown_arguments_are_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--dry-run" in done.stderr
