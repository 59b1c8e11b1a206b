"""Triton kernel of the ToL gather-add: out[t] = hidden[t] + table[ids[t](, layer)].

Registered as memllm::tol_gather_add_triton (functional) and memllm::tol_gather_add_triton_ (in place)
with torch.library.triton_op, so torch.compile sees the kernel. The op checks its arguments' shapes, dtypes
and devices before launch (memllm_kernels/_checks.py, as the C++ ops do). The id range is data, checked by the
caller (memllm_kernels.ops); the kernel itself never reads a row outside [0, V) and writes NaN rows for
out-of-range ids, so a launch that skipped that check cannot read out of bounds.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .. import _checks

# The interpreter costs about 2 ms per program instance and runs each tile as NumPy arrays, so
# under it we launch 8x bigger tiles: T=4097, d=2048 becomes 129 programs (~0.3 s), not 1025.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TILE_ELEMS = 1 << 16 if _INTERPRET else 1 << 13
# The kernels' own bfloat16 conversions under the interpreter (compiled away on a GPU): Triton 3.8's interpreter
# converts float32 <-> bfloat16 itself (triton/runtime/interpreter.py, _convert_float), truncating instead of
# rounding and getting subnormals wrong both ways: a bfloat16 subnormal was read as 0 or as another number (2.8e-40
# as 5.9e-39), and a float32 sum below 2^-126 was stored as up to 40000 times itself (5.3e-44 as 2.2e-39).
INTERPRET_BF16 = tl.constexpr(_INTERPRET)


@triton.jit
def to_acc(x, acc: tl.constexpr):
    """A loaded element x in the accumulation type acc (float32 or float64), exactly."""
    if INTERPRET_BF16 and x.dtype == tl.bfloat16:  # a bfloat16 is the top half of its float32
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(acc)


@triton.jit
def to_out_dtype(x, dtype: tl.constexpr):
    """x (float32 or float64) rounded to nearest even into dtype. A float64 sum goes to a 16-bit dtype
    through float32, as torch's own float64 -> bfloat16/float16 conversion does (the reference's bits;
    the interpreter's direct float64 -> bfloat16 cast is an integer cast: garbage)."""
    if x.dtype == tl.float64 and dtype.primitive_bitwidth < 32:
        x = x.to(tl.float32)
    if INTERPRET_BF16 and dtype == tl.bfloat16 and x.dtype == tl.float32:
        # Round to nearest even on the bits (as c10::BFloat16 and the C++ kernels do); NaN stays a quiet NaN.
        u = x.to(tl.uint32, bitcast=True)
        r = tl.where(x != x, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def tol_gather_add_kernel(
    out_ptr, hidden_ptr, ids_ptr, table_ptr,
    T, d, out_rs, hidden_rs, table_rs, layer_offset, num_rows,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    id_ok = (ids >= 0) & (ids < num_rows)
    mask = row_ok[:, None] & (cols < d)[None, :]
    h = tl.load(hidden_ptr + rows[:, None] * hidden_rs + cols[None, :], mask=mask)
    r = tl.load(table_ptr + ids[:, None] * table_rs + layer_offset + cols[None, :],
                mask=mask & id_ok[:, None], other=float("nan"))
    # Sum in float32 (float64 if an input is float64), round once to hidden's dtype.
    acc = tl.float64 if FP64 else tl.float32
    out = to_out_dtype(to_acc(h, acc) + to_acc(r, acc), out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * out_rs + cols[None, :], out, mask=mask)


def _tiles(rows: int, cols: int) -> tuple[int, int, tuple[int, int], int]:
    """(block_rows, block_cols, grid, num_warps) of a row kernel over [rows, cols]: tiles of at most
    _TILE_ELEMS elements, as much of a row's width as fits first (every kernel of this package)."""
    block_c = min(triton.next_power_of_2(cols), _TILE_ELEMS)
    block_r = min(triton.next_power_of_2(rows), max(1, _TILE_ELEMS // block_c))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    return block_r, block_c, grid, 4 if block_r * block_c <= 4096 else 8


def _fake_run(out: torch.Tensor) -> bool:
    """True while torch traces an op's fake kernel under the interpreter: wrap_triton then hands back the
    eager kernel, which must not run on fake tensors (on a GPU wrap_triton's own fake is a no-op). Under
    torch.compile the interpreter is refused: the compiled graph never ran the kernel (its output was whatever
    the allocation held)."""
    if _INTERPRET and torch.compiler.is_compiling():
        raise RuntimeError("torch.compile cannot compile a Triton kernel run by the interpreter (TRITON_INTERPRET=1); "
                           "call the op eagerly, or use backend='cpu' or 'reference' under torch.compile")
    return _INTERPRET and (out.device.type == "meta" or is_fake(out))


def _on(t: torch.Tensor):
    """The device context of a launch over t: Triton launches on the current CUDA device, not on its
    arguments' (a table on cuda:1 while cuda:0 is current would fail, or be read through the wrong context)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(out: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
            layer: int | None) -> None:
    """out, hidden: [T, d] views with unit column stride; ids: [T] contiguous."""
    T, d = hidden.shape
    if T == 0 or d == 0 or _fake_run(out):
        return
    block_t, block_d, grid, warps = _tiles(T, d)
    layer_offset = 0 if layer is None else layer * table.stride(1)
    with _on(out):
        wrap_triton(tol_gather_add_kernel)[grid](
            out, hidden, ids, table,
            T, d, out.stride(0), hidden.stride(0), table.stride(0), layer_offset, table.shape[0],
            BLOCK_T=block_t, BLOCK_D=block_d,
            FP64=hidden.dtype == torch.float64 or table.dtype == torch.float64,
            num_warps=warps,
        )


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t [..., d] as a [T, d] view with unit column stride, or None if that needs a copy."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except (RuntimeError, ValueError):  # a fake tensor (torch.compile, export) raises ValueError
        return None


@triton_op("memllm::tol_gather_add_triton", mutates_args=())
def tol_gather_add_triton(hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
                          layer: int | None = None) -> torch.Tensor:
    """hidden [..., d], ids [...] int32/int64, table [V, d] or [V, L, d] -> [..., d] like hidden."""
    _checks.gather_add("tol_gather_add_triton", hidden, ids, table, layer, _checks.RAW)
    d = hidden.shape[-1]
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if out.numel() == 0:
        return out
    h = _rows(hidden)
    if h is None:
        h = hidden.contiguous().view(-1, d)
    _launch(out.view(-1, d), h, ids.reshape(-1).contiguous(), table, layer)
    return out


@triton_op("memllm::tol_gather_add_triton_", mutates_args={"hidden"})
def tol_gather_add_triton_(hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
                           layer: int | None = None) -> None:
    """In place on hidden [..., d]; see tol_gather_add_triton."""
    _checks.gather_add("tol_gather_add_triton_", hidden, ids, table, layer, _checks.RAW)
    _checks.no_overlap("tol_gather_add_triton_", "hidden", hidden)
    _checks.writable("tol_gather_add_triton_", hidden=hidden)
    _checks.not_aliased("tol_gather_add_triton_", hidden, ids, table)
    if hidden.numel() == 0:
        return
    h = _rows(hidden)
    if h is None:  # not viewable as [T, d]: compute out of place, copy back into hidden's layout
        hidden.copy_(tol_gather_add_triton(hidden, ids, table, layer))
        return
    _launch(h, h, ids.reshape(-1).contiguous(), table, layer)


def aot_specs():
    """Specializations compiled ahead of time for a GPU target in CI, where no GPU is present
    (tests/test_triton_aot.py): every hidden/table dtype pair, both id dtypes, the tile of the 1b shape, and
    a float64 table under a bf16 hidden (the sum's rounding through float32).
    Yields (name, kernel, signature, constexprs, args known to be 16-byte aligned / divisible by 16)."""
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    ints = {"T": "i32", "d": "i32", "out_rs": "i32", "hidden_rs": "i32", "table_rs": "i64",
            "layer_offset": "i64", "num_rows": "i32"}
    aligned = ("out_ptr", "hidden_ptr", "ids_ptr", "table_ptr", "d", "out_rs", "hidden_rs", "table_rs", "layer_offset")
    pairs = [(h, t) for h in ty for t in ty if torch.float64 not in (h, t)] + [(torch.bfloat16, torch.float64)]
    for h, t in pairs:
        for ids in ("i32", "i64") if (h, t) == (torch.bfloat16, torch.bfloat16) else ("i64",):
            sig = {"out_ptr": f"*{ty[h]}", "hidden_ptr": f"*{ty[h]}", "ids_ptr": f"*{ids}", "table_ptr": f"*{ty[t]}",
                   **ints, "BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "FP64": "constexpr"}
            yield (f"tol_gather_add_kernel[{ty[h]},{ty[t]},{ids}]", tol_gather_add_kernel, sig,
                   {"BLOCK_T": 4, "BLOCK_D": 2048, "FP64": t == torch.float64}, aligned)
