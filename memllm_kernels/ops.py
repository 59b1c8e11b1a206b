"""The public ops: typed wrappers with shapes, backend choice, fake kernels and autograd.

Schemas (defined once, in csrc/ops.cpp):
    memllm::tol_gather_add(Tensor hidden, Tensor ids, Tensor table, int? layer=None, bool check_ids=True) -> Tensor
    memllm::tol_gather_add_(Tensor(a!) hidden, Tensor ids, Tensor table, int? layer=None, bool check_ids=True) -> ()
with CPU (C++) and CUDA kernels; the Triton kernel is memllm::tol_gather_add_triton(_)
(memllm_kernels/triton/tol_gather_add.py). reference.py holds the spec every backend is tested against.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _ext, reference

_ext.load()

BACKENDS = ("reference", "cpu", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_HAS_TRITON = importlib.util.find_spec("triton") is not None
# Read once: a dispatcher query that torch.compile cannot trace.
_HAS_CUDA_KERNELS = _ext.has_kernel("tol_gather_add", "CUDA")
if _HAS_TRITON:
    from . import triton as _triton  # registers memllm::tol_gather_add_triton(_)


def _triton_interpret() -> bool:
    """Whether the Triton kernels were defined under the interpreter (decided when they were imported)."""
    return _HAS_TRITON and _triton.tol_gather_add._INTERPRET


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """None if `backend` can run on `device` here (default: any device it supports), else why not."""
    device = None if device is None else torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device is not None and device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, these are on {device}"
        return None
    if backend == "cuda":
        if not _HAS_CUDA_KERNELS:
            return ("memllm_kernels._C was built without CUDA kernels (CPU-only torch or no nvcc at build "
                    "time); rebuild with a CUDA torch and MEMLLM_BUILD_CUDA=1")
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        if device is not None and device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, these are on {device}"
        return None
    # triton
    if not _HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if _triton_interpret():
        return None  # the interpreter runs kernels on CPU (and copies CUDA tensors through the host)
    if not torch.cuda.is_available():
        return "triton needs a GPU, or TRITON_INTERPRET=1 (set before import) to run on the CPU"
    if device is not None and device.type != "cuda":
        return f"triton kernels run on CUDA tensors, these are on {device} (or set TRITON_INTERPRET=1)"
    return None


def available_backends() -> list[str]:
    """The backends this install can run: 'reference' always, 'cpu', 'triton', 'cuda' when usable."""
    return [b for b in BACKENDS if backend_unavailable_reason(b) is None]


_PICKED: dict[tuple[str, str], str] = {}


def _pick_backend(backend: str, device: torch.device) -> str:
    """The backend to run on `device`; cached, since it is asked on every call (10 us matter at decode)."""
    key = (backend, device.type)
    picked = _PICKED.get(key)
    if picked is None:
        picked = _PICKED[key] = _resolve_backend(backend, device)
    return picked


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        order = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
        for b in order:
            if backend_unavailable_reason(b, device) is None:
                return b
        raise RuntimeError(f"no compiled backend can run on {device}: "
                           + "; ".join(f"{b}: {backend_unavailable_reason(b, device)}" for b in order)
                           + ". backend='reference' runs anywhere")
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    return backend


def _check_args(op: str, hidden, ids, table, layer) -> None:
    """The checks the C++ kernels make, made in Python first so that every backend raises the same
    TypeError / ValueError / IndexError (the C++ ops raise RuntimeError, TypeError for dtypes)."""
    for name, t in (("hidden", hidden), ("ids", ids), ("table", table)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if table.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: table must be float32, float16, bfloat16 or float64, got {table.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: ids must be int32 or int64, got {ids.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have shape [..., d], got a 0-d tensor")
    if ids.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: ids must have hidden's leading shape {list(hidden.shape[:-1])}, "
                         f"got {list(ids.shape)}")
    if table.dim() not in (2, 3):
        raise ValueError(f"{op}: table must be [V, d] or token-major [V, L, d], got shape {list(table.shape)}")
    if table.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"{op}: table rows have d={table.shape[-1]} but hidden has d={hidden.shape[-1]}")
    if not (hidden.device == ids.device == table.device):
        raise RuntimeError(f"{op}: hidden, ids and table must be on one device, got {hidden.device}, "
                           f"{ids.device} and {table.device}")
    if table.shape[-1] > 1 and table.stride(-1) != 1:
        raise ValueError(f"{op}: table's last dim must be contiguous (stride 1), got strides {table.stride()}; "
                         "pass table.contiguous() if a copy of the table is acceptable")
    if _bad_layer(layer):
        raise TypeError(f"{op}: layer must be an int or None, got {type(layer).__name__} {layer!r}")
    if table.dim() == 3:
        if layer is None:
            raise ValueError(f"{op}: a token-major [V, L, d] table needs layer=, with L={table.shape[1]}")
        if not 0 <= layer < table.shape[1]:
            raise IndexError(f"{op}: layer={layer} is outside the table's [0, {table.shape[1]}) layers")
    elif layer is not None:
        raise ValueError(f"{op}: layer={layer} was given for a [V, d] table; pass a [V, L, d] table or layer=None")


def _bad_layer(layer) -> bool:
    """Not None nor an integer (an index: int, SymInt, a numpy int). The C++ ops take True as layer 1 and fail
    on 1.5 with a pybind cast error, so the compiled paths check this before calling them too."""
    return layer is not None and (isinstance(layer, bool) or not hasattr(type(layer), "__index__"))


def _check_id_range(op: str, ids: torch.Tensor, num_rows: int) -> None:
    """Raises IndexError naming the first id outside [0, V). One device sync on GPU tensors."""
    if ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync on a GPU
    if lo >= 0 and hi < num_rows:
        return
    bad = lo if lo < 0 else hi
    pos = int((ids.reshape(-1) == bad).nonzero()[0, 0])
    raise IndexError(f"{op}: id {bad} (at flat position {pos} of ids) is outside [0, V) for a table of "
                     f"V={num_rows} rows")


_BAD_ID = "is outside [0, V)"


def _check_no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """An output written in place must not have elements sharing memory (an expand()ed tensor): the C++
    kernels refuse it through ATen's check, the Triton ones would race. The same test as ATen's
    has_internal_overlap: a dimension of size > 1 with stride 0."""
    if any(n > 1 and st == 0 for n, st in zip(t.shape, t.stride())):
        raise RuntimeError(f"{op}: {name} has elements that share memory (shape {list(t.shape)}, strides "
                           f"{list(t.stride())}), so it cannot be written in place; pass {name}.clone()")


def _check_not_aliased(op: str, hidden: torch.Tensor, *reads: torch.Tensor) -> None:
    """hidden, written in place, must not share memory with what the kernel reads (a hidden that is a view of its
    own table would read rows it already overwrote); the C++ kernels make the same check through ATen's."""
    if not torch.compiler.is_compiling() and any(torch._C._overlaps(hidden, t) for t in reads):
        raise RuntimeError(f"{op}: hidden shares memory with ids or the table it reads; pass hidden.clone()")


