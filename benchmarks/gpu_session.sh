#!/usr/bin/env bash
# Everything a lent GPU machine should do for this project, as ONE command of at most 9 minutes on a
# fresh machine, build included. The device tool's machine has no network and keeps nothing, gives back
# at most 8 files from $OUT and only the last 12,000 characters of the output, so: every result goes
# under $OUT (8 files at most), and the last thing printed is the summary table.
#
#   prepare (here):  mkdir -p data && cp ../shared/data/cifar10-jpeg.npz data/     # 54 MiB, git-ignored
#   device tool:     run  command="bash benchmarks/gpu_session.sh"  carry=["data"]  timeout_s=600
#   rerun a part:    run  command="STAGES=reproduce,wheel bash benchmarks/gpu_session.sh"  (warm machine)
#   by hand:         OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh
#   on a CPU:        OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh --dry-run   # the same stages, tiny
#
# Stages, in priority order, against one deadline (DEADLINE s from the start, default 530: the tool's
# 600 s less the summary and a margin). Each runs under `timeout` for min(its cap, the time left), and is
# skipped, with a line saying so, when less than its minimum is left: a stage cut short keeps what it wrote.
#
#   #  stage       cap  min  on the GPU (s: estimated, not yet run)         --dry-run (s: measured, 2 cores)
#   1  device       30    5  nvidia-smi, versions (5)                       the same, nvidia-smi if any (2)
#   2  build       180   60  pip install -e ., sm_90 (36: measured there)   skipped: the checkout's install
#   3  tests        90   30  pytest -k "cuda or gpu" tests/ (40)            the same on three files; skips (4)
#   4  engines     120   30  datm-fast bench, CIFAR-10 IPC 1 and 10, eight  IPC 1, 2 steps, 1 iteration, one
#                            engines, each its own process (about 150:      process (3)
#                            the cap cuts IPC 10's full and tesla)
#   5  experts      45   20  bench_experts.py, GSAM, 10,000 images, float32, 128 images, one repeat (5)
#                            tf32, graphs, NCHW, bfloat16, two repeats,
#                            two profiled (35)
#   6  evaluate     75   20  bench_evaluate.py, 3 precisions, graphs,  IPC 1, one repeat (5)
#                            torch.compile included (60)
#   7  reproduce   300  220  datm-fast reproduce --preset gpu-check (226)   --preset tiny --ipcs 1 (8-15)
#   8  wheel       150   60  pip wheel (8.0;9.0) -> fresh venv -> info (65) pure-Python wheel, same (8)
#   9  kernels      60   20  bench_block.py, the cuda device: aten,    cpp forward, 3 shapes (5)
#                            torch, cuda, triton x 3 modes x 3 shapes
#
# The expected path adds up to about 610 s, over the deadline: the wheel and the kernels, last in priority,
# are what a run drops (rerun them on the still-warm machine: STAGES=wheel,kernels). The dry run (45-60 s in all) skips
# the nvcc build and builds its wheel without the extension (DATM_FAST_SKIP_EXT=1): compiling the C++
# operators takes minutes on 2 cores, and what the dry run checks is the plumbing (wheel -> venv -> `datm-fast info`).
#
# Files in $OUT (8): summary.md (printed last), session.json (stages, versions, the wheel, the block
# kernels' rows), log.txt (every stage's output, the last 1000 lines each), tests.xml (junit),
# bench-unroll.json, experts.json, evaluate.json, reproduce.json (datm-fast reproduce's results.json, its
# table included).
#
# Environment: OUT (default ./gpu-out), PYTHON (python3), DEADLINE (530), STAGES (all, or a comma list of
# device,build,tests,engines,experts,evaluate,reproduce,wheel,kernels), ENGINES, PROFILE, BENCH_CONFIGS,
# DATA_ROOT (a folder holding CIFAR-10; default ./data, then ../shared/data), EXPECTED_TORCH (2.11.0+cu130:
# the device image's).
# Needs python3 with torch (CUDA), pytest, nvcc and ninja on the GPU machine (its image has them; see
# ../.library/device/KINDS.md); GNU coreutils' timeout, which stops a stage's whole process group.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $arg (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-gpu-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)  # absolute: some stages run from other folders
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-530}
STAGES=${STAGES:-all}
# Engines of `datm-fast bench`, ';'-separated: ours (exact by default, with its steps captured as CUDA
# graphs, in TF32 and in bfloat16, full, tesla) beside upstream's own inner loops re-stated (upstream-full,
# upstream-tesla), each measured in this run, in priority order: a stage cut at its cap loses the last rows.
# Ours default to IEEE float32 (datm_fast.precision); upstream's run as upstream ran, under PyTorch's
# defaults (TF32 in cuDNN's convolutions), so exact:precision=tf32 is the like-for-like row.
ENGINES=${ENGINES:-exact;upstream-full;upstream-tesla;exact:precision=tf32;exact:graphs=on;exact:precision=bfloat16;full;tesla}
# The engines that also run one iteration under torch.profiler (kernels launched, device-busy share, top
# kernels: what explains a miss without another GPU run), in the JSON rows and under the table in the log.
PROFILE=${PROFILE-exact;exact:graphs=on;upstream-full}
# The paper's two smallest CIFAR-10 shapes fit the 9 minutes beside everything else (each (config, engine)
# pair is its own process: about 10 s each); BENCH_CONFIGS=all times every paper shape (about 4 minutes).
BENCH_CONFIGS=${BENCH_CONFIGS:-cifar10-ipc1,cifar10-ipc10}
JOBS=$(nproc)
DEVICE=cuda
# The torch of the device image, which the wheel is built against and must be installed beside (checked
# in the wheel stage; the dry run checks only that the wheel's torch is the one it was built with).
EXPECTED_TORCH=${EXPECTED_TORCH-2.11.0+cu130}
if ((DRY)); then DEVICE=cpu EXPECTED_TORCH=""; fi
T0=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
# Unbuffered Python: a stage stopped by its timeout still leaves every line it printed.
export PYTHONUNBUFFERED=1 OUT WORK
# Run from a pytest-xdist worker (the test suite's dry run), the stages' own pytest runs would think they
# are workers too: pytest-benchmark then disables itself and the kernels stage fails.
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_XDIST_TESTRUNUID
FILES=(summary.md session.json log.txt tests.xml bench-unroll.json experts.json evaluate.json reproduce.json)
for f in "${FILES[@]}"; do rm -f "${OUT:?}/$f"; done  # a rerun into the same folder starts clean
: > "$WORK/stages.tsv"
MODE="GPU run"
if ((DRY)); then MODE="dry run on the CPU"; fi
echo "gpu_session: $MODE; deadline ${DEADLINE} s; stages ${STAGES}; results in ${OUT}"

