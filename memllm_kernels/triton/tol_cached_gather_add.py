"""Triton kernel of the cached gather-add: out[t] = hidden[t] + row(ids[t], layer), the row read from the
device cache slot slot_map[id] on a hit, from the host table (mapped host memory on a GPU) on a miss.

Registered as memllm::tol_cached_gather_add_triton (functional) and _triton_ (in place). The hit/miss
choice is two masked loads and a select: a masked-off lane issues no memory request, so each token reads
exactly one of the two rows. Arithmetic as tol_gather_add (float32 sum, one rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _checks
from .tol_gather_add import _fake_run, _on, _rows, _tiles, to_acc, to_out_dtype


@triton.jit
def tol_cached_gather_add_kernel(
    out_ptr, hidden_ptr, ids_ptr, slot_map_ptr, cache_ptr, host_ptr,
    T, d, out_rs, hidden_rs, cache_rs, host_rs, cache_layer_offset, host_layer_offset, num_slots, num_rows,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    id_ok = (ids >= 0) & (ids < num_rows)
    slot = tl.load(slot_map_ptr + ids, mask=row_ok & id_ok, other=-1).to(tl.int64)
    hit = id_ok & (slot >= 0) & (slot < num_slots)
    miss = id_ok & ~hit
    mask = row_ok[:, None] & (cols < d)[None, :]
    acc = tl.float64 if FP64 else tl.float32
    h = to_acc(tl.load(hidden_ptr + rows[:, None] * hidden_rs + cols[None, :], mask=mask), acc)
    rc = to_acc(tl.load(cache_ptr + slot[:, None] * cache_rs + cache_layer_offset + cols[None, :],
                        mask=mask & hit[:, None], other=0.0), acc)
    rh = to_acc(tl.load(host_ptr + ids[:, None] * host_rs + host_layer_offset + cols[None, :],
                        mask=mask & miss[:, None], other=0.0), acc)
    r = tl.where(hit[:, None], rc, rh)
    r = tl.where(id_ok[:, None], r, float("nan"))
    out = to_out_dtype(h + r, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * out_rs + cols[None, :], out, mask=mask)


def _launch(out, hidden, ids, slot_map, cache, host_table, layer):
    """out, hidden: [T, d] with unit column stride; ids [T] contiguous."""
    T, d = hidden.shape
    if T == 0 or d == 0 or _fake_run(out):
        return
    block_t, block_d, grid, warps = _tiles(T, d)
    coff = 0 if layer is None else layer * cache.stride(1)
    hoff = 0 if layer is None else layer * host_table.stride(1)
    with _on(out):
        wrap_triton(tol_cached_gather_add_kernel)[grid](
            out, hidden, ids, slot_map.contiguous(), cache, host_table,
            T, d, out.stride(0), hidden.stride(0), cache.stride(0), host_table.stride(0), coff, hoff,
            cache.shape[0], host_table.shape[0],
            BLOCK_T=block_t, BLOCK_D=block_d, FP64=hidden.dtype == torch.float64 or cache.dtype == torch.float64,
            num_warps=warps,
        )


@triton_op("memllm::tol_cached_gather_add_triton", mutates_args=())
def tol_cached_gather_add_triton(hidden: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor,
                                 cache: torch.Tensor, host_table: torch.Tensor,
                                 layer: int | None = None) -> torch.Tensor:
    """hidden [..., d], ids [...], slot_map [V] int32, cache [C, (L,) d], host_table [V, (L,) d] -> [..., d]."""
    _checks.cached_gather_add("tol_cached_gather_add_triton", hidden, ids, slot_map, cache, host_table, layer,
                              _checks.RAW)
    d = hidden.shape[-1]
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if out.numel() == 0:
        return out
    h = _rows(hidden)
    if h is None:
        h = hidden.contiguous().view(-1, d)
    _launch(out.view(-1, d), h, ids.reshape(-1).contiguous(), slot_map, cache, host_table, layer)
    return out


@triton_op("memllm::tol_cached_gather_add_triton_", mutates_args={"hidden"})
def tol_cached_gather_add_triton_(hidden: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor,
                                  cache: torch.Tensor, host_table: torch.Tensor, layer: int | None = None) -> None:
    """In place on hidden [..., d]; see tol_cached_gather_add_triton."""
    _checks.cached_gather_add("tol_cached_gather_add_triton_", hidden, ids, slot_map, cache, host_table, layer,
                              _checks.RAW)
    _checks.no_overlap("tol_cached_gather_add_triton_", "hidden", hidden)
    _checks.writable("tol_cached_gather_add_triton_", hidden=hidden)
    # slot_map too: a program read slot_map[id] after another had written its bytes as part of hidden (a hit read as
    # a miss: 7.0 off in a row at d=65536, a program per row).
    _checks.not_aliased("tol_cached_gather_add_triton_", hidden, ids, slot_map, cache, host_table)
    if hidden.numel() == 0:
        return
    h = _rows(hidden)
    if h is None:
        hidden.copy_(tol_cached_gather_add_triton(hidden, ids, slot_map, cache, host_table, layer))
        return
    _launch(h, h, ids.reshape(-1).contiguous(), slot_map, cache, host_table, layer)


def aot_specs():
    """Compiled for sm_90 in CI: bf16/bf16 and fp32/bf16 (hidden/table) with int64 and int32 ids, the 1b tile."""
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    ints = {"T": "i32", "d": "i32", "out_rs": "i32", "hidden_rs": "i32", "cache_rs": "i64", "host_rs": "i64",
            "cache_layer_offset": "i64", "host_layer_offset": "i64", "num_slots": "i32", "num_rows": "i32"}
    aligned = ("out_ptr", "hidden_ptr", "ids_ptr", "cache_ptr", "host_ptr", "d", "out_rs", "hidden_rs", "cache_rs",
               "host_rs", "cache_layer_offset", "host_layer_offset")
    for h, t, ids in [(torch.bfloat16, torch.bfloat16, "i64"), (torch.bfloat16, torch.bfloat16, "i32"),
                      (torch.float32, torch.bfloat16, "i64"), (torch.float16, torch.float16, "i64")]:
        sig = {"out_ptr": f"*{ty[h]}", "hidden_ptr": f"*{ty[h]}", "ids_ptr": f"*{ids}", "slot_map_ptr": "*i32",
               "cache_ptr": f"*{ty[t]}", "host_ptr": f"*{ty[t]}", **ints,
               "BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "FP64": "constexpr"}
        yield (f"tol_cached_gather_add_kernel[{ty[h]},{ty[t]},{ids}]", tol_cached_gather_add_kernel, sig,
               {"BLOCK_T": 4, "BLOCK_D": 2048, "FP64": False}, aligned)
