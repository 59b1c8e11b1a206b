"""Test configuration: capability markers, defined once, and the Triton interpreter switch.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before
memllm_kernels is imported: by default the Triton kernels run through the interpreter on CPU tensors.
On a GPU machine run with TRITON_INTERPRET=0 to test the compiled Triton kernels on the GPU instead.
No device is queried at import time: the markers evaluate lazily.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import memllm_kernels  # noqa: E402


def _cuda_reason():
    return memllm_kernels.backend_unavailable_reason("cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA GPU and the CUDA kernels built")
    config.addinivalue_line("markers", "requires_triton_cpu: needs triton in interpreter mode (TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "requires_triton_gpu: needs triton compiling for a visible GPU")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_cuda"):
        reason = _cuda_reason()
        if reason:
            pytest.skip(f"CUDA backend unavailable: {reason}")
    if item.get_closest_marker("requires_triton_cpu"):
        reason = memllm_kernels.backend_unavailable_reason("triton", "cpu")
        if reason:
            pytest.skip(f"Triton on CPU tensors unavailable: {reason}")
    if item.get_closest_marker("requires_triton_gpu"):
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1: Triton runs through the interpreter; set TRITON_INTERPRET=0 on a GPU machine")
        reason = memllm_kernels.backend_unavailable_reason("triton", "cuda")
        if reason:
            pytest.skip(f"Triton on a GPU unavailable: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# (backend, device) pairs: every compiled kernel on every device it runs on.
BACKEND_DEVICES = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.requires_triton_cpu),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.requires_cuda),
    pytest.param("triton", "cuda", id="triton-gpu", marks=pytest.mark.requires_triton_gpu),
]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.requires_cuda),
]