# ----- the stage runner --------------------------------------------------------------------------------------------
STAGE_N=0
N_STAGES=9
STAGE_END=0

tmo() {  # tmo [-s SIGNAL] COMMAND...: within the current stage's time; GNU timeout signals its whole process group
  local signal=TERM
  if [[ $1 == -s ]]; then signal=$2 && shift 2; fi
  local t=$((STAGE_END - SECONDS))
  ((t < 1)) && t=1
  timeout -s "$signal" -k 5 "$t" "$@"
}

run_stage() {  # KEY TITLE CAP MIN: stage_KEY under min(CAP, time left), or a line saying why it is skipped
  local key=$1 title=$2 cap=$3 min=$4
  STAGE_N=$((STAGE_N + 1))
  NOTE="" SKIP=0
  local left=$((DEADLINE - (SECONDS - T0)))
  local why=""
  if [[ $STAGES != all && ,$STAGES, != *,$key,* ]]; then
    why="not in STAGES=$STAGES"
  elif ((left < min)); then
    why="too little time left: $((left > 0 ? left : 0)) s of the ${DEADLINE} s deadline, it needs ${min} s"
  fi
  if [[ -n $why ]]; then
    echo "== [$STAGE_N/$N_STAGES] $title: skipped ($why)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$STAGE_N" "$key" "$title" skipped 0 "$why" >> "$WORK/stages.tsv"
    return
  fi
  local budget=$((cap < left ? cap : left))
  STAGE_END=$((SECONDS + budget))
  echo "== [$STAGE_N/$N_STAGES] $title: at most ${budget} s (${left} s left) $(date -u +%H:%M:%S) UTC"
  local started=$SECONDS rc status
  "stage_$key" > "$WORK/$key.out" 2>&1
  rc=$?
  local took=$((SECONDS - started))
  if ((SKIP)); then
    status=skipped
  elif ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status=TIMEOUT NOTE="stopped at its ${budget} s limit${NOTE:+; $NOTE}"
  else
    status="FAILED (exit $rc)"
    # Without a note of its own, the last line a failed stage printed (usually the error) stands for it.
    [[ -n $NOTE ]] || NOTE=$(tr '\r' '\n' < "$WORK/$key.out" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-200)
  fi
  {
    echo
    echo "===== [$STAGE_N/$N_STAGES] $title: $status in ${took} s${NOTE:+ ($NOTE)}"
    tr '\r' '\n' < "$WORK/$key.out" | tail -n 1000
  } >> "$OUT/log.txt"
  tr '\r' '\n' < "$WORK/$key.out" | grep -v '^[[:space:]]*$' | tail -n 6 | cut -c1-200 | sed 's/^/   /'
  echo "   -> $status in ${took} s${NOTE:+: $NOTE}"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$STAGE_N" "$key" "$title" "$status" "$took" "${NOTE//$'\t'/ }" \
    >> "$WORK/stages.tsv"
}

helper() {  # the JSON and Markdown work, in Python: helper md2json|summary ARGS...
  "$PY" - "$@" << 'PY'
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUT, WORK = Path(os.environ["OUT"]), Path(os.environ["WORK"])


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def md_rows(lines, columns=None):
    """Rows of the Markdown tables in a program's output: dicts by the header (or `columns`)."""
    rows, header = [], columns
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if i + 1 < len(lines) and lines[i + 1].replace(" ", "").startswith("|---"):
            header = cells
            continue
        rows.append(dict(zip(header, cells)) if header and len(header) == len(cells) else {"cells": cells})
    return rows


def md2json(src, dest, rc, command, columns=""):
    lines = Path(src).read_text(errors="replace").replace("\r", "\n").splitlines()
    rows = md_rows(lines, columns.split(",") if columns else None)
    for row in rows:  # expert-epochs per second -> seconds per CIFAR-10 expert-epoch, the unit of the targets
        try:
            row["s_per_cifar10_epoch"] = round(1 / float(row["expert_epochs_per_s"]), 3)
        except (KeyError, ValueError, ZeroDivisionError):
            pass
    payload = {
        "command": command,
        "exit_code": int(rc),
        "comments": [line for line in lines if line.startswith("#")],
        "rows": rows,
        "output_tail": lines[-40:],
    }
    Path(dest).write_text(json.dumps(payload, indent=2) + "\n")


def partial_reproduce(run_dir, dest):
    rows = [read_json(f) or {} for f in Path(run_dir).glob("ipc*/reproduce_row.json")]
    rows = sorted((r["row"] for r in rows if "row" in r), key=lambda r: r["ipc"])
    if rows:
        payload = {"partial": True, "note": "stopped before results.json: the IPCs it finished", "rows": rows}
        Path(dest).write_text(json.dumps(payload, indent=2) + "\n")


def junit_counts(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["failed_tests"] = failed
    return n


def block_kernels(path):
    """bench_block.py's pytest-benchmark JSON as rows (provider, device, shape, mode, median and min in us),
    and one compact line per (shape, mode) with every provider's median, for the results line."""
    data = read_json(path)
    if not data:
        return None
    rows = []
    for b in data.get("benchmarks", []):
        p = b.get("params", {})
        rows.append(
            {
                "provider": p.get("provider"),
                "device": p.get("device"),
                "shape": str(p.get("shape")),
                "mode": p.get("mode"),
                "median_us": round(1e6 * b["stats"]["median"], 1),
                "min_us": round(1e6 * b["stats"]["min"], 1),
            }
        )
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cases = {}
    for r in rows:
        cases.setdefault((r["shape"], r["mode"]), {})[r["provider"]] = r["median_us"]
    lines = [
        f"{shape} {mode} " + "/".join(f"{by.get(p, '-'):g}" if p in by else "-" for p in providers)
        for (shape, mode), by in cases.items()
    ]
    return {"providers": providers, "rows": rows, "lines": lines}


def stage_results(versions, wheel, kernels=None):
    """One line of results per stage, from the files the stages wrote."""
    res = {}
    if versions:
        gpu = versions.get("gpu") or "no GPU"
        mem = f" ({versions['gpu_memory_gib']} GiB)" if versions.get("gpu_memory_gib") else ""
        res["device"] = (
            f"{gpu}{mem}; torch {versions.get('torch')} (CUDA {versions.get('torch_cuda')}), "
            f"triton {versions.get('triton')}, python {versions.get('python')}"
        )
    tests = junit_counts(OUT / "tests.xml")
    if tests:
        text = f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"
        if tests["failed_tests"]:
            text += ": " + ", ".join(tests["failed_tests"][:4])
        res["tests"] = text
    bench = read_json(OUT / "bench-unroll.json")
    if bench:
        rows = bench.get("results", [])
        errors = sum(1 for r in rows if r.get("error"))
        res["engines"] = f"{len(rows)} (config, engine) rows, {errors} with an error; the table below"
    experts = read_json(OUT / "experts.json")
    if experts and experts["rows"]:
        res["experts"] = (
            "; ".join(f"{r.get('provider')} {r.get('s_per_cifar10_epoch', '?')} s" for r in experts["rows"])
            + " per CIFAR-10 expert-epoch (GSAM; target 0.24 s, upstream 3.49 s on an H100)"
        )
    evaluate = read_json(OUT / "evaluate.json")
    if evaluate and evaluate["rows"]:
        parts = []
        for r in evaluate["rows"]:
            cells = list(r.values()) if "cells" not in r else r["cells"]
            parts.append(" ".join(str(c) for c in cells[:3]))
        res["evaluate"] = "; ".join(parts) + " (IPC, provider, s per epoch)"
    repro = read_json(OUT / "reproduce.json")
    if repro:
        parts = [
            f"IPC {r['ipc']}: {100 * r['distilled_mean']:.1f} % vs random real {100 * r['random_mean']:.1f} % "
            f"(paper {100 * r['paper_datm']:.1f} / {100 * r['paper_random']:.1f})"
            for r in repro.get("rows", [])
        ]
        done = "partial: the IPCs finished before the stop" if repro.get("partial") else f"{repro['seconds']:.0f} s"
        res["reproduce"] = "; ".join(parts) + f"; {done}"
    if kernels:
        res["kernels"] = "median us (" + "/".join(kernels["providers"]) + "): " + "; ".join(kernels["lines"])
    if wheel:
        cuda = wheel.get("backends", {}).get("cuda", {})
        live = "cuda live" if cuda.get("live") else f"cuda off ({cuda.get('detail', '?')})"
        res["wheel"] = f"installed in a fresh venv: {live}; torch {wheel.get('torch')}"
        if not wheel.get("torch_matches_build"):
            res["wheel"] += f" but built with {wheel.get('torch_at_build')}"
        if wheel.get("expected_torch") and wheel.get("torch") != wheel["expected_torch"]:
            res["wheel"] += f", not the device image's {wheel['expected_torch']}"
    return res


def summary(deadline, dry):
    stages = []
    for line in (WORK / "stages.tsv").read_text().splitlines():
        n, key, title, status, took, note = (line.split("\t") + [""] * 6)[:6]
        stages.append({"n": int(n), "key": key, "title": title, "status": status, "seconds": int(took), "note": note})
    versions = read_json(WORK / "versions.json") or {}
    wheel = read_json(WORK / "wheel.json")
    kernels = block_kernels(WORK / "kernels.json")
    results = stage_results(versions, wheel, kernels)
    total = sum(s["seconds"] for s in stages)
    bad = [s for s in stages if s["status"] not in ("ok", "skipped")]
    mode = "dry run on the CPU" if dry == "1" else "GPU run"
    machine = [versions.get("date"), versions.get("gpu") or versions.get("cpu")]
    machine += [f"torch {versions['torch']}" if versions.get("torch") else None]
    machine += [f"{total} s of stages, deadline {deadline} s", f"{len(bad)} stage(s) failed or timed out"]
    lines = [f"# GPU session summary ({mode})", "", " · ".join(m for m in machine if m), ""]
    lines += [
        "| # | stage | status | s | result |",
        "|---|---|---|---|---|",
    ]
    for s in stages:
        result = results.get(s["key"], "") if s["status"] != "skipped" else ""
        text = "; ".join(t for t in (s["note"], result) if t).replace("|", "/")
        lines.append(f"| {s['n']} | {s['title']} | {s['status']} | {s['seconds']} | {text} |")
    bench = read_json(OUT / "bench-unroll.json")
    if bench and bench.get("results"):
        lines += ["", "Engines (s per iteration, mean ± std; peak GB; our full engine's time over this one's):", ""]
        lines += [
            "| config | batch x steps | engine | s / iteration | peak GB | vs full |",
            "|---|---|---|---|---|---|",
        ]
        ok = [r for r in bench["results"] if not r.get("error") and r.get("mean_s")]
        full = {r["shape"]: r["mean_s"] for r in ok if r["engine"] == "full"}
        for r in bench["results"]:
            if r.get("error"):
                t, peak, speed = r["error"][:80].replace("|", "/"), "–", "–"
            else:
                t, peak = f"{r['mean_s']:.3f} ± {r['std_s']:.3f}", f"{r['peak_gb']:.2f}"
                speed = f"{full[r['shape']] / r['mean_s']:.2f}x" if r["shape"] in full and r["mean_s"] else "–"
            cells = [r["shape"], f"{r['batch_syn']} x {r['syn_steps']}", r["engine"], t, peak, speed]
            lines.append("| " + " | ".join(cells) + " |")
    repro = read_json(OUT / "reproduce.json")
    if repro and repro.get("table"):
        lines += ["", "Reproduce (preset " + str(repro.get("preset", {}).get("name")) + "):", ""]
        lines += [line for line in repro["table"].splitlines() if line.startswith("|")]
    text = "\n".join(lines) + "\n"
    (OUT / "summary.md").write_text(text)
    session = {"mode": mode, "deadline_s": int(deadline), "stages": stages, "results": results}
    session.update(versions=versions, wheel=wheel, kernels=kernels["rows"] if kernels else None)
    (OUT / "session.json").write_text(json.dumps(session, indent=2) + "\n")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"md2json": md2json, "partial_reproduce": partial_reproduce, "summary": summary}[command](*args)
PY
}

# ----- the stages ----------------------------------------------------------------------------------------------------
stage_device() {
  if command -v nvidia-smi > /dev/null; then
    tmo nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not here (no NVIDIA driver on this machine)"
  fi
  if command -v nvcc > /dev/null; then tmo nvcc --version | tail -n 2; else echo "nvcc: not here"; fi
  echo "$(nproc) CPUs, $(uname -sm), $(bash --version | head -n 1)"
  tmo "$PY" - << 'PY'
import json, os, platform, sys, time

info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version()}
info.update(executable=sys.executable, cpu=platform.machine(), cpus=os.cpu_count())
import torch

info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    info["capability"] = f"{p.major}.{p.minor}"
try:
    import triton

    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print("  ".join(f"{k} {v}" for k, v in info.items()))
with open(os.path.join(os.environ["WORK"], "versions.json"), "w") as f:
    json.dump(info, f)
PY
}

