"""Triton kernels, registered as torch custom ops with torch.library.triton_op.

Importing this package needs triton; memllm_kernels imports it only when triton is installed.
On CPU tensors the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

from . import tol_gather_add as _tol_gather_add
from .tol_gather_add import tol_gather_add_kernel, tol_gather_add_triton, tol_gather_add_triton_  # noqa: F401


def aot_specs():
    """Every Triton kernel of the package with the specializations CI compiles for a GPU target."""
    yield from _tol_gather_add.aot_specs()
