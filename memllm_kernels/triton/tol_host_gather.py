"""Triton kernel of the host-row gather: out[rows[i]] = table[ids[i]], whole token rows (a pure copy).

Registered as memllm::tol_host_gather_triton (mutates out) with torch.library.triton_op. On a GPU, table
may be host memory registered for the device (the pinned host tier): its address is valid on the device
(UVA), so the kernel reads rows over PCIe directly. Under the interpreter everything is on the CPU.
The shapes, and that out shares no memory with itself or an input, are checked before launch
(memllm_kernels/_checks.py); the ids and rows are data, range-checked by the caller (memllm_kernels.offload.ops),
and the kernel still never reads outside the table (bad ids write NaN rows) nor writes outside out (bad rows are
skipped).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _checks
from .tol_gather_add import _fake_run, _on, _tiles


@triton.jit
def tol_host_gather_kernel(
    out_ptr, table_ptr, ids_ptr, rows_ptr,
    N, row_elems, out_rs, table_rs, num_rows, num_out,
    HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    i = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_n = i < N
    ids = tl.load(ids_ptr + i, mask=in_n, other=0).to(tl.int64)
    if HAS_ROWS:
        dst = tl.load(rows_ptr + i, mask=in_n, other=-1).to(tl.int64)
    else:
        dst = i
    ok = in_n & (dst >= 0) & (dst < num_out)
    id_ok = (ids >= 0) & (ids < num_rows)
    mask = ok[:, None] & (cols < row_elems)[None, :]
    v = tl.load(table_ptr + ids[:, None] * table_rs + cols[None, :], mask=mask & id_ok[:, None],
                other=float("nan"))
    tl.store(out_ptr + dst[:, None] * out_rs + cols[None, :], v, mask=mask)


@triton_op("memllm::tol_host_gather_triton", mutates_args={"out"})
def tol_host_gather_triton(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor,
                           rows: torch.Tensor | None = None) -> None:
    """table [V, ...] (rows dense), ids [N], out [M, ...] like table's rows, rows [N] or None."""
    _checks.host_gather("tol_host_gather_triton", table, ids, out, rows, _checks.RAW)
    _checks.outputs_apart("tol_host_gather_triton", {"out": out}, {"table": table, "ids": ids, "rows": rows},
                          _checks.RAW)
    N = ids.shape[0]
    row_elems = 1
    for s in table.shape[1:]:
        row_elems *= s
    if N == 0 or row_elems == 0 or _fake_run(out):
        return
    block_n, block_e, grid, warps = _tiles(N, row_elems)
    ids_c = ids.contiguous()
    rows_c = ids_c if rows is None else rows.contiguous()
    with _on(out):
        wrap_triton(tol_host_gather_kernel)[grid](
            out, table, ids_c, rows_c,
            N, row_elems, out.stride(0), table.stride(0), table.shape[0], out.shape[0],
            HAS_ROWS=rows is not None, BLOCK_N=block_n, BLOCK_E=block_e, num_warps=warps,
        )


def aot_specs():
    """(name, kernel, signature, constexprs, 16-byte-aligned args) compiled for sm_90 in CI: each table dtype,
    the 1b row of 24 x 2048 elements in tiles of 2048, with and without destination rows."""
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    ints = {"N": "i32", "row_elems": "i32", "out_rs": "i64", "table_rs": "i64", "num_rows": "i32", "num_out": "i32"}
    aligned = ("out_ptr", "table_ptr", "ids_ptr", "rows_ptr", "row_elems", "out_rs", "table_rs")
    for t in ty:
        for has_rows in (False, True):
            sig = {"out_ptr": f"*{ty[t]}", "table_ptr": f"*{ty[t]}", "ids_ptr": "*i64", "rows_ptr": "*i64", **ints,
                   "HAS_ROWS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_E": "constexpr"}
            yield (f"tol_host_gather_kernel[{ty[t]},rows={has_rows}]", tol_host_gather_kernel, sig,
                   {"HAS_ROWS": has_rows, "BLOCK_N": 4, "BLOCK_E": 2048}, aligned)
