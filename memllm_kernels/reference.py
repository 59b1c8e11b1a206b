"""Pure-PyTorch reference implementations: the test oracle and the spec of every op.

Each function here defines what its fused kernel must compute. Kernels are checked against these
bit for bit where the arithmetic allows it (see tests/test_tol_gather_add.py for the tolerance table).
"""

from __future__ import annotations

import torch


def tol_rows(table: torch.Tensor, ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Gather token-wise lookup rows.

    table: [V, d] or token-major [V, L, d]; ids: integer tensor of any shape [...];
    returns [..., d] in table's dtype (a pure gather, bit-exact by definition).
    """
    # select + index_select, not table[ids, layer]: on CPU torch's advanced indexing of a strided
    # view took 15 ms for 8 tokens of a [8192, 24, 960] table (torch 2.13), index_select 12 us.
    src = table if layer is None else table.select(1, layer)
    return src.index_select(0, ids.reshape(-1).long()).reshape(*ids.shape, table.shape[-1])


def tol_gather_add(
    hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, layer: int | None = None
) -> torch.Tensor:
    """hidden + table[ids] (table [V, d]) or hidden + table[ids, layer] (table [V, L, d]).

    hidden: [..., d] float32/float16/bfloat16; ids: [...] int32/int64 (hidden's leading shape);
    returns a new tensor shaped and typed like hidden.
    The sum is taken in float32 (float64 if an input is float64) and rounded once to hidden's dtype. For two 16-bit operands this
    equals PyTorch's own same-dtype `hidden + rows` (which also upcasts to float32), and since
    float32 carries more than 2p+2 mantissa bits for p = 8 (bf16) and 11 (fp16), the single
    rounding equals the correctly rounded sum: every backend can match it bit for bit.
    """
    rows = tol_rows(table, ids, layer)
    acc = torch.promote_types(torch.promote_types(hidden.dtype, table.dtype), torch.float32)  # float64 stays
    return (hidden.to(acc) + rows.to(acc)).to(hidden.dtype)


def tol_gather_add_backward_table(grad: torch.Tensor, ids: torch.Tensor, table_shape, table_dtype,
                                  layer: int | None = None) -> torch.Tensor:
    """Gradient of tol_gather_add with respect to the table: grad rows scatter-added onto their ids.

    grad: [..., d]; ids: [...]; returns a dense tensor of table_shape ([V, d] or [V, L, d]) and
    table_dtype, zero except at the ids' rows (of `layer`). Repeated ids accumulate, in float32.
    """
    acc = torch.promote_types(torch.promote_types(grad.dtype, table_dtype), torch.float32)
    out = torch.zeros(table_shape, dtype=acc, device=grad.device)
    target = out if layer is None else out[:, layer]
    target.index_add_(0, ids.reshape(-1).long(), grad.reshape(-1, grad.shape[-1]).to(acc))
    return out.to(table_dtype)