stage_build() {
  if ((DRY)); then
    NOTE="dry run: not rebuilt (the checkout's own install is used; nvcc builds only on the GPU machine)" SKIP=1
    return 0
  fi
  tmo env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || {
    local rc=$?
    NOTE="pip install failed"
    return $rc
  }
  local info
  info=$(tmo "$PY" -m datm_fast.cli info 2>&1)
  echo "$info"
  # The extension is optional (a failed compile still installs): the build is good only if CUDA is live.
  NOTE=$(grep -m 1 -E '^ *cuda ' <<< "$info" | sed 's/^ *//; s/  */ /g')
  [[ $NOTE == "cuda live"* ]]
}

stage_tests() {
  # No -x: one failure must not hide the tests after it. Selected by name or marker (-k sees markers too).
  # pytest-xdist, where installed (the GPU image has it), runs the nvcc compile tests side by side.
  local parallel=()
  if "$PY" -c 'import xdist' 2> /dev/null; then parallel=(-n 4 --dist loadfile); fi
  # test_gpu_session.py matches "gpu" by its name, and runs this script: left out, or it would recurse.
  local where=(tests)
  # The dry run checks the plumbing (selection, junit, counts) on three files whose GPU tests skip here:
  # the whole selection's nvcc compile tests, run by the suite anyway, took 15 of its 21 s (2026-12-05).
  if ((DRY)); then where=(tests/test_precision.py tests/test_evaluate.py tests/test_experts.py); fi
  # Stopped at the stage's end by SIGINT, not tmo's SIGTERM: pytest takes it as a KeyboardInterrupt and still
  # writes tests.xml and its summary for the tests that finished (checked with and without xdist, 2026-12-05).
  tmo -s INT "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=5 "${parallel[@]}" -k "cuda or gpu" \
    --ignore=tests/test_gpu_session.py --junitxml="$OUT/tests.xml" "${where[@]}"
}

