"""The offload ops: typed wrappers with shapes, backend choice, fake kernels and autograd.

Schemas (defined once, in csrc/ops.cpp; CPU kernels in csrc/cpu/, CUDA kernels in csrc/cuda/, files named
after the op; Triton kernels in memllm_kernels/triton/):
    tol_host_gather(Tensor table, Tensor ids, Tensor(a!) out, Tensor? rows=None, bool check_ids=True) -> ()
    tol_cached_gather_add(Tensor hidden, Tensor ids, Tensor slot_map, Tensor cache, Tensor host_table,
                          int? layer=None, bool check_ids=True) -> Tensor          (and tol_cached_gather_add_)
    tol_cache_prefetch(Tensor ids, Tensor slot_map, Tensor cache, Tensor host_table, Tensor(a!) out,
                       Tensor(b!) first, Tensor(c!) slots, int layer_begin=0, int? layer_end=None,
                       bool check_ids=True) -> ()
    tol_cache_admit(Tensor ids, Tensor first, Tensor slots, Tensor rows, Tensor(a!) slot_map, Tensor(b!) owner,
                    Tensor(c!) last_use, Tensor(d!) admitted_at, Tensor(e!) cache, Tensor(f!) counters) -> ()
    tol_host_alloc(int[] size, ScalarType dtype, bool pin=True) -> Tensor
    tol_host_mapped(Tensor t) -> bool
Backends: 'reference' (memllm_kernels/offload/reference.py, any device), 'cpu', 'cuda', and 'triton' for
tol_host_gather and tol_cached_gather_add. Every check below runs before anything moves, so a bad id
raises IndexError naming the id and V on every backend, and an output that shares memory with itself (expand()ed),
another output or an input raises ValueError (_checks.outputs_apart).
"""

from __future__ import annotations

import operator

import torch

from .. import _checks
from .. import ops as _ops
from . import reference


_checked = _ops._checked


_PICKED: dict = {}


def _backend(backend: str, device: torch.device, triton_ok: bool) -> str:
    """As memllm_kernels.ops picks for tol_gather_add; 'auto' on a GPU falls back to 'reference' where
    neither CUDA kernels nor (for ops that have one) a Triton kernel can run. Cached per call site kind."""
    key = (backend, device.type, triton_ok)
    picked = _PICKED.get(key)
    if picked is not None:
        return picked
    if backend == "triton" and not triton_ok:
        raise RuntimeError("backend='triton' is not available: this op has no Triton kernel "
                           "(use 'cuda', 'cpu' or 'reference')")
    if backend == "auto" and device.type != "cpu":
        picked = "reference"
        for b in ("cuda", "triton") if triton_ok else ("cuda",):
            if _ops.backend_unavailable_reason(b, device) is None:
                picked = b
                break
    else:
        picked = _ops._pick_backend(backend, device)
    _PICKED[key] = picked
    return picked


