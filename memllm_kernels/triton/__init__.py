"""Triton kernels, registered as torch custom ops with torch.library.triton_op.

Importing this package needs triton; memllm_kernels imports it only when triton is installed.
On CPU tensors the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

from . import decode_attention as _decode_attention
from . import tol_cached_gather_add as _tol_cached_gather_add
from . import tol_gather_add as _tol_gather_add
from . import tol_host_gather as _tol_host_gather
from .decode_attention import decode_attention, decode_attention_kernel  # noqa: F401
from .tol_cached_gather_add import (  # noqa: F401
    tol_cached_gather_add_kernel,
    tol_cached_gather_add_triton,
    tol_cached_gather_add_triton_,
)
from .tol_gather_add import tol_gather_add_kernel, tol_gather_add_triton, tol_gather_add_triton_  # noqa: F401
from .tol_host_gather import tol_host_gather_kernel, tol_host_gather_triton  # noqa: F401


def aot_specs():
    """Every Triton kernel of the package with the specializations CI compiles for a GPU target."""
    yield from _tol_gather_add.aot_specs()
    yield from _tol_host_gather.aot_specs()  # the offload kernels (memllm_kernels/offload)
    yield from _tol_cached_gather_add.aot_specs()
    yield from _decode_attention.aot_specs()  # the model's decode step (memllm_kernels.model)
