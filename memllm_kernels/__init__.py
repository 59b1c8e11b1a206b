"""memllm-kernels: fused kernels for MemoryLLM's token-wise lookups (ToLs).

    import memllm_kernels as mk
    out = mk.tol_gather_add(hidden, ids, table, layer)   # hidden + table[ids, layer]
    mk.available_backends()                               # e.g. ['reference', 'cpu', 'triton']
"""

from .ops import (  # noqa: F401
    BACKENDS,
    available_backends,
    backend_unavailable_reason,
    decode_attention,
    tol_gather_add,
    tol_gather_add_,
)
from .offload.ops import (  # noqa: F401  the offload engine's ops (memllm_kernels/offload, docs/offload.md)
    tol_cache_admit,
    tol_cache_prefetch,
    tol_cached_gather_add,
    tol_cached_gather_add_,
    tol_host_alloc,
    tol_host_gather,
    tol_host_mapped,
)

__version__ = "0.1.0"