# ---------------------------------------------------------------- tol_host_gather
def tol_host_gather(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None = None,
                    *, backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """Copy whole token rows: out[rows[i]] = table[ids[i]] (out[i] without rows). Bit exact.

    table: [V, d] or [V, L, d], dense rows, on out's device or in host memory (on a GPU: registered or
           pinned memory, read by the kernel over PCIe; the pinned host tier is such memory).
    ids:   [N] int32/int64 on out's device (on the CPU for a CPU out), each in [0, V).
    out:   [M, ...] with table's row shape and dtype; rows: [N] int32/int64 in [0, M), or None (M >= N). A row
           given twice in rows gets one of its writes, which one unspecified (the backends write in parallel).
    Returns out. check_ids=False skips the range checks (no device sync): a bad id then writes a NaN row,
    a bad destination row is skipped; nothing outside table or out is touched. out must share no memory with
    table, ids or rows, nor have elements that share memory (ValueError).
    """
    op = "tol_host_gather"
    _checks.host_gather(op, table, ids, out, rows)
    _checks.flag(op, "check_ids", check_ids)
    b = _backend(backend, out.device, triton_ok=True)
    if b != "reference":  # (a dual table's tangent was dropped: out came back without one)
        _ops._no_forward_ad(op, b, table, out)
    _checks.outputs_apart(op, {"out": out}, {"table": table, "ids": ids, "rows": rows})
    _checks.no_grad(op, table=table, out=out)
    if check_ids:
        ids = _checked(op, ids, table.shape[0])
        if rows is not None:
            rows = _checked(op, rows, out.shape[0], "row")
    if b in ("cpu", "cuda"):
        torch.ops.memllm.tol_host_gather(table, ids, out, rows, False)
    elif b == "triton":
        torch.ops.memllm.tol_host_gather_triton(table, ids, out, rows)
    else:
        reference.tol_host_gather(table, ids, out, rows)
    return out


@torch.library.register_fake("memllm::tol_host_gather")
def _tol_host_gather_fake(table, ids, out, rows=None, check_ids=True):
    _ops._no_meta_mix("tol_host_gather", table, ids, out, rows)
    _checks.host_gather("tol_host_gather", table, ids, out, rows, _checks.RAW)  # as memllm_kernels.ops' fakes
    return None


# ---------------------------------------------------------------- tol_cached_gather_add
def _check_cached(op, hidden, ids, slot_map, cache, host_table, layer, check_ids) -> torch.Tensor:
    """The ids to read, after the checks (see _checked)."""
    _checks.cached_gather_add(op, hidden, ids, slot_map, cache, host_table, layer)
    return _checked(op, ids, host_table.shape[0]) if check_ids else ids


def tol_cached_gather_add(hidden: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor, cache: torch.Tensor,
                          host_table: torch.Tensor, layer: int | None = None, *, backend: str = "auto",
                          check_ids: bool = True) -> torch.Tensor:
    """hidden + row(ids, layer), read per token from cache[slot_map[id]] on a hit, host_table[id] on a miss.

    hidden:     [..., d] float32/float16/bfloat16/float64; ids: [...] int32/int64, hidden's leading shape.
    slot_map:   [V] int32 on hidden's device: the token's cache slot in [0, C), or -1 (anything outside
                [0, C) reads as a miss).
    cache:      [C, d] or [C, L, d] on hidden's device; host_table: [V, ...] with cache's row shape and dtype,
                on hidden's device or in host memory (mapped: the pinned host tier). layer as tol_gather_add.
    Returns a new [..., d] tensor; equal bit for bit to tol_gather_add(hidden, ids, full_table, layer).
    Differentiable in hidden only (the tables are inference data).
    """
    op = "tol_cached_gather_add"
    b = _backend(backend, _ops._device_of(op, hidden), triton_ok=True)
    _checks.flag(op, "check_ids", check_ids)
    if b != "reference":  # as tol_gather_add: the compiled backends have no forward derivative
        _ops._no_forward_ad(op, b, hidden, cache, host_table)
    _checks.int_arg(op, "layer", layer, optional=True)  # the C++ ops read True and torch.tensor(1.9) as layer 1
    if b in ("cpu", "cuda"):  # the kernels check everything themselves; the Python checks only name an error
        return _ops._run_compiled(torch.ops.memllm.tol_cached_gather_add, hidden, ids, slot_map, cache, host_table,
                                  layer, check_ids, checks=lambda: _check_cached(op, hidden, ids, slot_map, cache,
                                                                                host_table, layer, check_ids))
    ids = _check_cached(op, hidden, ids, slot_map, cache, host_table, layer, check_ids)
    if b == "triton":
        return torch.ops.memllm.tol_cached_gather_add_triton(hidden, ids, slot_map, cache, host_table, layer)
    return reference.tol_cached_gather_add(hidden, ids, slot_map, cache, host_table, layer)


def tol_cached_gather_add_(hidden: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor, cache: torch.Tensor,
                           host_table: torch.Tensor, layer: int | None = None, *, backend: str = "auto",
                           check_ids: bool = True) -> torch.Tensor:
    """In-place tol_cached_gather_add: hidden += row(ids, layer); returns hidden. No autograd."""
    op = "tol_cached_gather_add_"
    b = _backend(backend, _ops._device_of(op, hidden), triton_ok=True)
    _checks.flag(op, "check_ids", check_ids)
    if b != "reference":
        _ops._no_forward_ad(op, b, hidden, cache, host_table)
    _checks.int_arg(op, "layer", layer, optional=True)  # the C++ ops read True and torch.tensor(1.9) as layer 1
    _checks.no_grad(op, "use tol_cached_gather_add (out of place) when gradients are needed, or run under "
                    "torch.no_grad()", hidden=hidden, slot_map=slot_map, cache=cache, host_table=host_table)
    _checks.writable(op, hidden=hidden)
    if b in ("cpu", "cuda"):
        _ops._run_compiled(torch.ops.memllm.tol_cached_gather_add_, hidden, ids, slot_map, cache, host_table, layer,
                           check_ids, checks=lambda: _check_cached(op, hidden, ids, slot_map, cache, host_table,
                                                                   layer, check_ids))
        return hidden
    ids = _check_cached(op, hidden, ids, slot_map, cache, host_table, layer, check_ids)
    _checks.no_overlap(op, "hidden", hidden)
    _checks.not_aliased(op, hidden, ids, slot_map, cache, host_table)
    if b == "triton":
        torch.ops.memllm.tol_cached_gather_add_triton_(hidden, ids, slot_map, cache, host_table, layer)
    else:
        hidden.copy_(reference.tol_cached_gather_add(hidden, ids, slot_map, cache, host_table, layer))
    return hidden


@torch.library.register_fake("memllm::tol_cached_gather_add")
def _tol_cached_gather_add_fake(hidden, ids, slot_map, cache, host_table, layer=None, check_ids=True):
    _ops._no_meta_mix("tol_cached_gather_add", hidden, ids, slot_map, cache, host_table)
    _checks.cached_gather_add("tol_cached_gather_add", hidden, ids, slot_map, cache, host_table, layer, _checks.RAW)
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


@torch.library.register_fake("memllm::tol_cached_gather_add_")
def _tol_cached_gather_add__fake(hidden, ids, slot_map, cache, host_table, layer=None, check_ids=True):
    _ops._no_meta_mix("tol_cached_gather_add_", hidden, ids, slot_map, cache, host_table)
    _checks.cached_gather_add("tol_cached_gather_add_", hidden, ids, slot_map, cache, host_table, layer, _checks.RAW)
    return None


def _cached_setup_context(ctx, inputs, output):
    pass


def _cached_backward(ctx, grad):
    # d/dhidden is the identity; slot_map, cache and host_table are inference data (no gradient).
    return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd("memllm::tol_cached_gather_add", _cached_backward, setup_context=_cached_setup_context)
if _ops._HAS_TRITON:
    torch.library.register_autograd("memllm::tol_cached_gather_add_triton", _cached_backward,
                                    setup_context=_cached_setup_context)


# ---------------------------------------------------------------- tol_cache_prefetch
def tol_cache_prefetch(ids: torch.Tensor, slot_map: torch.Tensor, cache: torch.Tensor, host_table: torch.Tensor,
                       out: torch.Tensor, first: torch.Tensor, slots: torch.Tensor, layer_begin: int = 0,
                       layer_end: int | None = None, *, backend: str = "auto", check_ids: bool = True) -> None:
    """One step's rows, deduplicated, in one token-major pass (see csrc/ops.cpp).

    ids:   [N] int32/int64 on out's device. slot_map [V] int32, cache [C, ...] on out's device; host_table
           [V, ...] there or in host memory. out: [>= N, ...] with the tables' row shape and dtype.
    first, slots: [N] int32 outputs: first[b] = the first position holding ids[b]; slots[b] = its cache
           slot or -1. At first occurrences, layers [layer_begin, layer_end) (default all) of the token's
           row are written to out[b], from the cache on a hit, from host_table on a miss.
    out, first and slots must share no memory with each other or the inputs (ValueError); layer_begin and
    layer_end are ints (TypeError).
    """
    op = "tol_cache_prefetch"
    _checks.token_table(op, "cache", cache)
    _checks.rows_and_ids(op, "host_table", host_table, "out", out, ids)
    _checks.same_rows(op, ["cache", "host_table"], [cache, host_table])
    dev = out.device
    for name, t in (("ids", ids), ("cache", cache), ("first", first), ("slots", slots)):
        if t.device != dev:
            raise RuntimeError(f"{op}: {name} must be on out's device {dev}, got {t.device}")
    _checks.host_or(op, "host_table", host_table, dev)
    _checks.slot_map(op, slot_map, host_table.shape[0], dev)
    N = ids.shape[0]
    for name, t in (("first", first), ("slots", slots)):
        _checks.tensor(op, name, t, (torch.int32,), "int32")
        if t.shape != (N,) or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous [N] tensor with N={N}, got shape {list(t.shape)}")
    if out.shape[0] < N:
        raise ValueError(f"{op}: out has {out.shape[0]} rows for {N} ids")
    _checks.outputs_apart(op, {"out": out, "first": first, "slots": slots},
                          {"ids": ids, "slot_map": slot_map, "cache": cache, "host_table": host_table})
    _checks.no_grad(op, cache=cache, host_table=host_table, out=out)
    _checks.int_arg(op, "layer_begin", layer_begin)  # 0.0 failed in pybind; torch.tensor(2.5) read as 2
    _checks.int_arg(op, "layer_end", layer_end, optional=True)
    _checks.flag(op, "check_ids", check_ids)
    L = cache.shape[1] if cache.dim() == 3 else 1
    end = L if layer_end is None else layer_end
    if not 0 <= layer_begin <= end <= L:
        raise IndexError(f"{op}: layers [{layer_begin}, {end}) are not within [0, {L})")
    if check_ids:
        ids = _checked(op, ids, host_table.shape[0])
    b = _backend(backend, dev, triton_ok=False)
    if b in ("cpu", "cuda"):
        torch.ops.memllm.tol_cache_prefetch(ids, slot_map, cache, host_table, out, first, slots, layer_begin,
                                            layer_end, False)
    else:
        reference.tol_cache_prefetch(ids, slot_map, cache, host_table, out, first, slots, layer_begin, layer_end)


@torch.library.register_fake("memllm::tol_cache_prefetch")
def _tol_cache_prefetch_fake(ids, slot_map, cache, host_table, out, first, slots, layer_begin=0, layer_end=None,
                             check_ids=True):
    _ops._no_meta_mix("tol_cache_prefetch", ids, slot_map, cache, host_table, out, first, slots)
    return None


# ---------------------------------------------------------------- tol_cache_admit
def tol_cache_admit(ids: torch.Tensor, first: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                    slot_map: torch.Tensor, owner: torch.Tensor, last_use: torch.Tensor, admitted_at: torch.Tensor,
                    cache: torch.Tensor, counters: torch.Tensor, *, backend: str = "auto") -> None:
    """One step's cache bookkeeping on the device after tol_cache_prefetch: an LRU tail over hot slots, the
    same decisions as CacheDirectory's hot+lru (see csrc/ops.cpp and reference.tol_cache_admit).

    ids [N] int32/int64, first and slots [N] int32: tol_cache_prefetch's inputs and outputs for the step;
    rows [>= N, ...]: its rows (rows[b] holds ids[b]'s row at first occurrences), with cache's row shape
    and dtype. Updated in place: slot_map [V] int32, owner [C] int32 (token or -1), last_use [C] int64
    (HOT_STAMP for hot slots, -1 for free ones), admitted_at [C] int64 (step of admission), cache [C, ...]
    (admitted rows copied from rows), counters [7] int64 (reference.ADMIT_COUNTERS). All on one device;
    no host synchronisation (usable under CUDA graphs). Ids outside [0, V) are skipped.
    """
    op = "tol_cache_admit"
    _checks.rows_and_ids(op, "cache", cache, "rows", rows, ids)
    N, C, dev = ids.shape[0], cache.shape[0], cache.device
    if rows.shape[0] < N:
        raise ValueError(f"{op}: rows has {rows.shape[0]} rows for {N} ids")
    if not cache.is_contiguous():
        raise ValueError(f"{op}: cache must be contiguous")
    for name, t, dtype, size in (("first", first, torch.int32, N), ("slots", slots, torch.int32, N),
                                 ("slot_map", slot_map, torch.int32, None), ("owner", owner, torch.int32, C),
                                 ("last_use", last_use, torch.int64, C), ("admitted_at", admitted_at, torch.int64, C),
                                 ("counters", counters, torch.int64, len(reference.ADMIT_COUNTERS))):
        _checks.tensor(op, name, t, (dtype,), str(dtype).removeprefix("torch."))
        if t.dim() != 1 or (size is not None and t.shape[0] != size) or not t.is_contiguous():
            want = "" if size is None else f" of {size}"
            raise ValueError(f"{op}: {name} must be a contiguous 1-D tensor{want}, got shape {list(t.shape)}")
    for name, t in (("ids", ids), ("first", first), ("slots", slots), ("rows", rows), ("slot_map", slot_map),
                    ("owner", owner), ("last_use", last_use), ("admitted_at", admitted_at), ("counters", counters)):
        if t.device != dev:
            raise RuntimeError(f"{op}: {name} must be on cache's device {dev}, got {t.device}")
    _checks.outputs_apart(op, {"slot_map": slot_map, "owner": owner, "last_use": last_use,
                               "admitted_at": admitted_at, "cache": cache, "counters": counters},
                          {"ids": ids, "first": first, "slots": slots, "rows": rows})
    _checks.no_grad(op, rows=rows, cache=cache)
    b = _backend(backend, dev, triton_ok=False)
    if b in ("cpu", "cuda"):
        torch.ops.memllm.tol_cache_admit(ids, first, slots, rows, slot_map, owner, last_use, admitted_at, cache,
                                         counters)
    else:
        reference.tol_cache_admit(ids, first, slots, rows, slot_map, owner, last_use, admitted_at, cache, counters)


@torch.library.register_fake("memllm::tol_cache_admit")
def _tol_cache_admit_fake(ids, first, slots, rows, slot_map, owner, last_use, admitted_at, cache, counters):
    _ops._no_meta_mix("tol_cache_admit", ids, first, slots, rows, slot_map, owner, last_use, admitted_at, cache,
                      counters)
    return None


# ---------------------------------------------------------------- tol_host_alloc
def tol_host_alloc(shape, dtype: torch.dtype, pin: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor of exactly `shape` x dtype bytes (rounded up to a page), from an anonymous
    mmap. pin=True page-locks and maps it for the GPU (cudaHostRegister) when the extension was built with
    CUDA and a GPU is visible (pin_unavailable_reason() is None); then tol_host_mapped(tensor) is True, and
    a failure to pin raises. Where pinning is unavailable it is ordinary memory (the op itself,
    torch.ops.memllm.tol_host_alloc, raises for pin=True there). dtype: floating point (the tables) or an
    integer dtype (raw byte buffers); shape: a sequence of integers, or one integer (a 1-D shape, as
    torch.empty(5)). TypeError otherwise; ValueError for a negative size."""
    if not isinstance(dtype, torch.dtype):  # the op refuses quantized, complex and bool dtypes itself
        raise TypeError(f"tol_host_alloc: dtype must be a floating-point or integer torch.dtype, got {dtype!r}")
    if not _checks.bad_integer(shape):  # one integer: a 1-D shape
        shape = [shape]
    elif not hasattr(shape, "__iter__") or isinstance(shape, torch.Tensor) and shape.dim() == 0:
        raise TypeError(f"tol_host_alloc: shape must be an int or a sequence of ints, got {type(shape).__name__} "
                        f"{shape!r}")
    sizes = [as_integer(s, "tol_host_alloc: sizes") for s in shape]
    if any(s < 0 for s in sizes):  # the op raises RuntimeError; a bad value is a ValueError, as in the other wrappers
        raise ValueError(f"tol_host_alloc: sizes must be >= 0, got {sizes}")
    pin = bool(pin) and pin_unavailable_reason() is None
    return torch.ops.memllm.tol_host_alloc(sizes, dtype, pin)


def as_integer(v, what: str) -> int:
    """v as an int where int(v) would truncate silently (2.5 -> 2): ints, numpy ints and integer 0-dim tensors
    pass, floats and bools raise TypeError ("{what} must be integers")."""
    try:
        if not isinstance(v, bool):
            return operator.index(v)
    except TypeError:
        pass
    raise TypeError(f"{what} must be integers, got {v!r}")


@torch.library.register_fake("memllm::tol_host_alloc")
def _tol_host_alloc_fake(size, dtype, pin=True):
    return torch.empty(size, dtype=dtype, device="cpu")


def tol_host_mapped(t: torch.Tensor) -> bool:
    """Whether the GPU kernels can read CPU tensor `t` by address: memory from tol_host_alloc(pin=True) or
    torch's pinned memory (a device mapping exists). False for pageable memory, empty tensors, tensors off
    the CPU and builds without CUDA. Use this, not `t.is_pinned()`: with torch 2.11 that answered False for
    registered memory before the process had initialised CUDA (seen on an H200)."""
    _checks.tensor("tol_host_mapped", "t", t)
    return bool(torch.ops.memllm.tol_host_mapped(t))


def pin_unavailable_reason() -> str | None:
    """None if tol_host_alloc(pin=True) page-locks memory here, else why it gives ordinary memory."""
    if not _ops._HAS_CUDA_KERNELS:
        return "memllm_kernels._C was built without CUDA (no cudaHostRegister): the host tier is ordinary memory"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible: the host tier is ordinary memory"
    return None
