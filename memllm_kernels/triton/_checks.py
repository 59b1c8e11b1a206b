"""Argument checks of the raw Triton ops, run in each op's body before it launches anything.

Why: the kernels index with the sizes and strides they are handed, so a call straight to torch.ops.memllm.*_triton
(or memllm::decode_attention) with a layer past the table, a row shape unlike the table's or ids shorter than
hidden read or wrote outside a tensor: a segfault or a corrupt heap under TRITON_INTERPRET=1, an illegal memory
access on a GPU, or silent garbage. The public wrappers (memllm_kernels.ops, memllm_kernels.offload.ops) check
first and raise ValueError / IndexError; these are the C++ kernels' checks (check_tol_gather_add_args,
check_cached_gather_add_args and check_host_gather_args in csrc/), raising as they do: TypeError for a dtype,
RuntimeError for the rest. Only metadata is read (shapes, strides, dtypes, devices: what fake tensors have, so the
checks run under torch.compile, guarding on symbolic sizes) and nothing waits on the device. The id range is data:
the caller's (check_ids), and a kernel never reads outside a table for a bad id anyway (it writes a NaN row).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX = (torch.int32, torch.int64)


def _dtype(op: str, name: str, t: torch.Tensor, dtypes=_FLOATS, what="float32, float16, bfloat16 or float64"):
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {what}, got {t.dtype}")


def _index(op: str, name: str, t: torch.Tensor) -> None:
    _dtype(op, name, t, _INDEX, "int32 or int64")


def gather_add(op: str, hidden, ids, table, layer) -> None:
    """hidden [..., d], ids hidden's leading shape, table [V, d] (layer None) or [V, L, d] (0 <= layer < L),
    all on one device: check_tol_gather_add_args."""
    _dtype(op, "hidden", hidden)
    _dtype(op, "table", table)
    _index(op, "ids", ids)
    if hidden.dim() < 1:
        raise RuntimeError(f"{op}: hidden must have shape [..., d], got a 0-d tensor")
    if ids.shape != hidden.shape[:-1]:  # the kernel reads one id per row of hidden
        raise RuntimeError(f"{op}: ids must have hidden's leading shape {list(hidden.shape[:-1])}, "
                           f"got {list(ids.shape)}")
    if table.dim() not in (2, 3):
        raise RuntimeError(f"{op}: table must be [V, d] or token-major [V, L, d], got shape {list(table.shape)}")
    if table.shape[-1] != hidden.shape[-1]:
        raise RuntimeError(f"{op}: table rows have d={table.shape[-1]} but hidden has d={hidden.shape[-1]}")
    if not hidden.device == ids.device == table.device:
        raise RuntimeError(f"{op}: hidden, ids and table must be on one device, got {hidden.device}, {ids.device} "
                           f"and {table.device}")
    if table.shape[-1] > 1 and table.stride(-1) != 1:  # the kernel steps along a row by 1
        raise RuntimeError(f"{op}: table's last dim must be contiguous (stride 1), got strides {table.stride()}; "
                           "pass table.contiguous() if a copy of the table is acceptable")
    if table.dim() == 3:
        if layer is None:
            raise RuntimeError(f"{op}: a token-major [V, L, d] table needs layer=, with L={table.shape[1]}")
        if not 0 <= layer < table.shape[1]:
            raise RuntimeError(f"{op}: layer={layer} is outside the table's [0, {table.shape[1]}) layers")
    elif layer is not None:
        raise RuntimeError(f"{op}: layer={layer} was given for a [V, d] table; pass a [V, L, d] table or layer=None")


def no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """An output written in place must not have elements sharing memory (ATen's assert_no_internal_overlap, as
    the C++ in-place ops): programs writing one element would race."""
    if any(n > 1 and s == 0 for n, s in zip(t.shape, t.stride())):
        raise RuntimeError(f"{op}: {name} has elements that share memory (shape {list(t.shape)}, strides "
                           f"{list(t.stride())}), so it cannot be written in place; pass {name}.clone()")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The first and last byte t's elements span (torch strides are never negative)."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size() - 1


def not_aliased(op: str, hidden: torch.Tensor, *reads: torch.Tensor) -> None:
    """hidden, written in place, must not share memory with ids or a table the kernel reads: a hidden that is a view
    of its own table would read rows other programs already overwrote. By byte span, as the C++ in-place ops
    (run_in_place). Fake and meta tensors have no addresses to compare: skipped, so a call traced by torch.compile
    goes without this check (as memllm_kernels.ops's own one does)."""
    if hidden.numel() == 0 or hidden.device.type == "meta" or is_fake(hidden):
        return
    h0, h1 = _byte_span(hidden)
    for t in reads:
        if t.numel() and t.device == hidden.device and not is_fake(t):
            t0, t1 = _byte_span(t)
            if not (h1 < t0 or t1 < h0):
                raise RuntimeError(f"{op}: hidden shares memory with ids or a table it reads (a view of its own "
                                   "table?); pass hidden.clone()")


def _token_table(op: str, name: str, t: torch.Tensor) -> None:
    """[V, d] or [V, L, d] with each token's row dense ([L, d] contiguous): the kernels copy a row as one run."""
    _dtype(op, name, t)
    if t.dim() not in (2, 3):
        raise RuntimeError(f"{op}: {name} must be [V, d] or token-major [V, L, d], got shape {list(t.shape)}")
    dense = (t.shape[-1] <= 1 or t.stride(-1) == 1) and (t.dim() == 2 or t.shape[1] <= 1 or t.stride(1) == t.shape[2])
    if not dense:
        raise RuntimeError(f"{op}: {name}'s token rows must be dense ([L, d] contiguous), got strides {t.stride()}; "
                           "pass a .contiguous() table")


def _host_or(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    """A host table: on the kernel's device, or in (mapped) host memory."""
    if t.device != device and t.device.type != "cpu":
        raise RuntimeError(f"{op}: {name} must be on {device} or in host memory, got {t.device}")


def cached_gather_add(op: str, hidden, ids, slot_map, cache, host_table, layer) -> None:
    """gather_add's checks of (hidden, ids, cache, layer), then host_table (cache's dtype and row shape) and
    slot_map ([V] int32 on hidden's device): check_cached_gather_add_args."""
    gather_add(op, hidden, ids, cache, layer)
    _host_or(op, "host_table", host_table, hidden.device)
    _token_table(op, "host_table", host_table)
    if host_table.dtype != cache.dtype:
        raise TypeError(f"{op}: host_table must have cache's dtype {cache.dtype}, got {host_table.dtype}")
    if host_table.dim() != cache.dim() or host_table.shape[1:] != cache.shape[1:]:
        raise RuntimeError(f"{op}: host_table rows must have cache's row shape {list(cache.shape[1:])}, got "
                           f"host_table {list(host_table.shape)}")
    _dtype(op, "slot_map", slot_map, (torch.int32,), "int32")
    if slot_map.dim() != 1 or slot_map.shape[0] != host_table.shape[0]:  # the kernel reads slot_map[id], id < V
        raise RuntimeError(f"{op}: slot_map must be [V] with V={host_table.shape[0]} (host_table's rows), got shape "
                           f"{list(slot_map.shape)}")
    if slot_map.device != hidden.device:
        raise RuntimeError(f"{op}: slot_map must be on hidden's device {hidden.device}, got {slot_map.device}")


def host_gather(op: str, table, ids, out, rows) -> None:
    """table and out token-row tables of one dtype and row shape, ids [N], rows [N] or out of >= N rows; ids, rows
    and out on one device, table there or in host memory: check_host_gather_args and the CUDA op's device checks."""
    _token_table(op, "table", table)
    _token_table(op, "out", out)
    _index(op, "ids", ids)
    if out.dtype != table.dtype:
        raise TypeError(f"{op}: out must have table's dtype {table.dtype}, got {out.dtype} (a pure copy)")
    if ids.dim() != 1:
        raise RuntimeError(f"{op}: ids must be 1-D [N], got shape {list(ids.shape)}")
    if out.dim() != table.dim() or out.shape[1:] != table.shape[1:]:
        raise RuntimeError(f"{op}: out rows must have table's row shape {list(table.shape[1:])}, got out "
                           f"{list(out.shape)}")
    if rows is not None:
        _index(op, "rows", rows)
        if rows.dim() != 1 or rows.shape[0] != ids.shape[0]:
            raise RuntimeError(f"{op}: rows must be [N] like ids ({ids.shape[0]}), got shape {list(rows.shape)}")
    elif out.shape[0] < ids.shape[0]:
        raise RuntimeError(f"{op}: out has {out.shape[0]} rows for {ids.shape[0]} ids; pass rows= or a bigger out")
    if ids.device != out.device or (rows is not None and rows.device != out.device):
        raise RuntimeError(f"{op}: ids and rows must be on out's device {out.device}, got {ids.device} and "
                           f"{None if rows is None else rows.device}")
    _host_or(op, "table", table, out.device)


def decode_attention(op: str, qkv, k_cache, v_cache, cos, sin, pos, pad, n_head: int) -> None:
    """The shapes the kernel indexes by (memllm_kernels.ops._check_decode_attention's, raising RuntimeError and
    TypeError like the C++ ops). pos and pad are data: a slot outside the cache or past the RoPE tables makes
    the kernel write nothing and return NaN."""
    if qkv.dtype not in _FLOATS:
        raise TypeError(f"{op}: qkv must be float32, float16, bfloat16 or float64, got {qkv.dtype}")
    if k_cache.dtype not in _FLOATS or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{op}: k_cache and v_cache must share one float dtype, got {k_cache.dtype}, {v_cache.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"{op}: cos and sin must be float32 tables, got {cos.dtype}, {sin.dtype}")
    if pos.dtype not in _INDEX or pad.dtype not in _INDEX:
        raise TypeError(f"{op}: pos and pad must be int32 or int64, got {pos.dtype}, {pad.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise RuntimeError(f"{op}: k_cache and v_cache must both be [B, Hkv, S, hd], got {list(k_cache.shape)} and "
                           f"{list(v_cache.shape)}")
    B, Hkv, _, hd = k_cache.shape
    if hd % 2:
        raise RuntimeError(f"{op}: RoPE needs an even head_dim, got {hd}")
    if Hkv < 1 or n_head < 1 or n_head % Hkv:
        raise RuntimeError(f"{op}: n_head={n_head} must be a positive multiple of the caches' {Hkv} key/value heads")
    if qkv.shape != (B, (n_head + 2 * Hkv) * hd):
        raise RuntimeError(f"{op}: qkv must be [B, (n_head + 2 Hkv) hd] = [{B}, {(n_head + 2 * Hkv) * hd}], got "
                           f"{list(qkv.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != hd // 2:
        raise RuntimeError(f"{op}: cos and sin must be [P, hd/2] = [P, {hd // 2}], got {list(cos.shape)}, "
                           f"{list(sin.shape)}")
    if pos.numel() != 1 or pad.shape != (B,):
        raise RuntimeError(f"{op}: pos must hold one slot and pad be [B] = [{B}], got {list(pos.shape)}, "
                           f"{list(pad.shape)}")
    devices = {t.device for t in (qkv, k_cache, v_cache, cos, sin, pos, pad)}
    if len(devices) != 1:
        raise RuntimeError(f"{op}: every tensor must be on one device, got {sorted(map(str, devices))}")
    # The kernel steps by 1 along qkv's rows, the caches' and the tables' last dims and pad, and reads v_cache
    # with k_cache's strides.
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() \
            or not (cos.is_contiguous() and sin.is_contiguous() and pad.is_contiguous()):
        raise RuntimeError(f"{op}: qkv's rows, the caches (alike) and cos, sin, pad must be contiguous in their "
                           "last dim")
