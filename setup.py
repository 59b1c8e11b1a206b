"""Builds memllm_kernels._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present (never decided by whether a GPU is attached).

    MEMLLM_BUILD_CUDA=1   build the CUDA kernels or fail saying what is missing
    MEMLLM_BUILD_CUDA=0   CPU-only build
    (unset)               CUDA kernels iff nvcc and a CUDA torch are found
    TORCH_CUDA_ARCH_LIST  GPU targets, default "9.0+PTX" (sm_90 code plus PTX for newer GPUs)

Install against the torch you already have (pip would otherwise fetch a second, multi-GB torch into
an isolated build environment):  pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "memllm-kernels compiles against an installed PyTorch, and none was found.\n"
        "Install torch first (e.g. `pip install torch==2.13.0`), then build with\n"
        "`pip install --no-build-isolation -e .`"
    )


def want_cuda() -> bool:
    switch = os.environ.get("MEMLLM_BUILD_CUDA", "").strip()
    if switch == "0":
        return False
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch otherwise guesses CUDA_HOME from `which nvcc`, which may be a wrapper outside the
        # toolkit, and the link then fails on -lcudart.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None:
        missing.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if switch == "1" and missing:
        sys.exit("MEMLLM_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return not missing


def extensions():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch's cpp_extension passes the standard its headers need (C++20 from 2.14 on).
    cxx = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP: without -fopenmp it compiles to a serial loop (the CPU kernel
        # ran on one core and reached 0.4x of torch.add with two). libgomp.so.1 resolves to the copy torch
        # already loaded, so there is one OpenMP runtime and torch.set_num_threads applies.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(
        name="memllm_kernels._C",
        extra_link_args=link,
        include_dirs=[os.path.join(here, "csrc")],
        py_limited_api=True,  # one _C.abi3.so for every Python >= 3.10 (torch defines Py_LIMITED_API)
    )
    if want_cuda():
        # With no GPU attached and no list given, torch cannot guess the targets (and 2.14 raises).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-Wall"]
        return [cpp_extension.CUDAExtension(sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
                                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]
    return [cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]


setup(
    packages=find_packages(include=["memllm_kernels", "memllm_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
