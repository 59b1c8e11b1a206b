"""Pure-PyTorch reference implementations: the test oracle and the spec of every op.

Each function here defines what its fused kernel must compute. Kernels are checked against these
bit for bit where the arithmetic allows it (see tests/test_tol_gather_add.py for the tolerance table).
"""

from __future__ import annotations

import torch


def tol_rows(table: torch.Tensor, ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Gather token-wise lookup rows.

    table: [V, d] or token-major [V, L, d]; ids: integer tensor of any shape [...];
    returns [..., d] in table's dtype (a pure gather, bit-exact by definition). An id outside [0, V) gets
    a NaN row (what the kernels write when called with check_ids=False; the wrappers raise first otherwise).
    """
    # select + index_select, not table[ids, layer]: on CPU torch's advanced indexing of a strided
    # view took 15 ms for 8 tokens of a [8192, 24, 960] table (torch 2.13), index_select 12 us.
    src = table if layer is None else table.select(1, layer)
    flat, ok = valid_ids(ids, table.shape[0])
    rows = src.index_select(0, flat) if table.shape[0] else src.new_empty(flat.shape[0], table.shape[-1])
    return nan_where_bad(rows, ok).reshape(*ids.shape, table.shape[-1])


def valid_ids(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids flattened to int64 and clamped into [0, num_rows), whether each was in range): the gather reads
    only real rows; no host sync (usable where the kernels skip the id check, e.g. under CUDA graphs)."""
    flat = ids.reshape(-1).long()
    ok = (flat >= 0) & (flat < num_rows)
    return flat.clamp(0, max(num_rows - 1, 0)), ok


def nan_where_bad(rows: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """rows [N, ...] with the rows where ok [N] is False replaced by NaN."""
    return torch.where(ok.view(-1, *([1] * (rows.dim() - 1))), rows, rows.new_full((), float("nan")))


def tol_gather_add(
    hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, layer: int | None = None
) -> torch.Tensor:
    """hidden + table[ids] (table [V, d]) or hidden + table[ids, layer] (table [V, L, d]).

    hidden: [..., d] float32/float16/bfloat16; ids: [...] int32/int64 (hidden's leading shape);
    returns a new contiguous tensor shaped and typed like hidden (as the kernels do: the sum alone kept a
    transposed hidden's strides, so backend='reference' returned a non-contiguous tensor).
    The sum is taken in float32 (float64 if an input is float64; rounded to a 16-bit hidden through float32,
    as torch converts float64) and rounded once to hidden's dtype. For two 16-bit operands this
    equals PyTorch's own same-dtype `hidden + rows` (which also upcasts to float32), and since
    float32 carries more than 2p+2 mantissa bits for p = 8 (bf16) and 11 (fp16), the single
    rounding equals the correctly rounded sum: every backend can match it bit for bit.
    """
    rows = tol_rows(table, ids, layer)
    acc = torch.promote_types(torch.promote_types(hidden.dtype, table.dtype), torch.float32)  # float64 stays
    return (hidden.to(acc) + rows.to(acc)).to(hidden.dtype).contiguous()


def tol_gather_add_backward_table(grad: torch.Tensor, ids: torch.Tensor, table_shape, table_dtype,
                                  layer: int | None = None) -> torch.Tensor:
    """Gradient of tol_gather_add with respect to the table: grad rows scatter-added onto their ids.

    grad: [..., d]; ids: [...]; returns a dense tensor of table_shape ([V, d] or [V, L, d]) and
    table_dtype, zero except at the ids' rows (of `layer`). Repeated ids accumulate, in float32. An id outside
    [0, V) (a forward with check_ids=False, which gave it a NaN row) adds nothing: index_add_ raised on it on
    the CPU and would hit a device-side assert on the GPU.
    """
    acc = torch.promote_types(torch.promote_types(grad.dtype, table_dtype), torch.float32)
    out = torch.zeros(table_shape, dtype=acc, device=grad.device)
    target = out if layer is None else out[:, layer]
    flat, ok = valid_ids(ids, table_shape[0])
    if table_shape[0]:
        src = grad.reshape(-1, grad.shape[-1]).to(acc)
        target.index_add_(0, flat, torch.where(ok[:, None], src, torch.zeros((), dtype=acc, device=src.device)))
    return out.to(table_dtype)


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, n_head: int) -> torch.Tensor:
    """One decode step's attention, one new token per row, with its RoPE and KV-cache append.

    qkv: [B, (H + 2 Hkv) hd], the token's q, k and v projections (H = n_head query heads, then Hkv key and Hkv
         value heads of hd each, hd even); float32/float16/bfloat16/float64.
    k_cache, v_cache: [B, Hkv, S, hd], one float dtype (qkv's, or another under autocast): slot pos receives the
         rotated k and the v (in place).
    cos, sin: [P, hd/2] float32 RoPE tables; row max(pos - pad[b], 0) rotates row b's q and k, as the pairs
              (x[:hd/2], x[hd/2:]), in float32, rounded to qkv's dtype (the model's apply_rope).
    pos: [1] integer, the token's cache slot in [0, S); pad: [B] integer, each row's left-padding slots.
    Returns y [B, H hd] in qkv's dtype: softmax(q K^T / sqrt(hd)) V over the slots pad[b]..pos (and slot pos
    itself even when pad[b] > pos), each query head reading key/value head h // (H / Hkv), in float32
    (float64 for float64 inputs): the model's SDPA step with its additive mask.
    """
    B = qkv.shape[0]
    Hkv, S, hd = k_cache.shape[1:]
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    p = pos.reshape(-1)[:1].long()  # a tensor throughout, never read on the host: torch.compile traces this
    x = qkv.reshape(B, n_head + 2 * Hkv, hd)
    rp = (p - pad.clamp(min=0)).clamp(min=0)  # [B]
    c, s = cos[rp].to(acc)[:, None, :], sin[rp].to(acc)[:, None, :]
    x1, x2 = x[:, :n_head + Hkv].to(acc).chunk(2, dim=-1)
    qk = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(qkv.dtype)
    k_cache.index_copy_(2, p, qk[:, n_head:, None].to(k_cache.dtype))
    v_cache.index_copy_(2, p, x[:, n_head + Hkv:, None].to(v_cache.dtype))
    slots = torch.arange(S, device=qkv.device)
    keep = ((slots[None, :] >= pad[:, None]) & (slots[None, :] <= p)) | (slots[None, :] == p)  # [B, S]
    K = k_cache.to(acc).repeat_interleave(n_head // Hkv, dim=1)  # [B, H, S, hd]
    V = v_cache.to(acc).repeat_interleave(n_head // Hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", qk[:, :n_head].to(acc), K) * hd ** -0.5
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    y = torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), V)
    return y.to(qkv.dtype).reshape(B, n_head * hd)
