"""Loads the compiled extension, which registers the torch.ops.memllm schemas and the C++/CUDA kernels.

A failed load is an ImportError that says what is missing and how to fix it; it is never swallowed,
because without the extension torch.ops.memllm does not exist.
"""

import importlib

import torch

_BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `make test`, which also creates the .venv)"
)


def load() -> None:
    try:
        importlib.import_module("memllm_kernels._C")
    except ModuleNotFoundError as e:
        raise ImportError(
            f"memllm_kernels._C, the compiled kernel library, is not built ({e}); {_BUILD_HINT}"
        ) from e
    except ImportError as e:
        msg = str(e)
        if "libc10_cuda" in msg or "libcudart" in msg:
            reason = (
                "it was built against a CUDA build of torch but this torch "
                f"({torch.__version__}) is CPU-only or lacks the CUDA runtime; rebuild it here with "
                "MEMLLM_BUILD_CUDA=0 or install the CUDA torch it was built for"
            )
        elif "undefined symbol" in msg:
            reason = (
                f"it was built against another torch version than this one ({torch.__version__}); rebuild it"
            )
        else:
            reason = "the shared library failed to load"
        raise ImportError(f"memllm_kernels._C could not be loaded: {reason}. Error: {msg}. To {_BUILD_HINT}.") from e


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered a `dispatch_key` kernel for memllm::`op`."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"memllm::{op}", dispatch_key)
