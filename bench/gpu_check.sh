#!/usr/bin/env bash
# GPU validation in one command, for a machine with a GPU, torch, triton, pytest, pytest-benchmark and
# numpy installed (no network needed): build the CUDA extension from source, run the whole test suite
# on the GPU (CUDA kernels, compiled Triton kernels, CPU kernels), run the benchmarks, and write logs and
# results JSON (GPU name, torch/triton/CUDA versions, commit) into RESULTS_DIR.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        default: bench/results
#   env: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0+PTX), MEMLLM_COMMIT (when .git
#        did not travel), TESTS (pytest paths, default tests), TEST_TIMEOUT / BENCH_TIMEOUT seconds
#        (default 300 / 240), OFFLOAD_TIMEOUT for bench/bench_offload.py (default 420), BENCHES (benchmark files, default the gather-add and end-to-end ones)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
PY=${PYTHON:-python3}
export MEMLLM_COMMIT=${MEMLLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $(date +%T) $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"

step "build the extension with CUDA kernels"
export MEMLLM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX} MAX_JOBS=${MAX_JOBS:-$(nproc)}
rm -rf build memllm_kernels/_C*.so
if ! $PY setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "warning" "$out/build.log" | grep -E "csrc/" && echo "(compiler warnings from csrc above)"
$PY -c "import memllm_kernels as mk; print('backends:', mk.available_backends())"

step "tests on the GPU (TRITON_INTERPRET=0: Triton kernels compiled for the GPU)"
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n 12"
TRITON_INTERPRET=0 timeout "${TEST_TIMEOUT:-300}" $PY -m pytest ${TESTS:-tests} -q -rs $xdist -p no:cacheprovider \
  --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1 || status=1
grep -E "passed|failed|error" "$out/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -30

step "benchmarks"
timeout "${BENCH_TIMEOUT:-240}" $PY -m pytest ${BENCHES:-bench/bench_tol_gather_add.py bench/bench_e2e.py} -q -p no:cacheprovider --device cuda \
  --results-root "$out" --benchmark-json="$out/pytest-benchmark.json" \
  --benchmark-columns=median,rounds >"$out/bench.log" 2>&1 || status=1
sed -n '/summary on/,/benchmark:/p' "$out/bench.log"
tail -3 "$out/bench.log"

step "offload benchmarks (host-row gather vs pinned memcpy, hit rates, 1b decode with ToLs in VRAM / pinned host / disk)"
timeout "${OFFLOAD_TIMEOUT:-420}" $PY -m pytest bench/bench_offload.py -q -p no:cacheprovider --device cuda \
  --results-root "$out" --benchmark-json="$out/pytest-benchmark-offload.json" \
  --benchmark-columns=median,rounds >"$out/bench-offload.log" 2>&1 || status=1
sed -n '/summary on/,/benchmark:/p' "$out/bench-offload.log"
tail -3 "$out/bench-offload.log"
step "done (status $status)"
exit $status