def _run_compiled(op, *args, checks=None):
    """Calls a C++/CUDA op, which checks its arguments itself. On an error, `checks()` (the Python checks,
    run only then: they cost ~2.5 us per call, a third of a one-token call on CPU) raises the TypeError /
    ValueError / IndexError the Python backends raise; a bad-id RuntimeError becomes IndexError."""
    try:
        return op(*args)
    except (RuntimeError, TypeError) as e:
        error = e
    if checks is not None:
        checks()  # outside the except block, so a Python error does not chain onto the C++ one
    if isinstance(error, RuntimeError) and _BAD_ID in str(error):
        raise IndexError(str(error).split("\n")[0]) from None
    raise error


def _device_of(op: str, hidden) -> torch.device:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{op}: hidden must be a torch.Tensor, got {type(hidden).__name__}")
    return hidden.device


def tol_gather_add(hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, layer: int | None = None,
                   *, backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """Add token-wise lookup rows to the residual stream: hidden + table[ids] (or table[ids, layer]).

    hidden: [..., d] float32/float16/bfloat16 (float64 for gradcheck), any strides.
    ids:    [...] int32/int64, hidden's leading shape, each in [0, V).
    table:  [V, d], or token-major [V, L, d] with `layer` in [0, L); float32/float16/bfloat16/float64,
            last dim contiguous. A table of another dtype is upcast: the sum is taken in float32 and
            returned in hidden's dtype.
    backend: 'auto' (fastest compiled backend for the device), 'reference', 'cpu', 'triton', 'cuda'.
    check_ids: raise IndexError on an id outside [0, V) (on CUDA this costs one device sync; pass
            False under CUDA graphs: kernels still never read outside the table, they write NaN rows).
    Returns a new contiguous [..., d] tensor. Differentiable in hidden and table.
    """
    backend = _pick_backend(backend, _device_of("tol_gather_add", hidden))
    if backend in ("cpu", "cuda"):
        args = (hidden, ids, table, layer, check_ids)
        checks = lambda: _check_args("tol_gather_add", hidden, ids, table, layer)  # noqa: E731
        if _bad_layer(layer):
            checks()
        if not torch.compiler.is_compiling() and isinstance(table, torch.Tensor) and not (
                torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad)):
            # The op's autograd kernel is Python (register_autograd) and costs about 4 us per call even
            # when no gradient is wanted (8 -> 4 us for one token on CPU): go straight to the kernel.
            with torch._C._AutoDispatchBelowAutograd():
                return _run_compiled(torch.ops.memllm.tol_gather_add, *args, checks=checks)
        return _run_compiled(torch.ops.memllm.tol_gather_add, *args, checks=checks)
    _check_args("tol_gather_add", hidden, ids, table, layer)
    if check_ids:
        _check_id_range("tol_gather_add", ids, table.shape[0])
    if backend == "triton":
        return torch.ops.memllm.tol_gather_add_triton(hidden, ids, table, layer)
    return reference.tol_gather_add(hidden, ids, table, layer)


