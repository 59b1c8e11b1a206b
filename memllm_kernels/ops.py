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
import torch.autograd.forward_ad as _fwad

from . import _checks, _ext, reference

_ext.load()

BACKENDS = ("reference", "cpu", "triton", "cuda")

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


def _first_outside(idx: torch.Tensor, bound: int) -> tuple[int, int] | None:
    """(value, flat position) of the first of idx's extreme values outside [0, bound), or None. One device sync on
    GPU tensors. Meta tensors have no values to check (None)."""
    if idx.numel() == 0 or idx.is_meta:
        return None
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one host sync on a GPU
    if lo >= 0 and hi < bound:
        return None
    bad = lo if lo < 0 else hi
    return bad, int((idx.reshape(-1) == bad).nonzero()[0, 0])


def _check_id_range(op: str, ids: torch.Tensor, num_rows: int) -> None:
    """Raises IndexError naming the first id outside [0, V)."""
    _check_range(op, ids, num_rows)


def _check_range(op: str, idx: torch.Tensor, bound: int, what: str = "id") -> None:
    """IndexError naming the first of idx outside [0, bound): an id of a table of V=bound rows, or (what="row") a
    destination row of an out of bound rows."""
    found = _first_outside(idx, bound)
    if found is None:
        return
    if what == "id":
        raise IndexError(f"{op}: id {found[0]} (at flat position {found[1]} of ids) is outside [0, V) for a table "
                         f"of V={bound} rows")
    raise IndexError(f"{op}: destination row {found[0]} (at position {found[1]} of rows) is outside [0, {bound}) "
                     "rows of out")


@torch.library.custom_op("memllm::check_range", mutates_args=())
def _check_range_op(idx: torch.Tensor, bound: int, op: str, what: str) -> torch.Tensor:
    """A copy of idx [...] once all lie in [0, bound), else _check_range's IndexError (one host sync on a GPU).
    The Python backends' range check as an op for torch.compile, whose tracing cannot read the values
    (fullgraph=True failed on the Python check); the callers read the returned copy (an op's output may not
    alias its input), so the graph keeps the check."""
    _check_range(op, idx, bound, what)
    return idx.clone()


@_check_range_op.register_fake
def _(idx, bound, op, what):
    return torch.empty_like(idx)


def _checked(op: str, idx: torch.Tensor, bound: int, what: str = "id") -> torch.Tensor:
    """idx after _check_range: checked here, or in the compiled graph (memllm::check_range). Use the result."""
    if torch.compiler.is_compiling():
        return torch.ops.memllm.check_range(idx, bound, op, what)
    _check_range(op, idx, bound, what)
    return idx


def _run_compiled(op, *args, checks=None):
    """Calls a C++/CUDA op, which checks its arguments itself (an id out of range: IndexError already). On another
    error, `checks()` (the Python checks, run only then: they cost ~2.5 us per call, a third of a one-token call
    on CPU) raises the TypeError / ValueError the Python backends raise."""
    try:
        return op(*args)
    except (RuntimeError, TypeError) as e:
        error = e
    if checks is not None:
        checks()  # outside the except block, so a Python error does not chain onto the C++ one
    raise error


def _device_of(op: str, hidden) -> torch.device:
    _checks.tensor(op, "hidden", hidden)
    return hidden.device


def _no_forward_ad(op: str, backend: str, *tensors) -> None:
    """torch gives a custom op no forward derivative (register_autograd registers a backward only): under
    torch.func.jvp / jacfwd or with forward_ad dual tensors the compiled backends' outputs came back with a zero
    tangent, without a word. Raise instead. Two global checks first (0.1 us), the tensors' tangents only when
    forward AD is on."""
    if torch.compiler.is_compiling() or (_fwad._current_level < 0
                                         and torch._C._functorch.peek_interpreter_stack() is None):
        return
    if any(isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{op}: forward-mode AD (torch.func.jvp, jacfwd, forward_ad dual tensors) is not "
                                  f"supported by backend {backend!r} (torch gives custom ops no forward derivative: "
                                  "the tangent would be zero); use backend='reference', or reverse mode")


