"""Triton kernel of one decode step's attention: RoPE on q and k, the KV-cache append and the attention over
the cache, in one launch per layer (memllm::decode_attention; the spec is reference.decode_attention).

Why: at batch 1 the attention of a decode step is a handful of tiny kernels per layer, the same in the dense
and the MemoryLLM model. On an H100 (1b shapes, compiled and replayed from a CUDA graph) they were RoPE
(1.4 us), two cache writes (1.1 us each), the additive mask (1.0 us) and cuDNN's SDPA (6.5 us for 130 keys,
reading the whole cache), plus a launch gap each: 0.3 ms of MemoryLLM's 1.09 ms step, and what kept it from
2x the dense model's speed. This kernel reads only the slots up to the token's own, and needs no mask tensor.

One program per (row, query head) loops over key blocks with an online softmax (FlashAttention's recurrence)
in float32, kept per key row of the block and combined across rows once at the end, and reads each block's
keys and values while it computes on the one before. Keys and values are read in two halves, the
(x[:hd/2], x[hd/2:]) pairs that RoPE rotates. The new key and value are used from registers (a program never
reads back its own store); the first query head of each key/value group stores them. One program per head
would leave most SMs idle at batch 1 (32 programs at 1b) and loop over every key of a long context, so from
1024 cache slots on, the keys are split among up to 16 programs per head (flash-decoding: _splits), each
writing its partial softmax state, which a second small kernel combines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _checks
from .tol_gather_add import _INTERPRET, _fake_run, _on, to_acc, to_out_dtype

_BLOCK_S = 256 if _INTERPRET else 64  # keys per loop step (the interpreter pays per step, not per element)


@triton.jit
def _load_block(kc, vc, start, end, cache_ss, i, im, HALF: tl.constexpr, BLOCK_S: tl.constexpr):
    """Keys and values of cache slots start .. start + BLOCK_S - 1 below end, in the two halves RoPE pairs
    ([BLOCK_S, BLOCK_HALF] each, the cache's dtype; 0 elsewhere: nothing is read past end)."""
    s = start + tl.arange(0, BLOCK_S)
    ld = (s < end)[:, None] & im[None, :]
    kp = kc + s[:, None] * cache_ss + i[None, :]
    vp = vc + s[:, None] * cache_ss + i[None, :]
    return (tl.load(kp, mask=ld, other=0.0), tl.load(kp + HALF, mask=ld, other=0.0),
            tl.load(vp, mask=ld, other=0.0), tl.load(vp + HALF, mask=ld, other=0.0))


@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    """x in dtype: rounded to nearest even where that narrows it (to_out_dtype: float64 through float32, as torch
    converts), exact where it widens; float16 <-> bfloat16 through float32, rounded once (under the interpreter a
    plain cast truncated: a float16 qkv's value was stored in a bfloat16 cache an ulp off)."""
    if dtype.primitive_bitwidth > x.dtype.primitive_bitwidth:
        return to_acc(x, dtype)
    if dtype.primitive_bitwidth == x.dtype.primitive_bitwidth and dtype != x.dtype:
        return to_out_dtype(to_acc(x, tl.float32), dtype)
    if dtype.primitive_bitwidth < x.dtype.primitive_bitwidth:
        return to_out_dtype(x, dtype)
    return x


@triton.jit
def decode_attention_kernel(
    y_ptr, ml_ptr, part_ptr, qkv_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, pad_ptr,
    qkv_rs, cache_bs, cache_hs, cache_ss, y_rs, S, P,
    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLITS: tl.constexpr, FP64: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.program_id(2)  # this program's share of the keys (SPLITS > 1: partial results, combined later)
    # This query head's key/value head, 64-bit: g * cache_hs is an offset, and a head stride under 2^31 (passed as
    # int32) times g passed it where the heads are not the caches' inner dims (a [Hkv, B, S, hd] cache permuted to
    # [B, Hkv, S, hd]: a segfault under the interpreter at head stride 2^30, g = 2).
    g = (h // (H // HKV)).to(tl.int64)
    acc_ty = tl.float64 if FP64 else tl.float32
    dtype = qkv_ptr.dtype.element_ty
    # 1/sqrt(hd) in the accumulation type, computed here: a float argument arrives as float32 from an eager
    # launch (too coarse for float64's 1e-12) and as float64 from Inductor's (which made the softmax state fp64).
    scale = 1.0 / tl.sqrt(tl.full((), 2 * HALF, acc_ty))
    pos = tl.load(pos_ptr).to(tl.int64)
    pad = tl.load(pad_ptr + b).to(tl.int64)
    # RoPE at the row's own position (pad slots do not count), rounded to the model's dtype as apply_rope does.
    rp = tl.maximum(pos - tl.maximum(pad, 0), 0)
    # A slot outside the cache or a position past the RoPE tables (a launch that skipped the caller's checks)
    # writes nothing and returns NaN.
    ok = (pos >= 0) & (pos < S) & (rp < P)
    i = tl.arange(0, BLOCK_HALF)
    im = i < HALF
    kc = k_ptr + b * cache_bs + g * cache_hs
    vc = v_ptr + b * cache_bs + g * cache_hs
    # The cached keys pad..pos-1 in whole blocks, split among SPLITS programs; the token's own key and value
    # come from registers (below), so a token at position 128 reads two blocks of keys, not three.
    lo = (tl.maximum(tl.minimum(pad, pos), 0) // BLOCK_S) * BLOCK_S
    hi = tl.where(ok, pos, lo)  # no keys for a bad slot
    per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_S), SPLITS) * BLOCK_S  # keys per split, whole blocks
    lo = lo + j * per
    hi = tl.minimum(hi, lo + per)
    # Keys and values are loaded one block ahead of the block being computed on. A loop step that loaded its
    # keys, reduced them across warps and only then loaded its values paid each load's latency in full (7.0 us
    # for 128 keys, two blocks, at 1b shapes on an H200). The first block is loaded before the token's slot is
    # written below (it never reads that slot), so its latency overlaps the RoPE tables' loads.
    kb1, kb2, vb1, vb2 = _load_block(kc, vc, lo, hi, cache_ss, i, im, HALF, BLOCK_S)
    cos = tl.load(cos_ptr + rp * HALF + i, mask=im & ok, other=0.0).to(acc_ty)
    sin = tl.load(sin_ptr + rp * HALF + i, mask=im & ok, other=0.0).to(acc_ty)
    row = qkv_ptr + b * qkv_rs
    q1 = tl.load(row + h * 2 * HALF + i, mask=im, other=0.0).to(acc_ty)
    q2 = tl.load(row + h * 2 * HALF + HALF + i, mask=im, other=0.0).to(acc_ty)
    q1, q2 = (q1 * cos - q2 * sin).to(dtype).to(acc_ty), (q1 * sin + q2 * cos).to(dtype).to(acc_ty)
    k_off = (H + g) * 2 * HALF
    k1 = tl.load(row + k_off + i, mask=im, other=0.0).to(acc_ty)
    k2 = tl.load(row + k_off + HALF + i, mask=im, other=0.0).to(acc_ty)
    kn1, kn2 = (k1 * cos - k2 * sin).to(dtype), (k1 * sin + k2 * cos).to(dtype)
    v_off = (H + HKV + g) * 2 * HALF
    vn1 = tl.load(row + v_off + i, mask=im, other=0.0)
    vn2 = tl.load(row + v_off + HALF + i, mask=im, other=0.0)
    # The token's own key and value as the caches hold them: the attention below reads them from registers, and
    # must see what a read of the cache would (float32 qkv over a float16 cache was off by 4e-5).
    kn1, kn2 = _to_dtype(kn1, k_ptr.dtype.element_ty), _to_dtype(kn2, k_ptr.dtype.element_ty)
    vn1, vn2 = _to_dtype(vn1, v_ptr.dtype.element_ty), _to_dtype(vn2, v_ptr.dtype.element_ty)
    first = im & ok & (h % (H // HKV) == 0) & (j == 0)  # one program per key/value head writes its slot
    tl.store(kc + pos * cache_ss + i, kn1, mask=first)
    tl.store(kc + pos * cache_ss + HALF + i, kn2, mask=first)
    tl.store(vc + pos * cache_ss + i, vn1, mask=first)
    tl.store(vc + pos * cache_ss + HALF + i, vn2, mask=first)
    # Each key row of the block keeps its own softmax state (max, denominator, weighted sum of values) over the
    # loop, and the rows are combined once after it: the loop then reduces only within a warp (the score over
    # the head's dims), where one state for the block needed four reductions across warps per step (twelve
    # barriers). m stays finite: a masked key adds exp(-inf) = 0.
    m_row = tl.full((BLOCK_S,), -1e30, acc_ty)
    den_row = tl.zeros((BLOCK_S,), acc_ty)
    acc1_row = tl.zeros((BLOCK_S, BLOCK_HALF), acc_ty)
    acc2_row = tl.zeros((BLOCK_S, BLOCK_HALF), acc_ty)
    for start in range(lo, hi, BLOCK_S):
        nk1, nk2, nv1, nv2 = _load_block(kc, vc, start + BLOCK_S, hi, cache_ss, i, im, HALF, BLOCK_S)
        s = start + tl.arange(0, BLOCK_S)
        sc = tl.sum(q1[None, :] * kb1.to(acc_ty) + q2[None, :] * kb2.to(acc_ty), axis=1) * scale
        sc = tl.where((s >= pad) & (s < hi), sc, float("-inf"))
        m_new = tl.maximum(m_row, sc)
        alpha = tl.exp(m_row - m_new)
        p = tl.exp(sc - m_new)
        den_row = den_row * alpha + p
        acc1_row = acc1_row * alpha[:, None] + p[:, None] * vb1.to(acc_ty)
        acc2_row = acc2_row * alpha[:, None] + p[:, None] * vb2.to(acc_ty)
        m_row = m_new
        kb1, kb2, vb1, vb2 = nk1, nk2, nv1, nv2
    # The token's own key joins in split 0 (a padding query sees only that key); a split with no keys, and a bad
    # slot, end with den 0 (0 / 0: NaN out).
    own = (j == 0) & ok
    m_own = tl.where(own, tl.sum(q1 * kn1.to(acc_ty) + q2 * kn2.to(acc_ty), axis=0) * scale, -1e30)
    m = tl.maximum(tl.max(m_row, axis=0), m_own)
    w = tl.exp(m_row - m)
    w_own = tl.where(own, tl.exp(m_own - m), 0.0)
    den = tl.sum(w * den_row, axis=0) + w_own
    acc1 = tl.sum(w[:, None] * acc1_row, axis=0) + w_own * vn1.to(acc_ty)
    acc2 = tl.sum(w[:, None] * acc2_row, axis=0) + w_own * vn2.to(acc_ty)
    if SPLITS == 1:
        out = y_ptr + b * y_rs + h * 2 * HALF
        tl.store(out + i, (acc1 / den).to(y_ptr.dtype.element_ty), mask=im)
        tl.store(out + HALF + i, (acc2 / den).to(y_ptr.dtype.element_ty), mask=im)
    else:  # this split's running max, denominator and unnormalised sum, for decode_attention_combine_kernel
        k = (b * H + h) * SPLITS + j
        tl.store(ml_ptr + k * 2, m)
        tl.store(ml_ptr + k * 2 + 1, den)
        tl.store(part_ptr + k * 2 * HALF + i, acc1, mask=im)
        tl.store(part_ptr + k * 2 * HALF + HALF + i, acc2, mask=im)


@triton.jit
def decode_attention_combine_kernel(y_ptr, ml_ptr, part_ptr, y_rs, H: tl.constexpr, HALF: tl.constexpr,
                                    BLOCK_HALF: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """y = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) den_j over a head's splits (M: their largest max)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK_SPLITS)
    jm = j < SPLITS
    k = (b * H + h) * SPLITS + j
    m = tl.load(ml_ptr + k * 2, mask=jm, other=float("-inf"))
    den = tl.load(ml_ptr + k * 2 + 1, mask=jm, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # a split with no keys has den 0 and adds nothing
    i = tl.arange(0, BLOCK_HALF)
    pm = jm[:, None] & (i < HALF)[None, :]
    a1 = tl.load(part_ptr + k[:, None] * 2 * HALF + i[None, :], mask=pm, other=0.0)
    a2 = tl.load(part_ptr + k[:, None] * 2 * HALF + HALF + i[None, :], mask=pm, other=0.0)
    total = tl.sum(w * den, axis=0)  # 0 for a bad slot (no split saw a key): NaN out
    out = y_ptr + b * y_rs + h * 2 * HALF
    tl.store(out + i, (tl.sum(w[:, None] * a1, axis=0) / total).to(y_ptr.dtype.element_ty), mask=i < HALF)
    tl.store(out + HALF + i, (tl.sum(w[:, None] * a2, axis=0) / total).to(y_ptr.dtype.element_ty), mask=i < HALF)


def _splits(slots: int, programs: int) -> int:
    """Programs per head: 1 up to 1023 cache slots; then at least 512 slots each (8 loop steps of 64 keys, so the
    partial results' extra traffic stays small), at most 16, and at most ~1024 programs in all."""
    return max(1, min(16, slots // 512, 1024 // max(1, programs)))


@triton_op("memllm::decode_attention", mutates_args={"k_cache", "v_cache"})
def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, n_head: int) -> torch.Tensor:
    """One decode step's attention; shapes and meaning in reference.decode_attention. The shapes are checked here
    (the kernel indexes by them); pos and pad are data, range-checked by the caller (memllm_kernels.ops.
    decode_attention, check=True): a bad slot reaching the kernel makes it write nothing and return NaN."""
    _checks.decode_attention("decode_attention", qkv, k_cache, v_cache, cos, sin, pos, pad, n_head, _checks.RAW)
    # Both caches are written in place: each must own its elements (an expand()ed cache made the batch rows race
    # on one slot) and they must not overlap (k_cache is v_cache: the backends disagreed). The caches alone, not
    # every input: this runs per layer of an eager decode step.
    _checks.outputs_apart("decode_attention", {"k_cache": k_cache, "v_cache": v_cache}, {}, _checks.RAW)
    B = qkv.shape[0]
    hd = int(k_cache.shape[-1])  # head sizes are constexprs: concrete ints even where torch traces symbolic shapes
    y = torch.empty(B, n_head * hd, dtype=qkv.dtype, device=qkv.device)
    if B == 0 or _fake_run(y):
        return y
    splits = _splits(int(k_cache.shape[2]), B * n_head)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    ml = torch.empty(B * n_head * splits * 2 if splits > 1 else 0, dtype=acc, device=qkv.device)
    part = torch.empty(B * n_head * splits * hd if splits > 1 else 0, dtype=acc, device=qkv.device)
    block_half = triton.next_power_of_2(hd // 2)
    with _on(y):
        wrap_triton(decode_attention_kernel)[(B, n_head, splits)](
            y, ml, part, qkv, k_cache, v_cache, cos, sin, pos, pad,
            qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), y.stride(0), k_cache.shape[2],
            cos.shape[0],
            H=n_head, HKV=int(k_cache.shape[1]), HALF=hd // 2, BLOCK_HALF=block_half, BLOCK_S=_BLOCK_S,
            SPLITS=splits, FP64=acc == torch.float64, num_warps=4,
        )
        if splits > 1:
            wrap_triton(decode_attention_combine_kernel)[(B, n_head)](
                y, ml, part, y.stride(0), H=n_head, HALF=hd // 2, BLOCK_HALF=block_half, SPLITS=splits,
                BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=1,
            )
    return y


def aot_specs():
    """The specializations compiled ahead of time for a GPU target in CI: the 1b shape (32 heads of 64) in bf16,
    one program per head and split over 4, and the combining kernel."""
    sig = {"y_ptr": "*bf16", "ml_ptr": "*fp32", "part_ptr": "*fp32", "qkv_ptr": "*bf16", "k_ptr": "*bf16",
           "v_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "pad_ptr": "*i64",
           "qkv_rs": "i32", "cache_bs": "i64", "cache_hs": "i64", "cache_ss": "i32", "y_rs": "i32", "S": "i32",
           "P": "i32", "H": "constexpr", "HKV": "constexpr", "HALF": "constexpr",
           "BLOCK_HALF": "constexpr", "BLOCK_S": "constexpr", "SPLITS": "constexpr", "FP64": "constexpr"}
    aligned = ("y_ptr", "ml_ptr", "part_ptr", "qkv_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "qkv_rs",
               "cache_bs", "cache_hs", "cache_ss", "y_rs")
    for splits in (1, 4):
        yield (f"decode_attention_kernel[bf16,1b,splits={splits}]", decode_attention_kernel, sig,
               {"H": 32, "HKV": 32, "HALF": 32, "BLOCK_HALF": 32, "BLOCK_S": 64, "SPLITS": splits, "FP64": False},
               aligned)
    sig = {"y_ptr": "*bf16", "ml_ptr": "*fp32", "part_ptr": "*fp32", "y_rs": "i32", "H": "constexpr",
           "HALF": "constexpr", "BLOCK_HALF": "constexpr", "SPLITS": "constexpr", "BLOCK_SPLITS": "constexpr"}
    yield ("decode_attention_combine_kernel[bf16,1b]", decode_attention_combine_kernel, sig,
           {"H": 32, "HALF": 32, "BLOCK_HALF": 32, "SPLITS": 4, "BLOCK_SPLITS": 4}, ("y_ptr", "ml_ptr", "part_ptr"))
