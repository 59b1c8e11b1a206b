"""The offload engine (docs/offload.md): ToLs on disk or in pinned host memory, a device row cache,
asynchronous prefetch overlapped with compute.

    from memllm_kernels.offload import HostTable, DiskTable, OffloadEngine
    engine = OffloadEngine(HostTable.from_file("tol.safetensors", model), device="cuda", cache_rows=6400,
                           policy="hot+lru", token_counts=counts)
    swap_ffn_for_engine(model, engine)          # memllm_kernels.model: the model reads through the engine

Files: ops.py (the offload ops: tol_host_gather, tol_cached_gather_add(_), tol_cache_prefetch, tol_cache_admit,
tol_host_alloc, tol_host_mapped), reference.py (their pure-PyTorch specs), tiers.py (DiskTable, HostTable),
policy.py (CacheDirectory, LRU/LFU/static/hot+tail policies, simulate), engine.py (OffloadEngine).
"""

from .engine import MISS_PATHS, OffloadEngine, format_stats  # noqa: F401
from .ops import (  # noqa: F401
    pin_unavailable_reason,
    tol_cache_admit,
    tol_cache_prefetch,
    tol_cached_gather_add,
    tol_cached_gather_add_,
    tol_host_alloc,
    tol_host_gather,
    tol_host_mapped,
)
from .policy import POLICIES, CacheDirectory, hot_set_from_counts, simulate  # noqa: F401
from .tiers import DiskTable, HostTable  # noqa: F401
