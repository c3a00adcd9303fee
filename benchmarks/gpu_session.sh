#!/usr/bin/env bash
# Everything a lent GPU machine should do for this project, in one call: build the CUDA extension,
# run the GPU tests, time the engines at the paper's shapes. The device tool's machine has no network
# and keeps nothing, so every result goes under $OUT (default ./gpu-out) and the last lines printed are
# the summary (the tool returns the tail of the output).
#
#   device tool:  run  command="bash benchmarks/gpu_session.sh"  timeout_s=600
#   by hand:      OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh
#
# Budget (2026-12: 15 device-minutes per task, starts included): build about 3 min (nvcc, sm_90),
# tests about 1 min, the engine benchmark under 4 min. Each stage has its own timeout so a hang in one
# still leaves the others' results. Needs: python3 with torch (CUDA), triton, pytest, pytest-benchmark,
# nvcc, ninja (the device image has them; see ../.library/device/KINDS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
stage() { echo "== $* ($(date -u +%H:%M:%S) UTC)" | tee -a "$OUT/stages.log"; }

stage "device and versions"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"

stage "build (pip install --no-build-isolation -e ., sm_90)"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 420 "$PY" -m pip install --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1; then
  echo "build failed; the last lines of $OUT/build.log:"
  tail -25 "$OUT/build.log"
fi
"$PY" -c "import datm_fast; [print(s) for s in datm_fast.backend_info().values()]" 2>&1 | tee "$OUT/backends.txt"

stage "GPU tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_block.py tests/test_conv.py tests/test_distance.py tests/test_augment.py tests/test_unroll.py \
  -k "cuda or gpu" > "$OUT/tests.log" 2>&1
echo "tests exit code $?"
tail -4 "$OUT/tests.log"

stage "engines at full size (full, exact, tesla)"
# Every shape of the issue's GPU table; full runs out of memory from IPC 50 on, which is recorded.
timeout 330 "$PY" benchmarks/bench_unroll.py --device cuda --engines full,exact,tesla --iterations 3 \
  --out "$OUT/gpu-unroll.json" > "$OUT/bench_unroll.log" 2>&1
echo "bench exit code $?"

stage "done"
cat "$OUT/stages.log"
tail -30 "$OUT/bench_unroll.log"
