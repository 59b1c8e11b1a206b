"""Benchmarks of memllm::decode_attention against the step it replaces in the model (torch's SDPA).

    pytest bench/bench_decode_attention.py               # CPU by default, or the GPU if one is visible

One decode step's attention at the 1b head shape (32 query and 32 key/value heads of 64), bf16 on a GPU and
float32 on the CPU, for a token at cache slot T - 1 of a cache of T + 1 slots (keys read: T):
    memllm   (GPU) mk.decode_attention: RoPE, the cache write and attention in one Triton kernel
    reference  (CPU) the same op's PyTorch reference (the spec, not meant to be fast)
    sdpa     what Transformer.forward's cached branch runs per layer without it: RoPE on q and k, two
             index_copy_ cache writes, the additive mask, F.scaled_dot_product_attention over the whole cache
On a GPU both are timed from CUDA-graph replays (as the model decodes), "x sdpa" is the speed-up, and GB/s
counts the cache bytes a step must read (2 x T x H_kv x hd elements). Calls rotate over caches of 256 MB in
all (at most 256 of them), as a model step reads each layer's cache after its weights have streamed through:
one cache read again and again (1 MB at T=128) would be timed from a GPU's 50 MB L2.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import memllm_kernels as mk
from conftest import bench_device, record, timed
from memllm_kernels.model.model import apply_rope, rope_tables

H, HKV, HD = 32, 32, 64  # the 1b preset's heads
ROTATE_BYTES = 256 << 20


def pytest_generate_tests(metafunc):
    if "provider" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    keys = [128, 2048, 8192] if device == "cuda" else [128, 2048]
    batches = [1, 8] if device == "cuda" else [1]
    dtype = "bfloat16" if device == "cuda" else "float32"
    metafunc.parametrize("device,dtype,T,batch,provider", [
        pytest.param(device, dtype, T, B, p, id=f"{p}-{dtype}-T{T}-B{B}")
        for T in keys for B in batches for p in ("memllm" if device == "cuda" else "reference", "sdpa")])


def sdpa_step(qkv, k_cache, v_cache, cos, sin, pos, pad):
    """Transformer.forward's cached branch for one token per row, Attention.forward's SDPA path."""
    B, S = qkv.shape[0], k_cache.shape[2]
    x = qkv.view(B, 1, H + 2 * HKV, HD)
    rp = (pos[None, :] - pad[:, None]).clamp(min=0)  # [B, 1]
    qk = apply_rope(x[:, :, :H + HKV], cos[rp], sin[rp])
    q, k = qk.split([H, HKV], dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, x[:, :, H + HKV:]))
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    slots = torch.arange(S, device=qkv.device)
    keep = ((slots[None, :] <= pos[:, None])[None] & (slots[None, :] >= pad[:, None])[:, None, :]) \
        | (slots == pos[:, None])[None]
    mask = torch.zeros(keep[:, None].shape, dtype=qkv.dtype, device=qkv.device).masked_fill_(
        ~keep[:, None], float("-inf"))
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=HKV != H)
    return y.transpose(1, 2).reshape(B, H * HD)


def test_decode_attention(benchmark, device, dtype, T, batch, provider):
    dt = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=dt).element_size()
    n_sets = max(1, min(256, ROTATE_BYTES // (2 * batch * HKV * (T + 1) * HD * itemsize)))
    sets = [(torch.randn(batch, (H + 2 * HKV) * HD, device=device, dtype=dt),
             torch.randn(batch, HKV, T + 1, HD, device=device, dtype=dt),
             torch.randn(batch, HKV, T + 1, HD, device=device, dtype=dt)) for _ in range(n_sets)]
    it = itertools.cycle(sets)
    cos, sin = (t.to(device) for t in rope_tables(T + 1, HD, 500_000.0))
    pos = torch.tensor([T - 1], device=device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    if provider != "sdpa":
        backend = "triton" if provider == "memllm" else "reference"

        def step(qkv, k_cache, v_cache):
            return mk.decode_attention(qkv, k_cache, v_cache, cos, sin, pos, pad, H, backend=backend, check=False)
    else:
        def step(qkv, k_cache, v_cache):
            return sdpa_step(qkv, k_cache, v_cache, cos, sin, pos, pad)
    if provider != "sdpa":  # both compute the same step (tests/test_decode_attention.py checks it closely)
        qkv, k_cache, v_cache = sets[0]
        want = sdpa_step(qkv, k_cache.clone(), v_cache.clone(), cos, sin, pos, pad)
        torch.testing.assert_close(step(qkv, k_cache, v_cache).float(), want.float(), rtol=2e-2, atol=2e-2)
    t = timed(benchmark, lambda: step(*next(it)), device, min_inner=n_sets)  # a GPU graph holds every set
    row = record(op="decode_attention", provider=provider, dtype=dtype, preset="1b", T=T, batch=batch, ms=t["s"] * 1e3,
                 ms_launch=t["s_launch"] and t["s_launch"] * 1e3, bytes=2 * batch * HKV * T * HD * itemsize,
                 input_sets=n_sets)
    benchmark.extra_info.update(row)
