"""Argument checks of every op, made before anything launches: one set of rules for the public wrappers
(memllm_kernels.ops, memllm_kernels.offload.ops) and the raw Triton ops (torch.ops.memllm.*_triton,
memllm::decode_attention), which differ only in the exceptions they raise.

Why the raw ops check too: the kernels index with the sizes and strides they are handed, so a call straight to
torch.ops.memllm.tol_gather_add_triton with a layer past the table or ids shorter than hidden read or wrote
outside a tensor (a segfault under TRITON_INTERPRET=1, an illegal memory access on a GPU, or silent garbage).

Exceptions: TypeError for a non-tensor or a dtype, RuntimeError for a device or memory that is shared; for a
shape and a layer out of range, `err` picks PUBLIC (ValueError, IndexError: what the wrappers raise on every
backend) or RAW (RuntimeError for both, as the C++ kernels' check_*_args in csrc/). Only metadata is read
(shapes, strides, dtypes, devices: what fake tensors have, so the checks run under torch.compile, guarding on
symbolic sizes) and nothing waits on the device. The id range is data: checked by the wrappers (check_ids), and a
kernel never reads outside a table for a bad id anyway (it writes a NaN row).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_NAMES = "float32, float16, bfloat16 or float64"
INDEX = (torch.int32, torch.int64)


class Raise(NamedTuple):
    shape: type[Exception]  # a shape, rank or stride the kernel cannot take
    index: type[Exception]  # a layer outside the table


PUBLIC = Raise(ValueError, IndexError)
RAW = Raise(RuntimeError, RuntimeError)


def tensor(op: str, name: str, t, dtypes=None, what: str | None = None) -> None:
    """t is a tensor (of one of `dtypes`, named `what` in the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {what}, got {t.dtype}")


def float_tensor(op: str, name: str, t) -> None:
    tensor(op, name, t, FLOATS, _FLOAT_NAMES)


def index_tensor(op: str, name: str, t) -> None:
    tensor(op, name, t, INDEX, "int32 or int64")


def bad_integer(v) -> bool:
    """Not an integer (an index: int, SymInt, a numpy int; not bool, and not a tensor, whose __index__ made
    torch.tensor(1.9) read as layer 1). The C++ ops take True as 1 and fail on 1.5 with a pybind cast error, so
    the compiled paths check this before calling them too."""
    return isinstance(v, (bool, torch.Tensor)) or not hasattr(type(v), "__index__")


def int_at_least(name: str, v, minimum: int, note: str = "") -> int:
    """An integer option of the Python API (an int or numpy integer, not bool) >= minimum, as an int: TypeError or
    ValueError naming it (a float or a negative size otherwise failed later, or read as a truncated file)."""
    if bad_integer(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}{note}, got {v}")
    return int(v)


def gather_add(op: str, hidden, ids, table, layer, err: Raise = PUBLIC) -> None:
    """hidden [..., d], ids hidden's leading shape, table [V, d] (layer None) or [V, L, d] (0 <= layer < L, an
    int), all on one device, table's rows contiguous: check_tol_gather_add_args."""
    float_tensor(op, "hidden", hidden)
    float_tensor(op, "table", table)
    index_tensor(op, "ids", ids)
    if hidden.dim() < 1:
        raise err.shape(f"{op}: hidden must have shape [..., d], got a 0-d tensor")
    if ids.shape != hidden.shape[:-1]:  # the kernel reads one id per row of hidden
        raise err.shape(f"{op}: ids must have hidden's leading shape {list(hidden.shape[:-1])}, got {list(ids.shape)}")
    if table.dim() not in (2, 3):
        raise err.shape(f"{op}: table must be [V, d] or token-major [V, L, d], got shape {list(table.shape)}")
    if table.shape[-1] != hidden.shape[-1]:
        raise err.shape(f"{op}: table rows have d={table.shape[-1]} but hidden has d={hidden.shape[-1]}")
    if not hidden.device == ids.device == table.device:
        raise RuntimeError(f"{op}: hidden, ids and table must be on one device, got {hidden.device}, {ids.device} "
                           f"and {table.device}")
    if table.shape[-1] > 1 and table.stride(-1) != 1:  # the kernel steps along a row by 1
        raise err.shape(f"{op}: table's last dim must be contiguous (stride 1), got strides {table.stride()}; "
                        "pass table.contiguous() if a copy of the table is acceptable")
    if layer is not None and bad_integer(layer):
        raise TypeError(f"{op}: layer must be an int or None, got {type(layer).__name__} {layer!r}")
    if table.dim() == 3:
        if layer is None:
            raise err.shape(f"{op}: a token-major [V, L, d] table needs layer=, with L={table.shape[1]}")
        if not 0 <= layer < table.shape[1]:
            raise err.index(f"{op}: layer={layer} is outside the table's [0, {table.shape[1]}) layers")
    elif layer is not None:
        raise err.shape(f"{op}: layer={layer} was given for a [V, d] table; pass a [V, L, d] table or layer=None")


def token_table(op: str, name: str, t, err: Raise = PUBLIC) -> None:
    """[V, d] or [V, L, d] with each token's row dense ([L, d] contiguous): the kernels copy a row as one run."""
    float_tensor(op, name, t)
    if t.dim() not in (2, 3):
        raise err.shape(f"{op}: {name} must be [V, d] or token-major [V, L, d], got shape {list(t.shape)}")
    dense = (t.shape[-1] <= 1 or t.stride(-1) == 1) and (t.dim() == 2 or t.shape[1] <= 1 or t.stride(1) == t.shape[2])
    if not dense:
        raise err.shape(f"{op}: {name}'s token rows must be dense ([L, d] contiguous), got strides {t.stride()}; "
                        "pass a .contiguous() table")


def same_rows(op: str, names, tables, err: Raise = PUBLIC) -> None:
    """Every table has the first one's dtype and row shape (tables[i].shape[1:])."""
    ref_name, ref = names[0], tables[0]
    for name, t in zip(names[1:], tables[1:]):
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
        if t.dim() != ref.dim() or t.shape[1:] != ref.shape[1:]:
            raise err.shape(f"{op}: the rows of {name} must have {ref_name}'s row shape {list(ref.shape[1:])}, "
                            f"got {name} {list(t.shape)}")


def host_or(op: str, name: str, t, device: torch.device) -> None:
    """A host table: on the kernel's device, or in host memory a GPU kernel can read (page-locked and mapped: the
    pinned host tier; the C++ kernels make the same check). A GPU kernel handed pageable memory would read it by
    an address that is invalid on the device: an illegal memory access. Not while a CUDA graph is captured (the
    lookup is a CUDA call that capture may refuse; the warm-up call before a capture made the check)."""
    if t.device != device and t.device.type != "cpu":
        raise RuntimeError(f"{op}: {name} must be on {device} or in host memory, got {t.device}")
    if (device.type == "cuda" and t.device.type == "cpu" and t.numel() and not is_fake(t)
            and not torch.cuda.is_current_stream_capturing() and not torch.ops.memllm.tol_host_mapped(t)):
        raise RuntimeError(f"{op}: {name} is in pageable host memory, which a GPU kernel cannot read; use the "
                           f"pinned host tier (memllm_kernels.offload.HostTable) or pass a tensor on {device}")


def slot_map(op: str, t, num_rows, device: torch.device, err: Raise = PUBLIC) -> None:
    """[V] int32 on the kernel's device: the kernel reads slot_map[id] for ids in [0, V)."""
    tensor(op, "slot_map", t, (torch.int32,), "int32")
    if t.dim() != 1 or t.shape[0] != num_rows:
        raise err.shape(f"{op}: slot_map must be [V] with V={num_rows} (host_table's rows), got shape "
                        f"{list(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"{op}: slot_map must be on the op's device {device}, got {t.device}")


def cached_gather_add(op: str, hidden, ids, slot_map_, cache, host_table, layer, err: Raise = PUBLIC) -> None:
    """gather_add's checks of (hidden, ids, cache, layer), then host_table (cache's dtype and row shape, on
    hidden's device or in host memory) and slot_map: check_cached_gather_add_args."""
    gather_add(op, hidden, ids, cache, layer, err)
    token_table(op, "host_table", host_table, err)
    same_rows(op, ["cache", "host_table"], [cache, host_table], err)
    host_or(op, "host_table", host_table, hidden.device)
    slot_map(op, slot_map_, host_table.shape[0], hidden.device, err)


def rows_and_ids(op: str, src_name: str, src, dst_name: str, dst, ids, err: Raise = PUBLIC) -> None:
    """A source and a destination token-row table with the same dtype and row shape, and 1-D int ids [N]."""
    token_table(op, src_name, src, err)
    tensor(op, dst_name, dst)
    same_rows(op, [src_name, dst_name], [src, dst], err)
    token_table(op, dst_name, dst, err)
    index_tensor(op, "ids", ids)
    if ids.dim() != 1:
        raise err.shape(f"{op}: ids must be 1-D [N], got shape {list(ids.shape)}")


def host_gather(op: str, table, ids, out, rows, err: Raise = PUBLIC) -> None:
    """table and out token-row tables of one dtype and row shape, ids [N], rows [N] or out of >= N rows; ids, rows
    and out on one device, table there or in host memory: check_host_gather_args and the CUDA op's device checks."""
    rows_and_ids(op, "table", table, "out", out, ids, err)
    if rows is not None:
        index_tensor(op, "rows", rows)
        if rows.shape != ids.shape:
            raise err.shape(f"{op}: rows must be [N] like ids ({ids.shape[0]}), got shape {list(rows.shape)}")
    elif out.shape[0] < ids.shape[0]:
        raise err.shape(f"{op}: out has {out.shape[0]} rows for {ids.shape[0]} ids; pass rows= or a bigger out")
    if ids.device != out.device or (rows is not None and rows.device != out.device):
        raise RuntimeError(f"{op}: ids and rows must be on out's device {out.device}, got {ids.device} and "
                           f"{None if rows is None else rows.device}")
    host_or(op, "table", table, out.device)


def decode_attention(op: str, qkv, k_cache, v_cache, cos, sin, pos, pad, n_head, err: Raise = PUBLIC) -> None:
    """The shapes the kernel indexes by. pos and pad are data: the wrapper checks their range (check=True); a
    slot outside the cache or past the RoPE tables makes the kernel write nothing and return NaN."""
    for name, t in (("qkv", qkv), ("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos), ("sin", sin),
                    ("pos", pos), ("pad", pad)):
        tensor(op, name, t)
    if qkv.dtype not in FLOATS:
        raise TypeError(f"{op}: qkv must be {_FLOAT_NAMES}, got {qkv.dtype}")
    if k_cache.dtype not in FLOATS or v_cache.dtype != k_cache.dtype:  # qkv's, or not (autocast)
        raise TypeError(f"{op}: k_cache and v_cache must share one float dtype, got {k_cache.dtype}, {v_cache.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"{op}: cos and sin must be float32 tables, got {cos.dtype}, {sin.dtype}")
    if pos.dtype not in INDEX or pad.dtype not in INDEX:
        raise TypeError(f"{op}: pos and pad must be int32 or int64, got {pos.dtype}, {pad.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise err.shape(f"{op}: k_cache and v_cache must both be [B, Hkv, S, hd], got {list(k_cache.shape)} and "
                        f"{list(v_cache.shape)}")
    B, Hkv, _, hd = k_cache.shape
    if hd % 2:
        raise err.shape(f"{op}: RoPE needs an even head_dim, got {hd}")
    if bad_integer(n_head) or Hkv < 1 or n_head < 1 or n_head % Hkv:
        raise err.shape(f"{op}: n_head={n_head} must be a positive multiple of the caches' {Hkv} key/value heads")
    if qkv.shape != (B, (n_head + 2 * Hkv) * hd):
        raise err.shape(f"{op}: qkv must be [B, (n_head + 2 Hkv) hd] = [{B}, {(n_head + 2 * Hkv) * hd}], got "
                        f"{list(qkv.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != hd // 2:
        raise err.shape(f"{op}: cos and sin must be [P, hd/2] = [P, {hd // 2}], got {list(cos.shape)}, "
                        f"{list(sin.shape)}")
    if pos.numel() != 1 or pad.shape != (B,):
        raise err.shape(f"{op}: pos must hold one slot and pad be [B] = [{B}], got {list(pos.shape)}, "
                        f"{list(pad.shape)}")
    devices = {t.device for t in (qkv, k_cache, v_cache, cos, sin, pos, pad)}
    if len(devices) != 1:
        raise RuntimeError(f"{op}: every tensor must be on one device, got {sorted(map(str, devices))}")
    # The kernel steps by 1 along qkv's rows, the caches' and the tables' last dims and pad, and reads v_cache
    # with k_cache's strides.
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() \
            or not (cos.is_contiguous() and sin.is_contiguous() and pad.is_contiguous()):
        raise err.shape(f"{op}: qkv's rows, the caches (alike) and cos, sin, pad must be contiguous in their "
                        "last dim")


def no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """An output written in place must not have elements sharing memory (an expand()ed tensor): programs writing
    one element would race. ATen's has_internal_overlap test, which the C++ in-place ops make: a dimension of size
    > 1 with stride 0."""
    if any(n > 1 and s == 0 for n, s in zip(t.shape, t.stride())):
        raise RuntimeError(f"{op}: {name} has elements that share memory (shape {list(t.shape)}, strides "
                           f"{list(t.stride())}), so it cannot be written in place; pass {name}.clone()")


NO_GRAD_HINT = "run it under torch.no_grad(), or use the out-of-place op where there is one"
DECODE_NO_GRAD_HINT = ("it is for inference: run it under torch.no_grad() or torch.inference_mode() (a model "
                       "with decode_attention='auto' attends through SDPA while grad mode is on)")


def no_grad(op: str, hint: str = NO_GRAD_HINT, **tensors) -> None:
    """An op that writes in place has no derivative: while grad mode is on, no tensor it is handed may require grad
    (its gradient would be silently wrong). The C++ ops make the same check in their Autograd kernel (csrc/ops.cpp,
    with NO_GRAD_HINT)."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"{op}: {name} requires grad, but this op writes in place and has no autograd; "
                                   f"{hint}")


def writable(op: str, **tensors) -> None:
    """A tensor made under torch.inference_mode() may be written only inside inference mode, as torch's own in-place
    ops enforce; our kernels would write it anyway (the C++ ops make the same check: check_writable in
    csrc/tol_gather_add.h). Not while torch.compile traces: Dynamo cannot trace Tensor.is_inference(), so that is
    asked first; the inference mode is asked only about an inference tensor (cheaper on every call)."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{op}: {name} is an inference tensor (made under torch.inference_mode()), which "
                               "cannot be updated in place outside inference mode; call this under "
                               "torch.inference_mode(), or pass a clone")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The first and last byte t's elements span (torch strides are never negative)."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size() - 1


# functorch's wrappers (torch.func.jvp, vmap) have no memory of their own: "Cannot access data pointer of Tensor that
# doesn't have storage" from the overlap checks. About 0.1 us a call.
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _no_address(t: torch.Tensor) -> bool:
    """Fake tensors (torch.compile's tracing) and functorch's wrappers have no addresses to compare."""
    return is_fake(t) or _wrapped(t)


def not_aliased(op: str, hidden: torch.Tensor, *reads: torch.Tensor) -> None:
    """hidden, written in place, must not share memory with ids or a table the kernel reads: a hidden that is a view
    of its own table would read rows other programs already overwrote. By byte span, as the C++ in-place ops
    (run_in_place; ATen's own overlap test gives up on strided views such as table[:T, l]). Fake and meta tensors
    have no addresses to compare: skipped, so a call traced by torch.compile goes without this check."""
    if torch.compiler.is_compiling() or hidden.numel() == 0 or hidden.device.type == "meta" or _no_address(hidden):
        return
    h0, h1 = _byte_span(hidden)
    for t in reads:
        if t.numel() and t.device == hidden.device and not _no_address(t):
            t0, t1 = _byte_span(t)
            if not (h1 < t0 or t1 < h0):
                raise RuntimeError(f"{op}: hidden shares memory with ids or a table it reads (a view of its own "
                                   "table?); pass hidden.clone()")


def outputs_apart(op: str, writes: dict, reads: dict, err: Raise = PUBLIC) -> None:
    """The tensors an op writes ({name: tensor}) must each own their elements (an expand()ed out: programs writing
    one element race) and share no memory with one another (first given as slots) or with a tensor the op reads
    (reads: {name: tensor or None}; out given as its own table: the backends read rows already overwritten, each
    at another time, and disagreed). By byte span, as not_aliased; fake and meta tensors have no addresses, so a
    call traced by torch.compile gets the first check only. err.shape: ValueError from the public wrappers,
    RuntimeError from the raw ops. 1.5 us for 3 plain contiguous tensors, 3.5 for 7 (is_fake and a strided
    span, which they skip, cost 1 us each)."""
    writable(op, **writes)
    for name, t in writes.items():
        if not t.is_contiguous() and any(n > 1 and s == 0 for n, s in zip(t.shape, t.stride())):
            raise err.shape(f"{op}: {name} has elements that share memory (shape {list(t.shape)}, strides "
                            f"{list(t.stride())}: an expand()ed tensor?), so it cannot be written; pass a tensor "
                            "whose elements are its own")
    if torch.compiler.is_compiling():
        return
    spans = []
    for tensors in (writes, reads):
        for name, t in tensors.items():
            if t is None or t.is_meta or (type(t) is not torch.Tensor and is_fake(t)) or _wrapped(t):
                continue
            lo = t.data_ptr()
            lo, hi = (lo, lo + t.nbytes - 1) if t.is_contiguous() else _byte_span(t)
            if hi >= lo:  # not empty (an empty tensor is contiguous, with no bytes)
                spans.append((name, t, lo, hi))
    for i, (a, ta, a0, a1) in enumerate(spans):
        if a not in writes:  # the writes come first: what is left are reads, which may share memory
            return
        for b, tb, b0, b1 in spans[i + 1:]:
            if a0 <= b1 and b0 <= a1 and ta.device == tb.device:  # (t.device costs 0.4 us: only on an overlap)
                raise err.shape(f"{op}: {a} shares memory with {b} ({'another output' if b in writes else 'an input'}"
                                f"); an output must not overlap an input or another output: pass tensors of their own")


def flag(op: str, name: str, v) -> None:
    """A bool option (check_ids): True or False. The C++ ops refused 'no' with a pybind cast error and took None as
    False, as did the Python paths, silently."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {type(v).__name__} {v!r}")


def int_arg(op: str, name: str, v, optional: bool = False) -> None:
    """An integer argument of an op (optional: or None), by bad_integer: TypeError naming it (the C++ ops refused
    1.0 with a pybind cast error, and a tensor's __index__ made torch.tensor(2.5) read as 2)."""
    if (v is not None or not optional) and bad_integer(v):
        raise TypeError(f"{op}: {name} must be an int{' or None' if optional else ''}, got {type(v).__name__} {v!r}")