stage_engines() {
  local engines=$ENGINES
  # On the GPU every row is its own process: a row that fails there (a CUDA graph capture never run on a
  # GPU before, a sticky CUDA error) loses that row only. The dry run's rows share one process
  # (--no-isolate): its plumbing is the point, and eight interpreter starts were most of the stage
  # (2026-12-05, 2 cores: 19 s isolated, 3 s not).
  if ((DRY)); then
    tmo "$PY" -m datm_fast.cli bench --device cpu --steps-scale 0.02 --iterations 1 --warmup 0 --no-isolate \
      --configs cifar10-ipc1 --engines "$engines" --profile "$PROFILE" --json "$OUT/bench-unroll.json"
  else
    tmo "$PY" -m datm_fast.cli bench --device cuda --configs "$BENCH_CONFIGS" --engines "$engines" \
      --profile "$PROFILE" --iterations 2 --warmup 1 --json "$OUT/bench-unroll.json"
  fi
}

stage_experts() {
  # Timed round robin and printed at the end: a cut stage prints nothing, so six providers, two repeats.
  # Two of them also run one epoch under torch.profiler: the '# profile' lines that explain a miss. NCHW: the
  # CUDA block kernels take NCHW, so the channels_last default (chosen on the CPU) copies every block's input
  # and output on a GPU; this row says whether that costs.
  local args=(--device cuda --images 10000 --repeats 2 --providers upstream-style "datm_fast cuda K=8"
    "datm_fast cuda K=8 tf32" "datm_fast cuda K=8 graphs" "datm_fast cuda K=8 NCHW" "datm_fast cuda K=8 bfloat16"
    --profile "datm_fast cuda K=8" "datm_fast cuda K=8 graphs")
  if ((DRY)); then
    args=(--device cpu --images 128 --repeats 1 --providers upstream-style "datm_fast torch"
      "datm_fast torch graphs" "datm_fast torch bfloat16" --profile "datm_fast torch")
  fi
  args+=(--optimizer gsam --markdown)
  tmo "$PY" benchmarks/bench_experts.py "${args[@]}"
  local rc=$?
  local command
  command="benchmarks/bench_experts.py $(printf '%q ' "${args[@]}")"
  helper md2json "$WORK/experts.out" "$OUT/experts.json" "$rc" "$command" \
    "optimizer,provider,s_per_1000_images (median),cpu_s_per_1000_per_thread,expert_epochs_per_s"
  return $rc
}