class _ReferenceGatherAdd(torch.autograd.Function):
    """backend='reference' with gradients: the reference forward, and the ops' own backward (repeated ids
    accumulate in float32). Differentiating through the reference's casts rounded each row's gradient to the
    table's dtype before the sum, so the oracle's gradient differed from the kernels' and the README's."""

    @staticmethod
    def forward(hidden, ids, table, layer):
        return reference.tol_gather_add(hidden, ids, table, layer)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)[:4]


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
    if check_ids is not True and check_ids is not False:  # 'no' failed in pybind, None read as False
        _checks.flag("tol_gather_add", "check_ids", check_ids)
    if backend != "reference":
        _no_forward_ad("tol_gather_add", backend, hidden, table)
    if backend in ("cpu", "cuda"):
        args = (hidden, ids, table, layer, check_ids)
        checks = lambda: _checks.gather_add("tol_gather_add", hidden, ids, table, layer)  # noqa: E731
        if layer is not None and _checks.bad_integer(layer):
            checks()
        if not torch.compiler.is_compiling() and isinstance(table, torch.Tensor) and not (
                torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad)):
            # The op's autograd kernel is Python (register_autograd) and costs about 4 us per call even
            # when no gradient is wanted (8 -> 4 us for one token on CPU): go straight to the kernel.
            with torch._C._AutoDispatchBelowAutograd():
                return _run_compiled(torch.ops.memllm.tol_gather_add, *args, checks=checks)
        return _run_compiled(torch.ops.memllm.tol_gather_add, *args, checks=checks)
    _checks.gather_add("tol_gather_add", hidden, ids, table, layer)
    if check_ids:
        ids = _checked("tol_gather_add", ids, table.shape[0])
    if backend == "triton":
        return torch.ops.memllm.tol_gather_add_triton(hidden, ids, table, layer)
    if torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad):
        return _ReferenceGatherAdd.apply(hidden, ids, table, layer)
    return reference.tol_gather_add(hidden, ids, table, layer)


def tol_gather_add_(hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, layer: int | None = None,
                    *, backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """In-place tol_gather_add: hidden += table[ids] (or table[ids, layer]); returns hidden.

    Shapes and arguments as in tol_gather_add. For inference: no autograd (use tol_gather_add to train).
    A bad id raises before anything is written (with check_ids=True).
    """
    backend = _pick_backend(backend, _device_of("tol_gather_add_", hidden))
    if check_ids is not True and check_ids is not False:
        _checks.flag("tol_gather_add_", "check_ids", check_ids)
    if backend != "reference":
        _no_forward_ad("tol_gather_add_", backend, hidden, table)
    _checks.no_grad("tol_gather_add_", "use tol_gather_add (out of place) when gradients are needed, or run under "
                    "torch.no_grad()", hidden=hidden, table=table)
    _checks.writable("tol_gather_add_", hidden=hidden)
    if backend in ("cpu", "cuda"):
        if layer is not None and _checks.bad_integer(layer):
            _checks.gather_add("tol_gather_add_", hidden, ids, table, layer)
        _run_compiled(torch.ops.memllm.tol_gather_add_, hidden, ids, table, layer, check_ids,
                      checks=lambda: _checks.gather_add("tol_gather_add_", hidden, ids, table, layer))
        return hidden
    _checks.gather_add("tol_gather_add_", hidden, ids, table, layer)
    _checks.no_overlap("tol_gather_add_", "hidden", hidden)
    _checks.not_aliased("tol_gather_add_", hidden, ids, table)
    if check_ids:
        ids = _checked("tol_gather_add_", ids, table.shape[0])
    if backend == "triton":
        torch.ops.memllm.tol_gather_add_triton_(hidden, ids, table, layer)
    else:
        hidden.copy_(reference.tol_gather_add(hidden, ids, table, layer))
    return hidden


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
    _checks.decode_attention("decode_attention", qkv, k_cache, v_cache, cos, sin, pos, pad, n_head)
    # Every backend alike (the reference would record a gradient the kernel has not got).
    _checks.no_grad("decode_attention", _checks.DECODE_NO_GRAD_HINT, qkv=qkv, k_cache=k_cache, v_cache=v_cache,
                    cos=cos, sin=sin)
    # Both caches are written in place: each must own its elements (an expand()ed cache made the batch rows race
    # on one slot) and they must not overlap (k_cache is v_cache: the backends disagreed). The caches alone, not
    # every input: this runs per layer of an eager decode step.
    _checks.outputs_apart("decode_attention", {"k_cache": k_cache, "v_cache": v_cache}, {})
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
    if check and not pos.is_meta:  # (meta tensors have no values to check)
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


# The fake kernels check shapes and dtypes as the C++ ops do (RAW errors): on meta tensors, and while torch.compile
# traces, they are the only kernels that run (a d that did not match the table's gave a tensor back).
@torch.library.register_fake("memllm::tol_gather_add")
def _tol_gather_add_fake(hidden, ids, table, layer=None, check_ids=True):
    _no_meta_mix("tol_gather_add", hidden, ids, table)
    _checks.gather_add("tol_gather_add", hidden, ids, table, layer, _checks.RAW)
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


@torch.library.register_fake("memllm::tol_gather_add_")
def _tol_gather_add__fake(hidden, ids, table, layer=None, check_ids=True):
    _no_meta_mix("tol_gather_add_", hidden, ids, table)
    _checks.gather_add("tol_gather_add_", hidden, ids, table, layer, _checks.RAW)
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