def tol_gather_add_(hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, layer: int | None = None,
                    *, backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """In-place tol_gather_add: hidden += table[ids] (or table[ids, layer]); returns hidden.

    Shapes and arguments as in tol_gather_add. For inference: no autograd (use tol_gather_add to train).
    A bad id raises before anything is written (with check_ids=True).
    """
    backend = _pick_backend(backend, _device_of("tol_gather_add_", hidden))
    if torch.is_grad_enabled() and (hidden.requires_grad or getattr(table, "requires_grad", False)):
        raise RuntimeError("tol_gather_add_ works in place and has no autograd; use tol_gather_add "
                           "(out of place) when gradients are needed, or run under torch.no_grad()")
    if backend in ("cpu", "cuda"):
        if _bad_layer(layer):
            _check_args("tol_gather_add_", hidden, ids, table, layer)
        _run_compiled(torch.ops.memllm.tol_gather_add_, hidden, ids, table, layer, check_ids,
                      checks=lambda: _check_args("tol_gather_add_", hidden, ids, table, layer))
        return hidden
    _check_args("tol_gather_add_", hidden, ids, table, layer)
    _check_no_overlap("tol_gather_add_", "hidden", hidden)
    _check_not_aliased("tol_gather_add_", hidden, ids, table)
    if check_ids:
        _check_id_range("tol_gather_add_", ids, table.shape[0])
    if backend == "triton":
        torch.ops.memllm.tol_gather_add_triton_(hidden, ids, table, layer)
    else:
        hidden.copy_(reference.tol_gather_add(hidden, ids, table, layer))
    return hidden


def _check_decode_attention(qkv, k_cache, v_cache, cos, sin, pos, pad, n_head) -> None:
    """decode_attention's argument checks that need no device sync."""
    op = "decode_attention"
    for name, t in (("qkv", qkv), ("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos), ("sin", sin),
                    ("pos", pos), ("pad", pad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if qkv.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: qkv must be float32, float16, bfloat16 or float64, got {qkv.dtype}")
    if k_cache.dtype not in _FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:  # qkv's, or not (autocast)
        raise TypeError(f"{op}: k_cache and v_cache must share one float dtype, got {k_cache.dtype}, {v_cache.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"{op}: cos and sin must be float32 tables, got {cos.dtype}, {sin.dtype}")
    if pos.dtype not in (torch.int32, torch.int64) or pad.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: pos and pad must be int32 or int64, got {pos.dtype}, {pad.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must both be [B, Hkv, S, hd], got {list(k_cache.shape)} "
                         f"and {list(v_cache.shape)}")
    B, Hkv, S, hd = k_cache.shape
    if hd % 2:
        raise ValueError(f"{op}: RoPE needs an even head_dim, got {hd}")
    if not isinstance(n_head, int) or n_head < 1 or n_head % Hkv:
        raise ValueError(f"{op}: n_head={n_head} must be a positive multiple of the caches' {Hkv} key/value heads")
    if qkv.shape != (B, (n_head + 2 * Hkv) * hd):
        raise ValueError(f"{op}: qkv must be [B, (n_head + 2 Hkv) hd] = [{B}, {(n_head + 2 * Hkv) * hd}], got "
                         f"{list(qkv.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != hd // 2:
        raise ValueError(f"{op}: cos and sin must be [P, hd/2] = [P, {hd // 2}], got {list(cos.shape)}, "
                         f"{list(sin.shape)}")
    if pos.numel() != 1 or pad.shape != (B,):
        raise ValueError(f"{op}: pos must hold one slot and pad be [B] = [{B}], got {list(pos.shape)}, "
                         f"{list(pad.shape)}")
    if len({t.device for t in (qkv, k_cache, v_cache, cos, sin, pos, pad)}) != 1:
        raise RuntimeError(f"{op}: every tensor must be on one device")
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() \
            or not (cos.is_contiguous() and sin.is_contiguous() and pad.is_contiguous()):
        raise ValueError(f"{op}: qkv's rows, the caches (alike) and cos, sin, pad must be contiguous in their "
                         "last dim")


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, n_head: int, *,
                     backend: str = "auto", check: bool = True) -> torch.Tensor:
    """One decode step's attention for one new token per row: RoPE on q and k, k and v written to the caches at
    slot pos, and attention over slots pad[b]..pos, in one kernel (Triton) per layer.

    qkv [B, (H + 2 Hkv) hd] (H = n_head), k_cache/v_cache [B, Hkv, S, hd] (updated in place), cos/sin [P, hd/2]
    float32 RoPE tables, pos [1] the slot, pad [B] left padding; returns y [B, H hd] (reference.decode_attention
    is the spec). backend: 'auto' (Triton where it can run, else the reference, as under torch.compile with
    Triton's interpreter), 'triton' or 'reference'.
    check: raise IndexError for pos outside [0, S) or pad outside [0, S] (one device sync on a GPU; pass False
    under CUDA graphs: the kernel then writes nothing for a bad slot and returns NaN).
    """
    _check_decode_attention(qkv, k_cache, v_cache, cos, sin, pos, pad, n_head)
    reason = backend_unavailable_reason("triton", qkv.device)
    if reason is None and _triton_interpret() and torch.compiler.is_compiling():
        # torch.compile cannot trace an interpreted kernel (wrap_triton hands back the eager one)
        reason = "torch.compile cannot trace a kernel run by Triton's interpreter (TRITON_INTERPRET=1)"
    if backend == "auto":
        backend = "triton" if reason is None else "reference"
    elif backend not in ("triton", "reference"):
        raise ValueError(f"decode_attention: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    elif backend == "triton" and reason is not None:
        raise RuntimeError(f"decode_attention: backend='triton' is not available: {reason}")
    if check:
        S, P = k_cache.shape[2], cos.shape[0]
        ends = [pos.reshape(-1)[:1].long()] + ([pad.min().long().reshape(1), pad.max().long().reshape(1)]
                                               if pad.numel() else [])
        p, *pad_ends = torch.cat([e.to(pos.device) for e in ends]).tolist()  # one host sync on a GPU
        if not 0 <= p < S:
            raise IndexError(f"decode_attention: pos={p} is outside the cache's [0, {S}) slots")
        if pad_ends and not (0 <= pad_ends[0] and pad_ends[1] <= S):
            raise IndexError(f"decode_attention: pad must be in [0, {S}], got {pad.tolist()}")
        rope_pos = p - (pad_ends[0] if pad_ends else 0)  # the furthest row's
        if rope_pos >= P:
            raise IndexError(f"decode_attention: RoPE position {rope_pos} is past the tables' {P} rows")
    if backend == "triton":
        return torch.ops.memllm.decode_attention(qkv, k_cache, v_cache, cos, sin, pos.reshape(1), pad, n_head)
    return reference.decode_attention(qkv, k_cache, v_cache, cos, sin, pos, pad, n_head)


# ---- fake kernels: allocation only, same layout as the real kernels (a new contiguous tensor) ----
def _no_meta_mix(op: str, *tensors) -> None:
    """Fake kernels serve the Meta key too, so a call mixing a meta tensor with real ones reaches them (not the
    CPU kernel, which checks its arguments): raise as torch's own ops do, rather than hand back an
    uninitialised tensor. Under torch.compile every argument is a FakeTensor on its own device: no effect."""
    metas = {t.device.type == "meta" for t in tensors if isinstance(t, torch.Tensor)}
    if len(metas) > 1:
        devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor)})
        raise RuntimeError(f"{op}: tensors on the meta device cannot be mixed with real ones, got {devices}")


@torch.library.register_fake("memllm::tol_gather_add")
def _tol_gather_add_fake(hidden, ids, table, layer=None, check_ids=True):
    _no_meta_mix("tol_gather_add", hidden, ids, table)
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


@torch.library.register_fake("memllm::tol_gather_add_")
def _tol_gather_add__fake(hidden, ids, table, layer=None, check_ids=True):
    _no_meta_mix("tol_gather_add_", hidden, ids, table)
    return None


# ---- autograd: d/dhidden is the identity, d/dtable scatters grad rows back onto ids ----
def _setup_context(ctx, inputs, output):
    hidden, ids, table, layer = inputs[:4]
    ctx.save_for_backward(ids)
    ctx.table_shape, ctx.table_dtype, ctx.layer = table.shape, table.dtype, layer


def _backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    grad_table = None
    if ctx.needs_input_grad[2]:
        grad_table = reference.tol_gather_add_backward_table(grad, ids, ctx.table_shape, ctx.table_dtype, ctx.layer)
    grad_hidden = grad if ctx.needs_input_grad[0] else None
    return (grad_hidden, None, grad_table) + (None,) * (len(ctx.needs_input_grad) - 3)


torch.library.register_autograd("memllm::tol_gather_add", _backward, setup_context=_setup_context)
if _HAS_TRITON:
    torch.library.register_autograd("memllm::tol_gather_add_triton", _backward, setup_context=_setup_context)