stage_evaluate() {
  # The 5 x IPC 1000 rows (GPU only) in priority order; each is written as soon as it is measured.
  local args=(--ipc 10 --providers "upstream,functional,functional+tf32,functional+bfloat16" --repeats 3
    --ipc1000-providers "functional+tf32,functional+graphs+tf32,functional+bfloat16,functional+compile+tf32,functional"
    --profile "functional+tf32,functional+graphs+tf32")
  if ((DRY)); then
    args=(--ipc 1 --providers "upstream,functional,functional+graphs,functional+bfloat16" --repeats 1 --profile functional)
  fi
  args+=(--device "$DEVICE")
  tmo "$PY" benchmarks/bench_evaluate.py "${args[@]}"
  local rc=$?
  local command
  command="benchmarks/bench_evaluate.py $(printf '%q ' "${args[@]}")"
  helper md2json "$WORK/evaluate.out" "$OUT/evaluate.json" "$rc" "$command"
  return $rc
}

cifar10_root() {  # the first folder holding CIFAR-10: DATA_ROOT when set, else ./data, then ../shared/data
  local d dirs=(data ../shared/data)
  if [[ -n ${DATA_ROOT:-} ]]; then dirs=("$DATA_ROOT"); fi
  for d in "${dirs[@]}"; do
    if [[ -f $d/cifar10-jpeg.npz || -f $d/cifar10.npz || -d $d/cifar-10-batches-py ]]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

stage_reproduce() {
  local root
  if ! root=$(cifar10_root); then
    NOTE="CIFAR-10 not found in ${DATA_ROOT:-data or ../shared/data}: carry a data/ folder holding cifar10-jpeg.npz"
    SKIP=1
    return 0
  fi
  local args=(--preset gpu-check --device cuda)
  if ((DRY)); then args=(--preset tiny --ipcs 1 --device cpu); fi
  # No progress bars (the stage lines stay): their carriage-return redraws would fill the log.
  tmo env TQDM_DISABLE=1 "$PY" -m datm_fast.cli reproduce "${args[@]}" --data-root "$root" --out "$WORK/reproduce"
  local rc=$?
  if ((rc == 0)); then
    cp "$WORK/reproduce/results.json" "$OUT/reproduce.json" || return 1
  else  # stopped before its results.json: keep the IPCs it finished (each writes its row when done)
    helper partial_reproduce "$WORK/reproduce" "$OUT/reproduce.json"
  fi
  return $rc
}

stage_wheel() {
  local src=$WORK/wheel-src dist=$WORK/wheel venv=$WORK/venv f
  # Built from a clean copy of what the build reads: the checkout's editable _C*.so, build/ and data/
  # stay out of the wheel, and pip's in-tree build leaves the checkout alone.
  mkdir -p "$src" "$dist"
  for f in setup.py setup.cfg pyproject.toml MANIFEST.in README.md LICENSE* datm_fast kernels csrc; do
    if [[ -e $f ]]; then cp -r "$f" "$src/"; fi
  done
  find "$src" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
  local skip=()
  if ((DRY)); then skip=(DATM_FAST_SKIP_EXT=1); fi
  tmo env TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS="$JOBS" "${skip[@]}" \
    "$PY" -m pip wheel --no-index --no-build-isolation --no-deps "$src" -w "$dist" || return $?
  local wheels=("$dist"/*.whl) whl
  whl=${wheels[0]}
  [[ -f $whl ]] || return 1
  ls -l "$whl"
  NOTE="$(basename "$whl"), $(du -k "$whl" | cut -f1) KiB"
  if ! tmo "$PY" -m venv --system-site-packages "$venv"; then
    rm -rf "$venv"  # an interpreter without ensurepip: a venv without pip, filled by this pip
    tmo "$PY" -m venv --system-site-packages --without-pip "$venv" || return $?
  fi
  # The wheel first, while pip sees no other datm-fast (the checkout's editable one is in $PY's env).
  if [[ -x $venv/bin/pip ]]; then
    tmo "$venv/bin/python" -m pip install --no-deps --no-index --no-compile "$whl" || return $?
  else
    tmo "$PY" -m pip --python "$venv/bin/python" install --no-deps --no-index --no-compile "$whl" || return $?
  fi
  # Then torch. The new venv sees the base interpreter's packages; where python3 is itself a venv (the GPU
  # image's is /opt/torch/.venv), torch is in that venv's site-packages: add those paths, after the new
  # venv's own (a path from a .pth file is not a site dir: the .pth of the checkout's editable install there
  # is not read, so datm_fast can come from the wheel alone).
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return $?
  "$PY" -c 'import sys, sysconfig
if sys.prefix != sys.base_prefix:
    print("\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))))' > "$site/_parent_env.pth"
  cat "$site/_parent_env.pth"
  # From outside the checkout, so that nothing but the installed wheel can be imported as datm_fast.
  (cd "$WORK" && tmo "$venv/bin/datm-fast" info) || return $?
  (cd "$WORK" && tmo env BUILD_TORCH="$(cat "$WORK/torch_version" 2> /dev/null)" WHEEL="$whl" DRY="$DRY" \
    EXPECTED_TORCH="$EXPECTED_TORCH" "$venv/bin/python" - << 'PY'
import json, os, sys, zipfile

import torch

import datm_fast
from datm_fast.backends import backend_info

whl = os.environ["WHEEL"]
names = zipfile.ZipFile(whl).namelist()
built = os.environ.get("BUILD_TORCH") or torch.__version__
info = {
    "wheel": os.path.basename(whl),
    "size_mb": round(os.path.getsize(whl) / 1e6, 2),
    "extension_in_wheel": [n for n in names if n.startswith("datm_fast/_C")],
    "datm_fast_file": datm_fast.__file__,
    "from_venv": datm_fast.__file__.startswith(sys.prefix),
    "torch": torch.__version__,
    "torch_at_build": built,
    "torch_matches_build": torch.__version__ == built,
    "expected_torch": os.environ.get("EXPECTED_TORCH") or None,
    "backends": {k: {"live": s.live, "detail": s.detail} for k, s in backend_info().items()},
}
print(json.dumps(info, indent=2))
with open(os.path.join(os.environ["WORK"], "wheel.json"), "w") as f:
    json.dump(info, f)
problems = [] if info["from_venv"] else [f"datm_fast imported from {datm_fast.__file__}, not the venv"]
if not info["torch_matches_build"]:
    problems.append(f"torch {torch.__version__} here, the wheel was built with {built}")
if os.environ.get("DRY") != "1":
    if not info["extension_in_wheel"]:
        problems.append("no datm_fast/_C*.so in the wheel")
    if not info["backends"]["cuda"]["live"]:
        problems.append("the cuda backend is not live from the wheel: " + info["backends"]["cuda"]["detail"])
    if info["expected_torch"] and torch.__version__ != info["expected_torch"]:
        print(f"note: torch {torch.__version__}, not {info['expected_torch']}: the wheel fits this torch only")
for p in problems:
    print("PROBLEM:", p)
cuda = info["backends"]["cuda"]
live = "live" if cuda["live"] else "off"
print(f"{info['wheel']} ({info['size_mb']} MB) from {sys.prefix}: cuda {live}, torch {torch.__version__}")
sys.exit(1 if problems else 0)
PY
  ) || return $?
}

stage_kernels() {
  # The fused block per backend (aten: PyTorch's ops through autograd; torch: the closed forms; cuda; triton),
  # forward, backward and double backward, at the CIFAR ConvNet's shapes: what says whether the Triton
  # variant earns a place in `auto`. Last in priority: on a first run it follows the wheel, which the deadline
  # drops; rerun both on the warm machine with STAGES=wheel,kernels.
  local select="cuda"
  if ((DRY)); then select="cpu and cpp and forward"; fi
  tmo "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_block.py --benchmark-only -k "$select" \
    --benchmark-columns=min,median --benchmark-json "$WORK/kernels.json"
}

# ----- the session ---------------------------------------------------------------------------------------------------
run_stage device "device and versions" 30 5
"$PY" -c 'import torch; print(torch.__version__)' > "$WORK/torch_version" 2> /dev/null
run_stage build "build (pip install -e ., sm_90)" 180 60
run_stage tests "GPU tests (pytest -k 'cuda or gpu')" 90 30
run_stage engines "engines ($ENGINES)" 120 30
run_stage experts "experts (bench_experts.py, GSAM)" 45 20
run_stage evaluate "evaluation (bench_evaluate.py)" 75 20
if ((DRY)); then
  run_stage reproduce "reproduce --preset tiny --ipcs 1" 120 30
else
  run_stage reproduce "reproduce --preset gpu-check" 300 220
fi
run_stage wheel "wheel (8.0;9.0) in a fresh venv" 150 60
run_stage kernels "block kernels (bench_block.py)" 60 20

helper summary "$DEADLINE" "$DRY" || echo "gpu_session: the summary could not be written"
echo "== done in $((SECONDS - T0)) s; the summary (also $OUT/summary.md):"
echo
cat "$OUT/summary.md" 2> /dev/null
# The exit status: 1 when a stage failed or timed out (skipped stages are not failures).
! grep -q -E $'\t(FAILED|TIMEOUT)' "$WORK/stages.tsv"
