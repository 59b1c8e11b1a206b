"""The offload engine: its ops on every backend against memllm_kernels/offload/reference.py, the
host tiers, the cache policies, a 100,000-step randomized stress test of the bookkeeping, and the model and
CLI reading ToLs from host memory / disk with outputs identical to the in-memory ToL run.

GPU paths (CUDA kernels reading mapped host memory, the side-stream prefetch, cudaHostRegister) have tests
marked requires_cuda / requires_triton_gpu: they skip here, with the reason, and run on a GPU machine.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import textwrap
from functools import partial

import numpy as np
import pytest
import torch

import memllm_kernels as mk
from memllm_kernels.offload import (
    POLICIES,
    CacheDirectory,
    DiskTable,
    HostTable,
    OffloadEngine,
    format_stats,
    hot_set_from_counts,
    reference as oref,
    simulate,
)
from memllm_kernels.offload import tiers

from conftest import BACKEND_DEVICES, DEVICES
from test_tol_gather_add import assert_matches_reference

# ---- the test matrix, named once ----
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
               (torch.float16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.float16)]
# (hidden, table)
TOKENS = [0, 1, 7, 300]
DIMS = [1, 8, 769]
LAYERS = [None, 2]  # None: [V, d] tables; 2: token-major [V, 3, d] read at layer 2
VOCAB = 41
CACHE = 9
ALL_BACKENDS = BACKEND_DEVICES + [pytest.param("reference", "cpu", id="reference")]
NO_TRITON = [p for p in ALL_BACKENDS if p.values[0] != "triton"]
# ---- tolerances, with reasons ----
# tol_host_gather and tol_cache_prefetch copy rows: bit exact. tol_cached_gather_add adds in float32 and rounds
# once, exactly like tol_gather_add, so it must equal tol_gather_add over the full table bit for bit (Triton's
# interpreter too).
STRESS_STEPS = 100_000


def host_table(shape, dtype, device):
    """A table where the device kernels can read it: host memory from tol_host_alloc (page-locked and mapped
    when a GPU is present) for a CUDA device, a plain CPU tensor otherwise."""
    t = torch.randn(shape).to(dtype)
    if device == "cpu":
        return t
    h = mk.tol_host_alloc(shape, dtype)
    h.copy_(t)
    assert mk.tol_host_mapped(h), "tol_host_alloc did not page-lock the table although a GPU is visible"
    return h


def slot_setup(vocab, cache_rows, table, device, seed=0):
    """A random slot map over `vocab` with `cache_rows` filled slots, its cache, and one bogus slot >= C."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    slot_map = torch.full((vocab,), -1, dtype=torch.int32)
    cache = torch.zeros((cache_rows,) + tuple(table.shape[1:]), dtype=table.dtype)
    for s, tok in enumerate(perm[:cache_rows].tolist()):
        slot_map[tok] = s
        cache[s] = table[tok].cpu()
    slot_map[perm[cache_rows]] = cache_rows + 5  # outside [0, C): must read as a miss, never out of bounds
    slot_map[perm[cache_rows + 1]] = -3  # likewise below -1
    return slot_map.to(device), cache.to(device)


# ================================================================ tol_host_gather
@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(VOCAB, 5), (VOCAB, 3, 24), (VOCAB, 2, 769)], ids=str)
@pytest.mark.parametrize("with_rows", [False, True], ids=["dense", "rows"])
def test_host_gather_matches_reference(backend, device, dtype, shape, with_rows):
    table = host_table(shape, dtype, device)
    ids = torch.tensor([VOCAB - 1, 0, 7, 7, 3, VOCAB - 1], device=device)
    out = torch.full((9,) + shape[1:], 5.0, dtype=dtype, device=device)
    rows = torch.tensor([8, 0, 2, 4, 5, 1], device=device) if with_rows else None
    expected = out.clone().cpu()
    oref.tol_host_gather(table.cpu(), ids.cpu(), expected, None if rows is None else rows.cpu())
    assert mk.tol_host_gather(table, ids, out, rows, backend=backend) is out
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(out[rows if with_rows else slice(0, 6)].cpu(), table.cpu()[ids.cpu()])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_host_gather_empty_and_int32(backend, device):
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    out = torch.zeros(3, 2, 8, device=device)
    mk.tol_host_gather(table, torch.zeros(0, dtype=torch.int32, device=device), out, backend=backend)
    assert not out.any()
    mk.tol_host_gather(table, torch.tensor([4, 40], dtype=torch.int32, device=device), out,
                       torch.tensor([2, 0], dtype=torch.int32, device=device), backend=backend)
    assert torch.equal(out[[2, 0]].cpu(), table.cpu()[[4, 40]]) and not out[1].any()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_host_gather_unchecked_bad_ids_never_read_or_write_out_of_bounds(backend, device):
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    out = torch.zeros(4, 2, 8, device=device)
    ids = torch.tensor([1, VOCAB, 2, -5], device=device)
    rows = torch.tensor([0, 1, 99, 3], device=device)  # row 99 does not exist: skipped
    mk.tol_host_gather(table, ids, out, rows, backend=backend, check_ids=False)
    assert torch.equal(out[0].cpu(), table.cpu()[1])
    assert torch.isnan(out[[1, 3]]).all() and not out[2].any()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_host_gather_bad_input_raises_before_writing(backend, device):
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    out = torch.zeros(4, 2, 8, device=device)
    cases = [
        ((table, torch.tensor([0, VOCAB], device=device), out), IndexError, rf"id {VOCAB} .*V={VOCAB}"),
        ((table, torch.tensor([-1], device=device), out), IndexError, rf"id -1 .*V={VOCAB}"),
        ((table, torch.tensor([1], device=device), out, torch.tensor([4], device=device)), IndexError,
         r"destination row 4 .*\[0, 4\)"),
        ((table, torch.tensor([1.0], device=device), out), TypeError, "ids must be int32 or int64"),
        ((table, torch.tensor([[1]], device=device), out), ValueError, "1-D"),
        ((table, torch.tensor([1], device=device), out.half()), TypeError, "dtype"),
        ((table, torch.tensor([1], device=device), torch.zeros(4, 3, 8, device=device)), ValueError, "row shape"),
        ((table, torch.tensor([1, 2, 3, 4, 5], device=device), out), ValueError, "out has 4 rows for 5 ids"),
        ((table.transpose(1, 2), torch.tensor([1], device=device), torch.zeros(4, 8, 2, device=device)), ValueError,
         "dense"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            mk.tol_host_gather(*args, backend=backend)
        assert not out.any(), f"a failed call ({match}) wrote into out"


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_host_gather_refuses_an_out_that_shares_memory(backend, device):
    """out given as its own table gave a different result per backend (each read rows that another program had
    overwritten, at another time); an expand()ed out, whose elements share memory, was written by racing programs
    (the reference refused it with torch's own error). ValueError on every backend before anything is written; the
    raw Triton and C++ ops refuse them too (RuntimeError: the C++ ones wrote without a word)."""
    table = torch.arange(VOCAB * 2 * 8, dtype=torch.float32).view(VOCAB, 2, 8).to(device)
    before, base = table.clone(), torch.zeros(1, 2, 8, device=device)
    ids = torch.tensor([3, 1, 2], device=device)
    cases = [((table, ids, table, torch.tensor([1, 2, 0], device=device)), "out shares memory with table"),
             ((table, ids, table[2:5]), "out shares memory with table"),  # a view overlapping the rows it reads
             ((table, ids, base.expand(3, 2, 8)), "out has elements that share memory")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            mk.tol_host_gather(*args, backend=backend)
        raw = {"triton": torch.ops.memllm.tol_host_gather_triton, "cpu": torch.ops.memllm.tol_host_gather,
               "cuda": torch.ops.memllm.tol_host_gather}.get(backend)
        if raw is not None:
            with pytest.raises(RuntimeError, match=match):
                raw(*args)
    assert torch.equal(table, before) and not base.any()
    out = torch.zeros(3, 2, 8, device=device)
    assert mk.tol_host_gather(table[:3], ids - 1, out, backend=backend) is out  # apart: as before
    assert torch.equal(out, table[ids - 1])


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[1] == "cuda"])
def test_host_ops_refuse_pageable_host_memory_on_gpu(backend, device):
    """Ordinary (pageable) host memory has no device address: refused by every GPU backend, the raw Triton ops
    included (they would have read it by its host address: an illegal memory access)."""
    table = torch.randn(VOCAB, 2, 8)
    out = torch.zeros(2, 2, 8, device=device)
    ids = torch.tensor([1, 2], device=device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    hidden = torch.zeros(2, 8, device=device)
    calls = [lambda: mk.tol_host_gather(table, ids, out, backend=backend),
             lambda: mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, 1, backend=backend)]
    if backend == "triton":
        calls += [lambda: torch.ops.memllm.tol_host_gather_triton(table, ids, out),
                  lambda: torch.ops.memllm.tol_cached_gather_add_triton_(hidden, ids, slot_map, cache, table, 1)]
    for call in calls:
        with pytest.raises(RuntimeError, match="pageable host memory"):
            call()
    assert not out.any() and not hidden.any()


# ================================================================ tol_cached_gather_add
@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("layer", LAYERS, ids=["VxD", "VxLxD"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("hidden_dtype,table_dtype", DTYPE_PAIRS, ids=str)
def test_cached_gather_add_matches_full_table(backend, device, hidden_dtype, table_dtype, T, d, layer):
    shape = (VOCAB, d) if layer is None else (VOCAB, layer + 1, d)
    table = host_table(shape, table_dtype, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    hidden = torch.randn(T, d, device=device).to(hidden_dtype)
    # int32 ids at odd T, int64 at even T: both index types without doubling the matrix
    ids = torch.randint(0, VOCAB, (T,), device=device, dtype=torch.int32 if T % 2 else torch.int64)
    if T >= 2:
        ids[0] = ids[1] = VOCAB - 1  # the largest id, repeated
    before = hidden.clone()
    out = mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, layer, backend=backend)
    assert torch.equal(hidden, before)
    full = table.to(device)
    assert_matches_reference(out, hidden, ids, full, layer)
    assert mk.tol_cached_gather_add_(hidden, ids, slot_map, cache, table, layer, backend=backend) is hidden
    assert_matches_reference(hidden, before, ids, full, layer)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cached_gather_add_float64_table(backend, device, hidden_dtype):
    """A float64 table (hits and misses) sums in float64 and reaches a 16-bit hidden through float32, as
    tol_gather_add does (see test_float64_operands there: 2^-8 + 2^-30 over 1 tells the roundings apart)."""
    table = host_table((VOCAB, 3, 16), torch.float64, device)
    table[:, 2, :2] = torch.tensor([2**-8 + 2**-30, 2**-11 + 2**-40], dtype=torch.float64)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    hidden = torch.ones(VOCAB, 16, device=device).to(hidden_dtype)
    ids = torch.arange(VOCAB, device=device)  # every token: the cached ones hit, the rest miss
    out = mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, 2, backend=backend)
    assert_matches_reference(out, hidden, ids, table.to(device), 2)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_cached_gather_add_unchecked_bad_ids_give_nan_rows(backend, device, inplace):
    """check_ids=False: an id outside [0, V) (negative, V, far past V) reads nothing and gives a NaN row, on a hit
    path's slot lookup too; the other rows stay exact. The reference, the spec, says the same."""
    table = host_table((VOCAB, 3, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([1, -1, VOCAB, 5, -(2**40), 2**40], device=device)
    hidden = torch.randn(6, 8, device=device)
    before = hidden.clone()
    fn = mk.tol_cached_gather_add_ if inplace else mk.tol_cached_gather_add
    out = fn(hidden, ids, slot_map, cache, table, 2, backend=backend, check_ids=False)
    assert torch.isnan(out[[1, 2, 4, 5]]).all()
    good = torch.tensor([0, 3], device=device)
    assert_matches_reference(out[good], before[good], ids[good], table.to(device), 2)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_cached_gather_add_with_an_empty_cache_and_huge_vocabulary(backend, device):
    """C = 0 (every lookup a miss, slots past the cache included) and the 1b vocabulary's last ids."""
    V = 128_256
    table = host_table((V, 2, 8), torch.bfloat16, device)
    slot_map = torch.full((V,), -1, dtype=torch.int32, device=device)
    slot_map[V - 1] = 3  # a slot outside the empty cache: a miss
    cache = torch.zeros(0, 2, 8, dtype=torch.bfloat16, device=device)
    ids = torch.tensor([V - 1, 0, V - 2, V - 1], device=device, dtype=torch.int32)
    hidden = torch.randn(4, 8, device=device, dtype=torch.bfloat16)
    out = mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, 1, backend=backend)
    assert_matches_reference(out, hidden, ids, table.to(device), 1)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_cached_gather_add_refuses_a_hidden_whose_elements_share_memory(backend, device):
    table = host_table((VOCAB, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    base = torch.zeros(1, 8, device=device)
    with pytest.raises(RuntimeError, match="share memory|single memory location"):
        mk.tol_cached_gather_add_(base.expand(4, 8), torch.tensor([1, 2, 3, 4], device=device), slot_map, cache,
                                  table, backend=backend)
    assert not base.any()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_cached_gather_add_refuses_a_hidden_that_shares_memory_with_its_inputs(backend, device):
    """hidden written in place as a view of the cache it reads would read rows it already overwrote: refused on
    every backend (the reference included, as tol_gather_add_), and the cache is left alone."""
    table = host_table((VOCAB, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    before = cache.clone()
    with pytest.raises(RuntimeError, match="shares memory"):
        mk.tol_cached_gather_add_(cache[:4], torch.tensor([1, 2, 3, 4], device=device), slot_map, cache, table,
                                  backend=backend)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_cached_gather_add_refuses_a_hidden_that_shares_memory_with_the_slot_map(backend, device):
    """The ops read slot_map[id] while writing hidden: a hidden over the slot map's bytes had a later row read a slot
    entry an earlier row had overwritten (a hit read as a miss: 7.0 off on the C++ op, d=65536, a row per
    thread chunk). Refused on every backend; one buffer with the two apart is fine."""
    table = host_table((VOCAB, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    buf = torch.zeros(16 + VOCAB, dtype=torch.int32, device=device)
    hidden = buf[:16].view(torch.float32).view(2, 8)
    ids = torch.tensor([1, 2], device=device)
    for shared in (buf[8:8 + VOCAB], buf[16:16 + VOCAB]):  # over hidden's second row, then just after it
        buf.zero_()
        shared.copy_(slot_map)
        if shared.data_ptr() < hidden[1].data_ptr() + 32:
            with pytest.raises(RuntimeError, match="shares memory with ids"):
                mk.tol_cached_gather_add_(hidden, ids, shared, cache, table, backend=backend)
        else:
            want = hidden.cpu() + table.cpu()[ids.cpu()]
            assert torch.equal(mk.tol_cached_gather_add_(hidden, ids, shared, cache, table, backend=backend).cpu(),
                               want)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_offload_ops_refuse_forward_mode_ad(backend, device):
    """torch gives the custom ops no forward derivative: with forward-AD dual tensors tol_host_gather and the cached
    gather-adds returned no tangent on the C++ and Triton backends, without a word. They raise now (as
    tol_gather_add), before anything is written; the reference differentiates."""
    import torch.autograd.forward_ad as fwAD

    table = host_table((VOCAB, 2, 8), torch.float64, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([1, 2, 1], device=device)
    hidden = torch.randn(3, 8, dtype=torch.float64, device=device)
    calls = {"tol_cached_gather_add": lambda h: mk.tol_cached_gather_add(h, ids, slot_map, cache, table, 1,
                                                                         backend=backend),
             "tol_cached_gather_add_": lambda h: mk.tol_cached_gather_add_(h, ids, slot_map, cache, table, 1,
                                                                           backend=backend)}
    with fwAD.dual_level():
        for name, call in calls.items():
            dual = fwAD.make_dual(hidden.clone(), torch.ones_like(hidden))
            if backend == "reference":
                assert torch.equal(fwAD.unpack_dual(call(dual)).tangent, torch.ones_like(hidden)), name
                continue
            with pytest.raises(NotImplementedError, match=f"^{name}: forward-mode AD .* backend '{backend}'"):
                call(dual)
            assert torch.equal(fwAD.unpack_dual(dual).primal, hidden), name  # nothing written
        if device == "cpu":  # a dual table (tol_host_gather reads CPU tables only there)
            out = torch.zeros(3, 2, 8, dtype=torch.float64)
            dual = fwAD.make_dual(table, torch.ones_like(table))
            if backend == "reference":
                mk.tol_host_gather(dual, ids, out, backend=backend)
                assert torch.equal(fwAD.unpack_dual(out).tangent, torch.ones(3, 2, 8, dtype=torch.float64))
            else:
                with pytest.raises(NotImplementedError, match="^tol_host_gather: forward-mode AD"):
                    mk.tol_host_gather(dual, ids, out, backend=backend)
                assert not out.any()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_raw_writing_ops_refuse_grad_and_bump_versions(backend, device):
    """Called raw, the ops that write in place refuse a tensor that requires grad before writing (the C++ ones wrote
    it with no error) and move the written tensor's version counter (the C++ ones left it unchanged)."""
    suffix = "_triton" if backend == "triton" else ""
    host_gather, cached_ = (getattr(torch.ops.memllm, f"tol_host_gather{suffix}"),
                            getattr(torch.ops.memllm, f"tol_cached_gather_add{suffix}_"))
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([3, 1], device=device)
    out = torch.zeros(2, 2, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="out requires grad, but this op writes in place and has no autograd"):
        host_gather(table, ids, out)
    assert not out.detach().any()
    hidden = torch.zeros(2, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="hidden requires grad"):
        cached_(hidden, ids, slot_map, cache, table, 1)
    assert not hidden.detach().any()
    out, hidden = out.detach(), hidden.detach()
    versions = out._version, hidden._version
    host_gather(table, ids, out)
    cached_(hidden, ids, slot_map, cache, table, 1)
    assert out._version > versions[0] and hidden._version > versions[1]
    assert torch.equal(out, table.to(device)[ids]) and torch.equal(hidden, table.to(device)[ids, 1])


def test_offload_fake_kernels_refuse_meta_tensors_mixed_with_real_ones():
    """A call mixing a meta tensor with real ones reaches the fake kernel (the Meta key): it raises instead of
    returning an uninitialised tensor or doing nothing."""
    table = torch.randn(VOCAB, 2, 8)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, "cpu")
    meta_ids = torch.tensor([1, 2], device="meta")
    out, first, slots = torch.zeros(2, 2, 8), torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    calls = [
        lambda: torch.ops.memllm.tol_host_gather(table, meta_ids, out, None, True),
        lambda: torch.ops.memllm.tol_cached_gather_add(torch.randn(2, 8), meta_ids, slot_map, cache, table, 1, True),
        lambda: torch.ops.memllm.tol_cached_gather_add_(torch.randn(2, 8), meta_ids, slot_map, cache, table, 1, True),
        lambda: torch.ops.memllm.tol_cache_prefetch(meta_ids, slot_map, cache, table, out, first, slots, 0, None, True),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="meta device cannot be mixed"):
            call()
    _, state = _admit_state(VOCAB, CACHE, "lru", table, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="meta device cannot be mixed"):
        torch.ops.memllm.tol_cache_admit(meta_ids, first, slots, out, *state)
    assert not out.any()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_cached_gather_add_reads_the_cache_on_hits(backend, device):
    """A hit reads the cache slot, not the host row: marked cache rows show up in the output."""
    table = host_table((VOCAB, 2, 16), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    cache.fill_(1000.0)  # every cached row now differs from the table
    ids = torch.arange(VOCAB, device=device)
    out = mk.tol_cached_gather_add(torch.zeros(VOCAB, 16, device=device), ids, slot_map, cache, table, 1,
                                   backend=backend)
    hit = ((slot_map >= 0) & (slot_map < CACHE)).cpu()
    assert int(hit.sum()) == CACHE
    assert (out.cpu()[hit] == 1000.0).all()
    assert torch.equal(out.cpu()[~hit], table.cpu()[~hit, 1])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_cached_gather_add_strided_and_leading_dims(backend, device):
    table = host_table((VOCAB, 3, 64), torch.bfloat16, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    hidden = torch.randn(5, 3, 64, device=device, dtype=torch.bfloat16).transpose(0, 1)  # [3, 5, 64], strided
    ids = torch.randint(0, VOCAB, (3, 5), device=device)
    assert not hidden.is_contiguous()
    out = mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, 1, backend=backend)
    assert_matches_reference(out, hidden, ids, table.to(device), 1)
    before = hidden.clone()
    mk.tol_cached_gather_add_(hidden, ids, slot_map, cache, table, 1, backend=backend)
    assert_matches_reference(hidden, before, ids, table.to(device), 1)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_cached_gather_add_bad_input_raises(backend, device, inplace):
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    h = torch.randn(3, 8, device=device)
    ids = torch.tensor([0, 1, 2], device=device)
    fn = mk.tol_cached_gather_add_ if inplace else mk.tol_cached_gather_add
    cases = [
        ((h, torch.tensor([0, VOCAB, 2], device=device), slot_map, cache, table, 0), IndexError, rf"id {VOCAB} .*V={VOCAB}"),
        ((h, ids, slot_map.long(), cache, table, 0), TypeError, "slot_map must be int32"),
        ((h, ids, slot_map[:-1], cache, table, 0), ValueError, "slot_map must be \\[V\\]"),
        ((h, ids, slot_map, cache.double(), table, 0), TypeError, "dtype"),
        ((h, ids, slot_map, cache, table[:, :1], 0), ValueError, "row shape"),
        ((h, ids, slot_map, cache, table, 2), IndexError, "layer=2 is outside"),
        ((h, ids.float(), slot_map, cache, table, 0), TypeError, "ids must be int32 or int64"),
    ]
    before = h.clone()
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn(*args, backend=backend)
        assert torch.equal(h, before)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_offload_ops_refuse_a_check_ids_that_is_not_a_bool_and_a_layer_that_is_not_an_int(backend, device):
    """check_ids='no' failed in pybind on the compiled backends ("Expected a value of type 'bool'") and read as True
    on the others; None read as False everywhere, silently skipping the range check. The CPU kernels of
    tol_cached_gather_add(_) read a layer True or torch.tensor(1.9) as layer 1, where the other backends refused
    it. TypeError naming the argument."""
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([1, VOCAB], device=device)  # a bad id, which None let through
    out, hidden = torch.zeros(2, 2, 8, device=device), torch.zeros(2, 8, device=device)
    calls = {"tol_host_gather": lambda v: mk.tol_host_gather(table, ids, out, backend=backend, check_ids=v),
             "tol_cached_gather_add": lambda v: mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, 1,
                                                                         backend=backend, check_ids=v),
             "tol_cached_gather_add_": lambda v: mk.tol_cached_gather_add_(hidden, ids, slot_map, cache, table, 1,
                                                                           backend=backend, check_ids=v)}
    for op, call in calls.items():
        for v in ("no", None, 1):
            with pytest.raises(TypeError, match=f"{op}: check_ids must be True or False, got {type(v).__name__}"):
                call(v)
    for layer in (True, torch.tensor(1.9), 1.0):
        got = type(layer).__name__
        for f in (mk.tol_cached_gather_add, mk.tol_cached_gather_add_):
            with pytest.raises(TypeError, match=f"{f.__name__}: layer must be an int or None, got {got}"):
                f(hidden, ids[:1], slot_map, cache, table, layer, backend=backend)
    assert not out.any() and not hidden.any()


@pytest.mark.parametrize("device", DEVICES)
def test_cached_gather_add_compiled_op_checks_its_inputs(device):
    """torch.ops.memllm.tol_cached_gather_add checks in C++ too (RuntimeError; TypeError for dtypes, IndexError for ids)."""
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    h = torch.randn(2, 8, device=device)
    with pytest.raises(IndexError, match=rf"id {VOCAB} .*V={VOCAB}"):
        torch.ops.memllm.tol_cached_gather_add(h, torch.tensor([1, VOCAB], device=device), slot_map, cache, table, 0)
    with pytest.raises(TypeError, match="slot_map must be int32"):
        torch.ops.memllm.tol_cached_gather_add(h, torch.tensor([1, 2], device=device), slot_map.long(), cache, table, 0)
    with pytest.raises(RuntimeError, match="row shape"):
        torch.ops.memllm.tol_cached_gather_add(h, torch.tensor([1, 2], device=device), slot_map, cache, table[:, :1], 0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_ops_check_their_inputs_in_cpp_too(device):
    """The wrappers of tol_host_gather, tol_cache_prefetch and tol_cache_admit check in Python and call the ops
    with check_ids=False; called directly, the C++/CUDA ops make the same checks themselves, writing nothing."""
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    out = torch.zeros(3, 2, 8, device=device)
    first, slots = (torch.zeros(3, dtype=torch.int32, device=device) for _ in range(2))
    bad_ids = torch.tensor([0, VOCAB, 1], device=device)
    with pytest.raises(IndexError, match=rf"id {VOCAB} .*V={VOCAB}"):
        torch.ops.memllm.tol_host_gather(table, bad_ids, out, None, True)
    with pytest.raises(IndexError, match=r"destination row 7"):
        torch.ops.memllm.tol_host_gather(table, bad_ids[:1], out, torch.tensor([7], device=device), True)
    with pytest.raises(IndexError, match=rf"id {VOCAB} .*V={VOCAB}"):
        torch.ops.memllm.tol_cache_prefetch(bad_ids, slot_map, cache, table, out, first, slots, 0, None, True)
    with pytest.raises(TypeError, match="first and slots must be int32"):
        torch.ops.memllm.tol_cache_prefetch(bad_ids, slot_map, cache, table, out, first.long(), slots, 0, None, False)
    _, state = _admit_state(VOCAB, CACHE, "lru", table, device, seed=0)
    with pytest.raises(TypeError, match="slot_map must be int32"):
        torch.ops.memllm.tol_cache_admit(bad_ids, first, slots, out, state[0].long(), *state[1:])
    assert not out.any() and not first.any() and not slots.any()


@pytest.mark.requires_triton_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs a second GPU: tensors on a device that is not the current one")
def test_triton_row_ops_on_a_gpu_that_is_not_current():
    """Triton launches on the current device: each op must switch to its tensors' (cuda:1 here; the host table
    is pinned for every device)."""
    assert torch.cuda.current_device() == 0
    dev = "cuda:1"
    table = host_table((VOCAB, 3, 24), torch.float32, dev)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, dev)
    ids = torch.tensor([0, 5, 5, VOCAB - 1], device=dev)
    out = torch.zeros(4, 3, 24, device=dev)
    mk.tol_host_gather(table, ids, out, backend="triton")
    assert torch.equal(out.cpu(), table[ids.cpu()])
    hidden = torch.randn(4, 24, device=dev)
    want = hidden.cpu() + table[ids.cpu(), 1]
    assert torch.equal(mk.tol_cached_gather_add(hidden, ids, slot_map, cache, table, 1, backend="triton").cpu(), want)
    assert torch.equal(mk.tol_gather_add(hidden, ids, table.to(dev), 1, backend="triton").cpu(), want)
    torch.cuda.synchronize(dev)


# ================================================================ tol_cache_prefetch
@pytest.mark.parametrize("backend,device", NO_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [0, 1, 6, 300, 3000])  # 3000: past the CUDA kernel's 1024-position scan
def test_cache_prefetch_matches_reference(backend, device, dtype, n):
    table = host_table((VOCAB, 4, 24), dtype, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.randint(0, VOCAB, (n,), device=device)
    if n >= 2:
        ids[1] = ids[0]  # a repeat
    if n >= 6:  # the tokens whose slots lie outside [0, C): misses with slot -1
        ids[2:4] = ((slot_map < -1) | (slot_map >= CACHE)).nonzero().flatten()
    out = torch.zeros(max(n, 1), 4, 24, dtype=dtype, device=device)
    first = torch.full((n,), -7, dtype=torch.int32, device=device)
    slots = torch.full((n,), -7, dtype=torch.int32, device=device)
    for lb, le in [(0, 1), (1, 3), (3, None)]:  # in layer groups, as the engine launches it
        mk.tol_cache_prefetch(ids, slot_map, cache, table, out, first, slots, lb, le, backend=backend)
    e_first = oref.first_occurrence(ids.cpu())
    assert torch.equal(first.cpu(), e_first)
    s = slot_map.cpu()[ids.cpu().long()]
    assert torch.equal(slots.cpu(), torch.where((s >= 0) & (s < CACHE), s, -1))
    if n:
        assert torch.equal(out.cpu()[first.cpu().long()], table.cpu()[ids.cpu()])  # each position's rows
        if n >= 2:
            assert first[1] == 0 and not out[1].any()  # a repeat's own row is left alone
    want = torch.zeros_like(out)
    oref.tol_cache_prefetch(ids, slot_map, cache, table, want, first.clone(), slots.clone())
    assert torch.equal(out.cpu(), want.cpu())


@pytest.mark.parametrize("backend,device", NO_TRITON)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_cache_prefetch_unchecked_bad_ids_give_nan_rows_and_no_slot(backend, device, id_dtype):
    table = host_table((VOCAB, 2, 8), torch.float16, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([3, -1, VOCAB, 3, 2**31 - 1], device=device, dtype=id_dtype)
    out = torch.zeros(5, 2, 8, dtype=torch.float16, device=device)
    first = torch.zeros(5, dtype=torch.int32, device=device)
    slots = torch.zeros(5, dtype=torch.int32, device=device)
    mk.tol_cache_prefetch(ids, slot_map, cache, table, out, first, slots, backend=backend, check_ids=False)
    assert first.tolist() == [0, 1, 2, 0, 4]
    assert slots.tolist()[1:3] + slots.tolist()[4:] == [-1, -1, -1]
    assert torch.equal(out[0].cpu(), table.cpu()[3]) and torch.isnan(out[[1, 2, 4]]).all() and not out[3].any()
    # The same ids 300 times (1500 positions: the CUDA kernel's first positions come from a [V] scratch, bad ids
    # from the scan): the first position of each value, bad ones included, as for a short step.
    long_ids = ids.repeat(300)
    out = torch.zeros(1500, 2, 8, dtype=torch.float16, device=device)
    first = torch.zeros(1500, dtype=torch.int32, device=device)
    slots = torch.zeros(1500, dtype=torch.int32, device=device)
    mk.tol_cache_prefetch(long_ids, slot_map, cache, table, out, first, slots, backend=backend, check_ids=False)
    assert first.tolist() == [0, 1, 2, 0, 4] * 300
    assert torch.equal(out[0].cpu(), table.cpu()[3]) and torch.isnan(out[[1, 2, 4]]).all()
    assert not out[3].any() and not out[5:].any()  # repeats' own rows are left alone


@pytest.mark.parametrize("backend,device", NO_TRITON)
def test_cache_prefetch_bad_input_raises(backend, device):
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    out = torch.zeros(3, 2, 8, device=device)
    first = torch.zeros(3, dtype=torch.int32, device=device)
    slots = torch.zeros(3, dtype=torch.int32, device=device)
    with pytest.raises(IndexError, match=rf"id {VOCAB} .*V={VOCAB}"):
        mk.tol_cache_prefetch(torch.tensor([0, VOCAB, 1], device=device), slot_map, cache, table, out, first, slots,
                              backend=backend)
    with pytest.raises(IndexError, match=r"layers \[1, 3\)"):
        mk.tol_cache_prefetch(torch.tensor([0, 2, 1], device=device), slot_map, cache, table, out, first, slots, 1, 3,
                              backend=backend)
    with pytest.raises(ValueError, match="contiguous \\[N\\]"):
        mk.tol_cache_prefetch(torch.tensor([0, 2], device=device), slot_map, cache, table, out, first, slots,
                              backend=backend)
    assert not out.any() and not first.any() and not slots.any()
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        mk.tol_cache_prefetch(torch.tensor([0, 2, 1], device=device), slot_map, cache, table, out, first, slots,
                              backend="triton")


@pytest.mark.parametrize("backend,device", NO_TRITON)
def test_cache_ops_refuse_outputs_that_share_memory(backend, device):
    """tol_cache_prefetch took first given as slots, an expand()ed out and out given as a table it reads (the
    results then depended on the order of the kernel's writes); tol_cache_admit likewise a state tensor that is also
    an input. ValueError on every backend, before anything is written; the raw C++ ops refuse them too
    (RuntimeError: they wrote without a word)."""
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([4, 1, 4], device=device)
    out = torch.zeros(3, 2, 8, device=device)
    first, slots = (torch.zeros(3, dtype=torch.int32, device=device) for _ in range(2))
    snapshot = [t.clone() for t in (slot_map, cache, table)]
    cases = [(dict(slots=first), "first shares memory with slots"),
             (dict(out=torch.zeros(1, 2, 8, device=device).expand(3, 2, 8)), "out has elements that share memory"),
             (dict(out=cache[:3]), "out shares memory with cache"),
             (dict(first=slot_map[:3]), "first shares memory with slot_map")]
    for change, match in cases:
        args = dict(ids=ids, slot_map=slot_map, cache=cache, host_table=table, out=out, first=first, slots=slots)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            mk.tol_cache_prefetch(**args, backend=backend)
        if backend != "reference":
            with pytest.raises(RuntimeError, match=match):
                torch.ops.memllm.tol_cache_prefetch(**args)
    assert not out.any() and not first.any() and not slots.any()
    assert all(torch.equal(a, b) for a, b in zip((slot_map, cache, table), snapshot))
    _, state = _admit_state(VOCAB, CACHE, "lru", table, device, seed=0)
    before = [t.clone() for t in state]
    names = ["ids", "first", "slots", "rows", "slot_map", "owner", "last_use", "admitted_at", "cache", "counters"]
    for change, match in [(dict(first=state[1][:3]), "owner shares memory with first"),
                          (dict(rows=state[4][:3]), "cache shares memory with rows"),
                          (dict(counters=state[3][:7]), "admitted_at shares memory with counters")]:
        args = dict(zip(names, [ids, first, slots, out] + state))
        args.update(change)
        with pytest.raises(ValueError, match=match):
            mk.tol_cache_admit(**args, backend=backend)
        if backend != "reference":
            with pytest.raises(RuntimeError, match=match):
                torch.ops.memllm.tol_cache_admit(**args)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


@pytest.mark.parametrize("backend,device", NO_TRITON)
def test_cache_prefetch_refuses_non_integer_layers_and_non_bool_check_ids(backend, device):
    """layer_begin / layer_end 0.0 failed in pybind ("Expected a value of type 'int'") or, on the reference, as a
    slice index; a tensor layer_end was read by its __index__ (torch.tensor(2.5) as 2). check_ids='no' was taken as
    True and None as False. TypeError naming the argument, before anything is written."""
    table = host_table((VOCAB, 3, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([4, 1], device=device)
    out = torch.zeros(2, 3, 8, device=device)
    first, slots = (torch.zeros(2, dtype=torch.int32, device=device) for _ in range(2))
    for kwargs, match in [(dict(layer_begin=0.0), "layer_begin must be an int, got float"),
                          (dict(layer_begin=torch.tensor(0)), "layer_begin must be an int, got Tensor"),
                          (dict(layer_begin=True), "layer_begin must be an int, got bool"),
                          (dict(layer_end=0.0), "layer_end must be an int or None, got float"),
                          (dict(layer_end=torch.tensor(2.5)), "layer_end must be an int or None, got Tensor"),
                          (dict(check_ids="no"), "check_ids must be True or False, got str"),
                          (dict(check_ids=None), "check_ids must be True or False, got NoneType")]:
        with pytest.raises(TypeError, match=f"tol_cache_prefetch: {match}"):
            mk.tol_cache_prefetch(ids, slot_map, cache, table, out, first, slots, backend=backend, **kwargs)
    assert not out.any() and not first.any() and not slots.any()
    mk.tol_cache_prefetch(ids, slot_map, cache, table, out, first, slots, np.int64(1), np.int32(3), backend=backend)
    assert torch.equal(out[:, 1:].cpu(), table.cpu()[[4, 1], 1:]) and not out[:, 0].any()


def _admit_state(V, C, policy, table, device, seed):
    """A CacheDirectory after preload and tol_cache_admit's state mirroring it: (directory, [slot_map, owner,
    last_use, admitted_at, cache, counters])."""
    hot = np.random.default_rng(seed).permutation(V)[:C].tolist()
    directory = CacheDirectory(V, C, policy, hot, 0.5)
    slot_map = torch.full((V,), -1, dtype=torch.int32)
    owner = torch.full((C,), -1, dtype=torch.int32)
    last_use = torch.full((C,), -1 if policy != "static" else oref.HOT_STAMP, dtype=torch.int64)
    cache = torch.zeros((C,) + tuple(table.shape[1:]), dtype=table.dtype)
    for tok, slot in directory.preload():
        slot_map[tok], owner[slot], last_use[slot] = slot, tok, oref.HOT_STAMP
        cache[slot] = table[tok].cpu()
    state = [slot_map, owner, last_use, torch.full((C,), -1, dtype=torch.int64), cache,
             torch.zeros(len(oref.ADMIT_COUNTERS), dtype=torch.int64)]
    return directory, [t.to(device) for t in state]


@pytest.mark.parametrize("backend,device", NO_TRITON)
@pytest.mark.parametrize("policy", ["lru", "hot+lru", "static"])
@pytest.mark.parametrize("dtype,row", [(torch.float32, (3, 24)), (torch.bfloat16, (2, 7))], ids=["fp32", "bf16-odd"])
def test_cache_admit_decides_like_the_host_directory(backend, device, policy, dtype, row):
    """tol_cache_admit after tol_cache_prefetch, step by step: the same slot map as CacheDirectory.access of the
    step's distinct tokens, the same state as the reference, each occupied slot holding its token's rows, and
    counters that agree with the directory's admissions and evictions. Steps of 0 to 12 ids with repeats, more
    distinct tokens than the tail has slots (the step's own admissions are never victims)."""
    V, C = 61, 10
    table = host_table((V,) + row, dtype, device)
    directory, state = _admit_state(V, C, policy, table, device, seed=len(policy))
    _, expected = _admit_state(V, C, policy, table, "cpu", seed=len(policy))
    rng = np.random.default_rng(3)
    hits = 0
    for step in range(150):
        n = int(rng.integers(0, 13))
        ids = torch.from_numpy((rng.zipf(1.3, n) % V).astype(np.int64))
        buf = torch.zeros((max(n, 1),) + row, dtype=dtype, device=device)
        first = torch.empty(n, dtype=torch.int32, device=device)
        slots = torch.empty(n, dtype=torch.int32, device=device)
        mk.tol_cache_prefetch(ids.to(device), state[0], state[4], table, buf, first, slots, backend=backend)
        hits += int((slots >= 0).sum())
        mk.tol_cache_admit(ids.to(device), first, slots, buf, *state, backend=backend)
        oref.tol_cache_admit(ids, first.cpu(), slots.cpu(), buf.cpu(), *expected)
        directory.access(dict.fromkeys(ids.tolist()))
        for got, want in zip(state, expected):
            assert torch.equal(got.cpu(), want), f"step {step}"
        assert np.array_equal(state[0].cpu().numpy(), directory.slot_of), f"step {step}: not the directory's decision"
    owner = state[1].cpu()
    occupied = (owner >= 0).nonzero().reshape(-1)
    assert torch.equal(state[4].cpu()[occupied], table.cpu()[owner[occupied].long()])
    c = dict(zip(oref.ADMIT_COUNTERS, state[5].tolist()))
    assert (c["admissions"], c["evictions"], c["step"], c["hits"]) == (directory.admissions, directory.evictions,
                                                                       150, hits)
    assert policy == "static" or c["evictions"] > 0


@pytest.mark.parametrize("backend,device", NO_TRITON)
def test_cache_admit_skips_bad_ids_and_refuses_bad_input(backend, device):
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    _, state = _admit_state(VOCAB, CACHE, "lru", table, device, seed=0)
    ids = torch.tensor([VOCAB + 3, -1, 4], device=device)  # the prefetch ran with check_ids=False
    buf = torch.zeros(3, 2, 8, device=device)
    first = torch.arange(3, dtype=torch.int32, device=device)
    slots = torch.full((3,), -1, dtype=torch.int32, device=device)
    mk.tol_cache_admit(ids, first, slots, buf, *state, backend=backend)
    assert (state[0].cpu() >= 0).nonzero().reshape(-1).tolist() == [4] and state[1].cpu()[0] == 4  # token 4 only
    snapshot = [t.clone() for t in state]
    bad = [
        (TypeError, "first must be int32", dict(first=first.long())),
        (ValueError, "owner must be a contiguous 1-D tensor of 9", dict(owner=state[1][:4])),
        (ValueError, "counters must be a contiguous 1-D tensor of 7", dict(counters=state[5][:3])),
        (ValueError, "last_use must be a contiguous", dict(last_use=torch.zeros(2 * CACHE, dtype=torch.int64,
                                                                                device=device)[::2])),
        (ValueError, "rows has 1 rows for 3 ids", dict(rows=buf[:1])),
        (TypeError, "rows must have cache's dtype", dict(rows=buf.double())),
        (TypeError, "int32 or int64", dict(ids=ids.float())),
    ]
    names = ["ids", "first", "slots", "rows", "slot_map", "owner", "last_use", "admitted_at", "cache", "counters"]
    for exc, msg, change in bad:
        args = dict(zip(names, [ids, first, slots, buf] + state))
        args.update(change)
        with pytest.raises(exc, match=msg):
            mk.tol_cache_admit(**args, backend=backend)
    if device != "cpu":
        with pytest.raises(RuntimeError, match="must be on cache's device"):
            mk.tol_cache_admit(ids, first, slots, buf, state[0].cpu(), *state[1:], backend=backend)
    for got, want in zip(state, snapshot):
        assert torch.equal(got, want)  # nothing changed


# ================================================================ torch.library integration
def _samples(device):
    """Arguments for opcheck. The table is on `device`: opcheck deep-copies its arguments, and a copy of a
    host-tier table is pageable memory, which GPU kernels refuse (the host path is tested above)."""
    table = host_table((VOCAB, 2, 8), torch.float32, device).to(device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([3, 0, 3, VOCAB - 1], device=device)
    return table, slot_map, cache, ids


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    table, slot_map, cache, ids = _samples(device)
    h = torch.randn(4, 8, device=device)
    torch.library.opcheck(torch.ops.memllm.tol_cached_gather_add, (h, ids, slot_map, cache, table, 1))
    torch.library.opcheck(torch.ops.memllm.tol_cached_gather_add, (h.clone().requires_grad_(), ids, slot_map, cache,
                                                                   table, 1))
    torch.library.opcheck(torch.ops.memllm.tol_cached_gather_add_, (h, ids, slot_map, cache, table, 0))
    out = torch.zeros(6, 2, 8, device=device)
    torch.library.opcheck(torch.ops.memllm.tol_host_gather, (table, ids, out))
    torch.library.opcheck(torch.ops.memllm.tol_host_gather, (table, ids, out, torch.tensor([5, 1, 2, 0], device=device)))
    first = torch.zeros(4, dtype=torch.int32, device=device)
    slots = torch.zeros(4, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.memllm.tol_cache_prefetch, (ids, slot_map, cache, table, out, first, slots, 0, 2))
    _, state = _admit_state(VOCAB, CACHE, "hot+lru", table, device, seed=1)
    torch.library.opcheck(torch.ops.memllm.tol_cache_admit, (ids, first, slots, out, *state))


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] == "triton"])
def test_opcheck_triton(backend, device):
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    table, slot_map, cache, ids = _samples(device)
    h = torch.randn(4, 8, device=device)
    torch.library.opcheck(torch.ops.memllm.tol_cached_gather_add_triton, (h, ids, slot_map, cache, table, 1),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.memllm.tol_host_gather_triton, (table, ids, torch.zeros(4, 2, 8, device=device)),
                          test_utils=utils)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_gradcheck_hidden(backend, device):
    table = host_table((VOCAB, 2, 8), torch.float64, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([[4, 0, 4], [1, 4, 2]], device=device)
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h: mk.tol_cached_gather_add(h, ids, slot_map, cache, table, 1, backend=backend), (hidden,))


def test_meta_device():
    h = torch.empty(2, 5, 2048, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(2, 5, device="meta", dtype=torch.long)
    sm = torch.empty(128_256, device="meta", dtype=torch.int32)
    cache = torch.empty(6400, 24, 2048, device="meta", dtype=torch.bfloat16)
    host = torch.empty(128_256, 24, 2048, device="meta", dtype=torch.bfloat16)  # the 1b table, allocates nothing
    out = torch.ops.memllm.tol_cached_gather_add(h, ids, sm, cache, host, 23)
    assert out.device.type == "meta" and out.shape == h.shape
    assert torch.ops.memllm.tol_cache_prefetch(ids.view(-1), sm, cache, host, torch.empty(10, 24, 2048, device="meta",
                                               dtype=torch.bfloat16), ids.view(-1).int(), ids.view(-1).int()) is None
    state = [torch.empty(6400, device="meta", dtype=dt) for dt in (torch.int32, torch.int64, torch.int64)]
    assert torch.ops.memllm.tol_cache_admit(ids.view(-1), ids.view(-1).int(), ids.view(-1).int(), cache, sm, *state,
                                            cache, torch.empty(7, device="meta", dtype=torch.int64)) is None


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    table, slot_map, cache, _ = _samples(device)
    w = torch.randn(8, 8, device=device)

    def f(h, ids):
        h = mk.tol_cached_gather_add(h @ w, ids, slot_map, cache, table, 1, check_ids=False)
        return mk.tol_cached_gather_add_(h, ids, slot_map, cache, table, 0, check_ids=False) * 2

    def spec(h, ids):  # 1e-5: Inductor may order the matmul's sums differently than eager
        h = oref.tol_cached_gather_add(h @ w, ids, slot_map, cache, table, 1)
        return oref.tol_cached_gather_add(h, ids, slot_map, cache, table, 0) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    cached = int(((slot_map >= 0) & (slot_map < CACHE)).nonzero()[0, 0])  # a token whose row is in the cache
    h, ids = torch.randn(3, 8, device=device), torch.tensor([1, cached, VOCAB - 1], device=device)
    torch.testing.assert_close(compiled(h, ids), spec(h, ids), rtol=1e-5, atol=1e-5)
    before = compiled(h, ids)
    cache.add_(1.0)  # read live, not as a constant copy: the hit's row changes
    torch.testing.assert_close(compiled(h, ids), spec(h, ids), rtol=1e-5, atol=1e-5)
    assert not torch.equal(compiled(h, ids), before)


@pytest.mark.parametrize("backend,device", NO_TRITON)
def test_torch_compile_fullgraph_checks_ids(backend, device):
    """The row ops compiled with check_ids=True (the default) check ids and destination rows as in eager
    (IndexError naming them): tracing failed on the Python range checks under fullgraph=True before."""
    table, slot_map, cache, _ = _samples(device)
    N = 3

    def f(h, ids, rows):
        out = torch.zeros(N + 1, *table.shape[1:], device=device)
        first, slots = (torch.zeros(N, dtype=torch.int32, device=device) for _ in range(2))
        if backend != "reference":  # (the reference prefetch, the spec, is eager only: torch.unique)
            mk.tol_cache_prefetch(ids, slot_map, cache, table, out, first, slots, backend=backend)
        mk.tol_host_gather(table, ids, out, rows, backend=backend)
        return mk.tol_cached_gather_add(h, ids, slot_map, cache, table, 1, backend=backend) + out[:N, 1] + first[:, None]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    h, ids, rows = torch.randn(N, 8, device=device), torch.tensor([1, 2, 1], device=device), torch.tensor([3, 0, 2],
                                                                                                         device=device)
    torch.testing.assert_close(compiled(h, ids, rows), f(h, ids, rows), rtol=0, atol=0)
    with pytest.raises(IndexError, match=rf"id {VOCAB} \(at flat position 1 of ids\) is outside \[0, V\)"):
        compiled(h, torch.tensor([1, VOCAB, 1], device=device), rows)
    with pytest.raises(IndexError, match=r"destination row 4 \(at position 2 of rows\) is outside \[0, 4\)"):
        compiled(h, ids, torch.tensor([3, 0, 4], device=device))


# ================================================================ host tiers
def test_host_alloc_is_exact_size_and_honest_about_pinning():
    t = mk.tol_host_alloc([1000, 3, 7], torch.bfloat16)
    assert t.shape == (1000, 3, 7) and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
    assert t.untyped_storage().nbytes() == 1000 * 3 * 7 * 2  # no power-of-two rounding
    t.fill_(1.5)
    assert (t == 1.5).all()
    reason = mk.offload.pin_unavailable_reason()
    assert mk.tol_host_mapped(t) == (reason is None)
    assert not mk.tol_host_mapped(torch.empty(4)) and not mk.tol_host_mapped(t[:0])
    torch.library.opcheck(torch.ops.memllm.tol_host_mapped, (t,))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        mk.tol_host_mapped([1.5, 2.5])
    if reason is None:  # what the flag promises: a GPU kernel reads the rows by address
        out = torch.zeros(2, 3, 7, dtype=torch.bfloat16, device="cuda")
        mk.tol_host_gather(t, torch.tensor([999, 0], device="cuda"), out)
        assert (out == 1.5).all()
        with pytest.raises(RuntimeError, match="pageable"):
            mk.tol_host_gather(t.clone(), torch.tensor([0], device="cuda"), out)
    assert mk.tol_host_alloc([0, 4], torch.float32).shape == (0, 4)
    with pytest.raises(RuntimeError, match="negative size"):  # the wrapper raises ValueError (test below)
        torch.ops.memllm.tol_host_alloc([-1], torch.float32, False)
    for size in ([2**62 + 1], [2**32, 2**31], [2**61, 3, 1]):  # wrapped, the product would map a few bytes
        with pytest.raises(RuntimeError, match="more bytes than an int64 holds"):
            mk.tol_host_alloc(size, torch.float32)
    assert mk.tol_host_alloc([2**62, 0], torch.float32).shape == (2**62, 0)
    torch.library.opcheck(torch.ops.memllm.tol_host_alloc, ([3, 5], torch.float32, False))


def test_host_alloc_refuses_dtypes_and_sizes_it_cannot_hold():
    """The op wraps raw bytes in a tensor of any dtype: a quantized one (no quantizer) segfaulted when printed,
    [0] x qint8 hit an internal assert, and a size 2.5 was truncated to 2. TypeError instead, before anything is
    allocated (the dtype by the op itself, so the raw op refuses it too); floating-point and integer dtypes (raw
    byte buffers) still pass. HostTable.from_tensor of a quantized tensor (it allocates through tol_host_alloc)
    runs in a child process: it segfaulted."""
    for dtype in (torch.qint8, torch.quint8, torch.qint32, torch.complex64, torch.bool, torch.bits8):
        for shape in ([2, 3], [0]):
            with pytest.raises(TypeError, match="tol_host_alloc: dtype must be a floating-point or integer dtype"):
                mk.tol_host_alloc(shape, dtype)
            with pytest.raises(TypeError, match="tol_host_alloc: dtype must be a floating-point or integer dtype"):
                torch.ops.memllm.tol_host_alloc(shape, dtype, False)  # the raw op too
    with pytest.raises(TypeError, match="must be a floating-point or integer torch.dtype, got 'float32'"):
        mk.tol_host_alloc([2], "float32")
    for size in ([2.5, 3], [2, 3.0], [True, 3], [torch.tensor(2.0)]):
        with pytest.raises(TypeError, match="sizes must be integers"):
            mk.tol_host_alloc(size, torch.float32)
    for dtype in (torch.float32, torch.float64, torch.float8_e4m3fn, torch.uint8, torch.int8, torch.int64):
        assert mk.tol_host_alloc([2, 3], dtype).dtype == dtype
    assert mk.tol_host_alloc([np.int64(2), torch.tensor(3)], torch.float32).shape == (2, 3)
    script = textwrap.dedent("""
        import warnings, torch
        from memllm_kernels.offload import HostTable
        warnings.simplefilter("ignore")  # quantize_per_tensor is deprecated
        q = torch.quantize_per_tensor(torch.randn(4, 2, 3), 0.1, 0, torch.qint8)
        try:
            print(HostTable.from_tensor(q).table)
        except TypeError as e:
            print("TypeError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert "TypeError: tol_host_alloc: dtype must be" in out.stdout, out.stdout


def test_host_alloc_takes_an_int_shape_and_refuses_negative_sizes_with_value_error():
    """tol_host_alloc(5, dtype) said "'int' object is not iterable" (torch.empty(5) is 1-D), and a negative size
    raised the op's RuntimeError where a bad value is a ValueError; a shape that is neither an int nor a sequence of
    them is a TypeError naming the shape."""
    assert mk.tol_host_alloc(5, torch.float32).shape == (5,)
    assert mk.tol_host_alloc(np.int64(3), torch.float32).shape == (3,)
    assert mk.tol_host_alloc(torch.Size([2, 3]), torch.float32).shape == (2, 3)
    for shape in (-1, [-1], (2, -1)):
        with pytest.raises(ValueError, match=r"tol_host_alloc: sizes must be >= 0, got \[(2, )?-1\]"):
            mk.tol_host_alloc(shape, torch.float32)
    for shape in (2.5, True, None, torch.tensor(5)):
        with pytest.raises(TypeError, match="tol_host_alloc: shape must be an int or a sequence of ints"):
            mk.tol_host_alloc(shape, torch.float32)


def test_host_alloc_op_raises_where_it_cannot_pin():
    """The op never hands out ordinary memory when asked to pin (the wrapper only asks where it can)."""
    if mk.offload.pin_unavailable_reason() is None:
        pytest.skip("pinning works here")
    with pytest.raises(RuntimeError, match="pin"):
        torch.ops.memllm.tol_host_alloc([4, 4], torch.float32, True)
    assert not mk.tol_host_mapped(mk.tol_host_alloc([4, 4], torch.float32))


def test_host_alloc_frees_its_memory():
    """Repeated 64 MiB allocations (filled, so every page is resident) leave RSS flat: the deleter unmaps."""
    script = textwrap.dedent("""
        import torch, memllm_kernels as mk
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        base = None
        for i in range(12):
            t = mk.tol_host_alloc([64 << 20], torch.uint8)
            t.fill_(i)
            del t
            if i == 1:
                base = rss()
        print(rss() - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < (16 << 20), f"RSS grew by {int(out.stdout.split()[-1]) >> 20} MiB"


def _tol_file(tmp_path, V=VOCAB, L=3, d=16, dtype=torch.float32, name="tol.safetensors"):
    from memllm_kernels.model.tol import write_tol_file

    table = torch.randn(V, L, d).to(dtype)
    path = tmp_path / name
    write_tol_file(path, table.split(7), table.shape, dtype, {"format": "memllm-tol", "config": "{}"})
    return path, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_host_table_and_disk_table_read_the_file(tmp_path, dtype, capsys):
    path, table = _tol_file(tmp_path, dtype=dtype)
    host = HostTable.from_file(path, chunk_bytes=1000, progress=True)  # many small chunks, a progress bar
    assert "host tier <- tol.safetensors" in capsys.readouterr().err
    assert torch.equal(host.table, table) and host.nbytes == table.numel() * table.element_size()
    assert host.pinned == (mk.offload.pin_unavailable_reason() is None)
    assert (host.pin_note is None) == host.pinned
    disk = DiskTable(path, page_cache_bytes=4 * table[0].numel() * table.element_size())
    assert torch.equal(disk.table, table)
    out = torch.empty(5, 3, 16, dtype=dtype)
    disk.willneed([3, 4, 40])
    disk.read_rows(torch.tensor([3, 4, 40, 0, 3]), out)
    assert torch.equal(out, table[[3, 4, 40, 0, 3]])
    assert disk.drops == 1  # 5 rows read past a 4-row bound: the mapping's pages were released
    assert torch.equal(disk.table[40], table[40])  # and re-read on demand
    disk.close()


class _AdviceLog:
    """A DiskTable's mapping, recording each madvise(MADV_WILLNEED) as (start, length)."""

    def __init__(self, disk):
        self._map, self.calls = disk._map, []

    def madvise(self, flag, start=0, length=None):
        import mmap

        if flag == mmap.MADV_WILLNEED:
            self.calls.append((start, length))
        return self._map.madvise(flag, start, *(() if length is None else (length,)))

    def close(self):
        self._map.close()


def _advised(disk, first, rows):
    """The (start, length) of a WILLNEED over rows [first, first + rows): from the page holding the first one."""
    import mmap

    start = disk._offset + first * disk.row_bytes
    lo = start - start % mmap.PAGESIZE
    return lo, start + rows * disk.row_bytes - lo


def test_disk_table_asks_for_its_rows_at_once_one_run_of_tokens_per_madvise(tmp_path):
    """read_rows first asks the kernel for every row (a cold row otherwise faults in one 4 KiB page at a time):
    one WILLNEED per run of consecutive tokens, each covering its rows; repeated and out-of-range ids are skipped."""
    path, table = _tol_file(tmp_path, L=5, d=100)  # 2000-byte rows: not page-aligned
    disk = DiskTable(path)
    log = disk._map = _AdviceLog(disk)
    disk.drop_pages()
    ids = torch.tensor([9, 5, 6, 7, 2, 9, 3])
    out = torch.empty(len(ids), 5, 100)
    disk.read_rows(ids, out)
    assert torch.equal(out, table[ids])
    assert log.calls == [_advised(disk, 2, 2), _advised(disk, 5, 3), _advised(disk, 9, 1)]
    log.calls.clear()
    disk.willneed([-1, VOCAB, VOCAB - 1])
    assert log.calls == [_advised(disk, VOCAB - 1, 1)]
    log.calls.clear()
    disk.willneed(np.array([], dtype=np.int64))
    disk.read_rows(torch.tensor([], dtype=torch.int64), out[:0])
    assert log.calls == []
    disk.close()


def test_cpu_engine_over_the_disk_tier_asks_for_its_misses_only(tmp_path):
    path, table = _tol_file(tmp_path)
    disk = DiskTable(path)
    engine = OffloadEngine(disk, cache_rows=4, policy="static", hot=[1, 2])
    log = disk._map = _AdviceLog(disk)
    engine.prefetch(torch.tensor([[1, 7, 2, 8, 7]]))
    assert log.calls == [_advised(disk, 7, 2)]
    h = torch.zeros(1, 5, table.shape[2])
    engine.gather_add_(h, engine._step.ids, 2)
    assert torch.equal(h, table[[1, 7, 2, 8, 7], 2][None])
    engine.close()


def test_tiers_refuse_missing_truncated_and_mismatched_files(tmp_path):
    from memllm_kernels.model import ModelConfig, Transformer, precompute_tol

    with pytest.raises(FileNotFoundError, match="no ToL file"):
        HostTable.from_file(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="no ToL file"):
        DiskTable(tmp_path / "absent.safetensors")
    path, _ = _tol_file(tmp_path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    for cls in (HostTable.from_file, DiskTable):
        with pytest.raises(ValueError, match="truncated"):
            cls(tmp_path / "cut.safetensors")
    cfg = ModelConfig(kind="memoryllm", vocab_size=60, n_layer=2, d_model=16, n_head=2, block_size=32)
    model = Transformer(cfg).eval()
    precompute_tol(model, tmp_path / "m.safetensors")
    other = Transformer(cfg).eval()  # other weights
    for cls in (HostTable.from_file, DiskTable):
        with pytest.raises(ValueError, match="other weights"):
            cls(tmp_path / "m.safetensors", other)
        with pytest.raises(ValueError, match="does not match"):
            cls(tmp_path / "m.safetensors", Transformer(cfg.replace(n_layer=3)))


def test_host_table_refuses_a_file_cut_while_it_fills(tmp_path, monkeypatch):
    """A file cut after its header was checked, while HostTable.from_file reads it: a ValueError naming how far it
    got, not a loop that reads 0 bytes forever."""
    from memllm_kernels.offload import tiers

    path, table = _tol_file(tmp_path)
    open_tol = tiers._open_tol

    def open_then_cut(p, model=None):
        header = open_tol(p, model)
        os.truncate(p, header[2] + 1000)  # the header's offset + 1000 data bytes
        return header

    monkeypatch.setattr(tiers, "_open_tol", open_then_cut)
    nbytes = table.numel() * table.element_size()
    with pytest.raises(ValueError, match=rf"truncated while reading \(1000 of {nbytes} data bytes\)"):
        HostTable.from_file(path, chunk_bytes=300)


def test_disk_tier_refuses_a_file_truncated_under_it(tmp_path):
    """A ToL file truncated in place while a disk-tier engine maps it: the next step raises an OSError naming the
    file (a read of a vanished page was SIGBUS, which killed the process). In a subprocess, so that a regression
    fails this test instead of killing the test run. Replacing the file (a rename over it) is harmless."""
    path, table = _tol_file(tmp_path, V=2000, L=2, d=1024)  # 8 KiB rows: 4 pages each
    script = textwrap.dedent(f"""
        import os, torch
        from memllm_kernels.offload import DiskTable, OffloadEngine
        path = {str(path)!r}
        disk = DiskTable(path)
        engine = OffloadEngine(disk, cache_rows=4, policy="lru")
        h = torch.zeros(2, 1024)
        ids = torch.tensor([5, 1990])
        engine.prefetch(ids)
        engine.gather_add_(h, ids, 1)
        for ids in (torch.tensor([6, 1991]), torch.tensor([1992]), torch.tensor([7])):
            os.truncate(path, os.path.getsize(path) // 2)
            try:
                engine.prefetch(ids)
            except OSError as e:
                print("refused:", e)
            try:
                disk.read_rows(ids, torch.empty(len(ids), 2, 1024))
            except OSError as e:
                print("refused:", e)
        print("alive")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    lines = out.stdout.splitlines()
    assert lines[-1] == "alive" and len(lines) == 7, out.stdout
    assert all(f"ToL file {path} shrank to" in line and "replace it" in line for line in lines[:-1]), out.stdout


def test_disk_tier_refuses_a_file_rewritten_in_place_at_the_same_size(tmp_path):
    """A same-size copy over the mapped file (shutil.copyfile truncates, then refills): the size check passed, and
    the engine mixed the cache's old rows with the file's new ones. The file's modification time catches it."""
    import shutil

    path, table = _tol_file(tmp_path)
    other, _ = _tol_file(tmp_path, name="other.safetensors")
    os.utime(path, ns=(0, 0))  # so that the write below moves the time, however coarse the file system's clock
    engine = OffloadEngine(DiskTable(path), cache_rows=4, policy="lru")
    _check_step(engine, table, torch.tensor([1, 2]))
    shutil.copyfile(other, path)
    with pytest.raises(OSError, match=f"ToL file {path} was written while mapped"):
        engine.prefetch(torch.tensor([1, 3]))
    with pytest.raises(OSError, match="was written while mapped"):
        engine.source.read_rows(torch.tensor([3]), torch.empty(1, 3, 16))


def test_disk_table_close_leaves_a_taken_view_readable(tmp_path):
    """close() unmapped the file under a tensor taken from `.table` (torch.frombuffer holds no buffer export, so
    mmap.close() did not refuse), and the next read was SIGSEGV. In a subprocess, so that a regression fails
    this test instead of killing the test run."""
    path, table = _tol_file(tmp_path)
    torch.save(table, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import torch
        from memllm_kernels.offload import DiskTable
        disk = DiskTable({str(path)!r})
        view = disk.table
        disk.close()
        print(torch.equal(view, torch.load({str(tmp_path / "want.pt")!r})), disk.closed)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.split() == ["True", "True"]


def test_disk_tier_keeps_reading_a_file_replaced_under_it(tmp_path):
    """memllm precompute --force renames a new file over the old one: a disk tier that maps the old one keeps reading
    its rows (the old inode lives until the mapping goes), with no error."""
    path, table = _tol_file(tmp_path)
    disk = DiskTable(path)
    other, _ = _tol_file(tmp_path, name="new.safetensors")
    other.replace(path)
    out = torch.empty(2, 3, 16)
    disk.read_rows(torch.tensor([3, 40]), out)
    assert torch.equal(out, table[[3, 40]])
    disk.close()
    assert disk.closed


def test_disk_table_refuses_reads_after_close(tmp_path):
    """read_rows, willneed and OffloadEngine(disk) on a closed DiskTable failed with "'NoneType' object has no
    attribute 'shape'": a ValueError naming the file instead, as a closed file's reads. Closing twice is harmless."""
    path, table = _tol_file(tmp_path)
    disk = DiskTable(path)
    assert not disk.closed
    disk.close()
    disk.close()
    assert disk.closed
    out = torch.zeros(1, 3, 16)
    calls = [lambda: disk.table, lambda: disk.read_rows(torch.tensor([1]), out), lambda: disk.willneed([1]),
             lambda: disk.drop_pages(), lambda: OffloadEngine(disk, cache_rows=2)]
    for call in calls:
        with pytest.raises(ValueError, match=f"DiskTable {path} is closed"):
            call()
    assert not out.any() and disk.describe()["path"] == str(path)


def test_tiers_refuse_bad_options_before_opening_the_file(tmp_path):
    """DiskTable: page_cache_bytes -1 or 1.5 was taken (a drop after every read), 'x' failed at the first read with
    an unrelated TypeError; a bad advice on an empty file passed. HostTable.from_file: a chunk_bytes of 0 or less
    said the file was truncated. Each is refused before the file is opened."""
    path, table = _tol_file(tmp_path)
    for bound, err in ((-1, ValueError), (1.5, TypeError), ("x", TypeError), (True, TypeError)):
        with pytest.raises(err, match="page_cache_bytes must be"):
            DiskTable(path, page_cache_bytes=bound)
    with pytest.raises(ValueError, match="advice must be one of"):
        DiskTable(tmp_path / "absent.safetensors", advice="bogus")  # the option first, not the missing file
    for chunk, err in ((0, ValueError), (-5, ValueError), (1.5, TypeError)):  # 0 and -5 blamed the file: "truncated"
        with pytest.raises(err, match="chunk_bytes must be"):
            HostTable.from_file(path, chunk_bytes=chunk)
    assert torch.equal(HostTable.from_file(path, chunk_bytes=np.int64(7)).table, table)
    disk = DiskTable(path, page_cache_bytes=0)  # 0: release the pages after every read
    out = torch.empty(1, 3, 16)
    disk.read_rows(torch.tensor([5]), out)
    assert torch.equal(out[0], table[5]) and disk.drops == 1
    disk.close()


def test_tiers_read_rows_refuse_ids_out_of_range(tmp_path):
    """read_rows read a NaN row for an id outside [0, V), without a word; check_ids=False (the engine's call, its
    ids checked once per step) still does that."""
    path, table = _tol_file(tmp_path)
    for tier in (HostTable.from_file(path), DiskTable(path)):
        out = torch.zeros(2, 3, 16)
        for bad in (VOCAB, -1):
            with pytest.raises(IndexError, match=f"id {bad} .* outside \\[0, V\\)"):
                tier.read_rows(torch.tensor([1, bad]), out)
        assert not out.any()
        tier.read_rows(torch.tensor([1, VOCAB]), out, check_ids=False)
        assert torch.equal(out[0], table[1]) and out[1].isnan().all()


def test_host_table_from_a_tensor_that_requires_grad():
    """The copy recorded autograd history (CopySlices), and the engine then refused the host tier with advice
    (table.detach()) that a HostTable user cannot follow."""
    t = torch.randn(20, 2, 4, requires_grad=True)
    host = HostTable.from_tensor(t)
    assert not host.table.requires_grad and torch.equal(host.table, t.detach())
    engine = OffloadEngine(host, cache_rows=3, policy="lru")
    _check_step(engine, t.detach(), torch.tensor([3, 19]))


def test_host_tier_larger_than_memory_is_refused(tmp_path, monkeypatch):
    path, _ = _tol_file(tmp_path)
    monkeypatch.setattr(tiers, "mem_available", lambda: 1000)
    with pytest.raises(ValueError, match="needs .* GiB of host memory"):
        HostTable.from_file(path)


# ================================================================ policies
def test_lru_evicts_least_recently_used():
    d = CacheDirectory(10, 3, "lru")
    assert d.access([1, 2, 3]) == ([(1, 0), (2, 1), (3, 2)], [])
    d.access([1])  # 2 is now least recent
    adm, ev = d.access([4])
    assert adm == [(4, 1)] and ev == [(2, 1)]
    assert d.resident(1) and d.resident(3) and d.resident(4) and not d.resident(2)


def test_lfu_evicts_least_frequent_and_keeps_its_counts():
    d = CacheDirectory(10, 2, "lfu")
    d.access([1, 2])
    d.access([1])
    d.access([1])
    _, ev = d.access([3])  # 2 was used once, 1 three times
    assert ev == [(2, 1)]
    d.access([2])  # re-admitted: evicts 3 (count 1) rather than 1 (count 3)
    assert d.resident(1) and d.resident(2) and not d.resident(3)


def test_static_and_hot_tail_policies():
    counts = np.zeros(20, dtype=np.int64)
    counts[[5, 6, 7]] = [30, 20, 10]
    hot = hot_set_from_counts(counts, 3)
    assert hot.tolist() == [5, 6, 7]
    s = CacheDirectory(20, 3, "static", hot)
    assert s.preload() == [(5, 0), (6, 1), (7, 2)]
    assert s.access([1, 2]) == ([], [])  # never admits
    h = CacheDirectory(20, 4, "hot+lru", hot, hot_fraction=0.5)
    assert [t for t, _ in h.preload()] == [5, 6]
    h.access([1, 2, 3, 4])  # one step admits at most the tail's 2 slots
    assert h.resident(1) and h.resident(2) and not h.resident(3)
    h.access([3, 4])
    assert h.resident(5) and h.resident(6) and h.resident(3) and h.resident(4) and not h.resident(1)
    with pytest.raises(ValueError, match="static policy needs a hot set"):
        CacheDirectory(20, 3, "static")
    with pytest.raises(ValueError, match="unknown cache policy"):
        CacheDirectory(20, 3, "fifo")
    with pytest.raises(ValueError, match="in \\[0, 20\\]"):
        CacheDirectory(20, 21, "lru")


def test_a_step_never_evicts_its_own_admissions():
    d = CacheDirectory(100, 3, "lru")
    adm, ev = d.access(list(range(10)))
    assert [t for t, _ in adm] == [0, 1, 2] and ev == []


def test_simulate_lru_matches_a_naive_reference():
    rng = np.random.default_rng(0)
    toks = rng.zipf(1.3, 5000) % 200
    got = simulate(toks, 200, 20, "lru")
    cache, hits = [], 0
    for t in toks.tolist():
        if t in cache:
            hits += 1
            cache.remove(t)
        elif len(cache) == 20:
            cache.pop(0)
        cache.append(t)
    assert got["hits"] == hits and got["lookups"] == 5000


def test_simulate_counts_every_token_after_the_warmup():
    """A step straddling the warm-up's end was skipped whole: step=4, warmup=1 over 6 tokens counted 2 lookups."""
    got = simulate([1, 2, 1, 2, 1, 2], 10, 2, "lru", step=4, warmup=1)
    assert got["lookups"] == 5 and got["hits"] == 2  # the second step's two tokens, admitted by the first
    assert simulate([1, 2, 1, 2, 1, 2], 10, 2, "lru", step=4, warmup=9)["lookups"] == 0


def test_directory_preload_after_evicting_a_hot_token():
    """An evicted hot token stops being hot: a later preload() put it back into its old slot, which a tail token
    held by then (two tokens on one slot), and hot_rows still counted it."""
    d = CacheDirectory(10, 3, "hot+lru", hot=[0, 1], hot_fraction=0.67)
    assert d.preload() == [(0, 0), (1, 1)] and d.hot_rows == 2
    assert d.evict([0]) == [(0, 0)] and d.hot_rows == 1
    d.access([4, 3])  # 4 takes the old hot slot 0, 3 the tail slot 2
    assert d.owner.tolist() == [4, 1, 3]
    assert d.preload() == [] and d.slot_of[0] == -1 and d.owner.tolist() == [4, 1, 3]


def test_hot_set_ranks_float_frequencies_and_refuses_negative_or_nan_counts():
    """Float counts were cast to int (frequencies in [0, 1) all 0), so the hot set was the lowest ids."""
    freqs = np.array([.05, .6, .3, .05])
    assert hot_set_from_counts(freqs, 2).tolist() == [1, 2]
    assert hot_set_from_counts(freqs, 9).tolist() == [1, 2, 0, 3]  # ties: smaller id first; n at most V
    assert hot_set_from_counts(np.array([3, 7, 7], dtype=np.uint8), 2).tolist() == [1, 2]
    for bad, shown in ((np.array([.1, np.nan, .2]), "nan"), (np.array([4, -1, 2]), "-1")):
        with pytest.raises(ValueError, match=f"token counts must be >= 0 and not NaN, got {shown}"):
            hot_set_from_counts(bad, 1)
    with pytest.raises(TypeError, match="n must be an int"):
        hot_set_from_counts(freqs, 1.5)
    # the engine's token_counts= goes through it
    table = torch.randn(VOCAB, 2, 4)
    freqs = np.random.default_rng(0).random(VOCAB) / VOCAB  # all below 1
    engine = OffloadEngine(table, cache_rows=CACHE, policy="static", token_counts=freqs)
    assert engine.directory.hot == np.argsort(-freqs, kind="stable")[:CACHE].tolist()
    freqs[4] = np.nan
    with pytest.raises(ValueError, match="token counts must be >= 0 and not NaN"):
        OffloadEngine(table, cache_rows=CACHE, policy="static", token_counts=freqs)


def test_directory_refuses_bad_ids_before_changing_anything():
    """-1 was read as token V - 1's slot (numpy wraps it: access([-1]) admitted it and set slot_of[9], and
    simulate([-1, 9]) then failed with a KeyError inside the LRU); an id past V gave a raw numpy IndexError, a
    float one was truncated by simulate. Now IndexError naming the id, its position and V; TypeError for
    non-integers; the directory is left as it was."""
    d = CacheDirectory(10, 2, "lru")
    d.access([3])
    before = (d.slot_of.copy(), d.owner.copy(), d.admissions)
    for call in (d.access, d.evict):
        for bad, pos in (([-1], 0), ([4, 10], 1), (np.array([5, 6, -3]), 2)):
            with pytest.raises(IndexError, match=rf"id {bad[pos]} \(at position {pos} of tokens\) is outside \[0, V\) "
                                                 r"for V=10"):
                call(bad)
        for bad in ([1.0], [2, 2.5], [True], np.array([1.5])):
            with pytest.raises(TypeError, match="token ids must be integers, got (float|bool)"):
                call(bad)
    with pytest.raises(IndexError, match="id -1 "):
        d.resident(-1)
    assert np.array_equal(d.slot_of, before[0]) and np.array_equal(d.owner, before[1]) and d.admissions == before[2]
    # integer ids of any type still pass: Python ints, numpy ints, arrays, tensors
    assert d.access([np.int32(4), 5]) == ([(4, 1), (5, 0)], [(3, 0)])
    assert d.access(np.array([6], dtype=np.uint16)) == ([(6, 1)], [(4, 1)])
    assert d.access(torch.tensor([7])) == ([(7, 0)], [(5, 0)])
    with pytest.raises(IndexError, match=r"simulate: id -1 \(at position 0 of tokens\) is outside \[0, V\) for V=10"):
        simulate([-1, 9], 10, 2, "lru")
    with pytest.raises(IndexError, match="simulate: id 10 "):
        simulate(np.array([1, 10]), 10, 2, "lru")
    with pytest.raises(TypeError, match="simulate: token ids must be integers, got float 1.5"):
        simulate([1.5, 9], 10, 2, "lru")
    for step, warmup, err, msg in ((0, 0, ValueError, "step must be >= 1, got 0"), (1.5, 0, TypeError, "step must be"),
                                   (1, -1, ValueError, "warmup must be >= 0")):
        with pytest.raises(err, match=msg):
            simulate([1, 2], 10, 2, "lru", step=step, warmup=warmup)
    assert simulate([], 10, 2, "lru")["lookups"] == 0


def test_simulate_counts_a_steps_repeated_token_as_one_access():
    """The directory sees each step's distinct tokens once, in order of first use, as the engine hands them to it.
    Replayed per position, a step [1, 2, 1] made 1 the most recent: the next step's miss then evicted 2 instead of
    1, and the third step's 1 hit (3 hits where the engine has none)."""
    got = simulate([1, 2, 1, 3, 3, 3, 1, 1, 1], 10, 2, "lru", step=3)
    assert (got["lookups"], got["hits"], got["admissions"], got["evictions"]) == (9, 0, 4, 2)


def test_hot_set_ranks_ties_by_id_in_a_large_vocabulary():
    """Ties go to the smaller id at any vocabulary size: numpy's default sort is not stable, so past its small-array
    cutoff (16 elements) the hot set took arbitrary ids among equal counts, a different cache for the same corpus."""
    counts = np.random.default_rng(0).integers(0, 4, 1000)
    want = sorted(range(1000), key=lambda t: (-int(counts[t]), t))[:300]
    assert hot_set_from_counts(counts, 300).tolist() == want
    assert hot_set_from_counts(counts / 7.0, 300).tolist() == want  # float frequencies too


def test_hot_set_takes_its_share_of_the_cache_rounded():
    """hot_fraction x C, rounded: 0.29 x 100 is 28.999999999999996 in floats, which int() truncates to 28."""
    d = CacheDirectory(1000, 100, "hot+lru", hot=list(range(200)), hot_fraction=0.29)
    assert len(d.hot) == 29 and d.tail_capacity == 71
    assert [t for t, _ in d.preload()] == list(range(29))


def test_evicting_a_hot_token_of_an_all_hot_cache_opens_a_tail_slot():
    """evict() of a hot token hands its slot to the tail. With a hot set filling the whole cache the tail had no
    capacity and kept none after the eviction: the freed slot stayed empty and every later miss was refused."""
    d = CacheDirectory(10, 2, "hot+lru", hot=[0, 1], hot_fraction=1.0)
    assert d.preload() == [(0, 0), (1, 1)]
    assert d.access([5]) == ([], [])  # no tail yet
    assert d.evict([0]) == [(0, 0)]
    assert d.access([5]) == ([(5, 0)], [])
    assert d.access([6]) == ([(6, 0)], [(5, 0)])  # the tail is that one slot; hot token 1 is never its victim
    assert d.resident(1) and d.hot_rows == 1


def test_a_cache_may_hold_the_whole_vocabulary():
    """C may be V (the bound is [0, V], inclusive): an off-by-one there refused a cache of every row."""
    d = CacheDirectory(10, 10, "lru")
    adm, ev = d.access(list(range(10)))
    assert [t for t, _ in adm] == list(range(10)) and ev == [] and all(d.resident(t) for t in range(10))
    table = torch.randn(VOCAB, 2, 4)
    engine = OffloadEngine(table, cache_rows=VOCAB, policy="lru")
    for _ in range(3):
        _check_step(engine, table, torch.randint(0, VOCAB, (2, 5)))
    engine.check_consistency()
    assert engine.stats()["evictions"] == 0


# ================================================================ the engine
def _check_step(engine, table, ids):
    engine.prefetch(ids)
    for layer in range(engine.L):
        h = torch.zeros(*ids.shape, engine.d, dtype=table.dtype)
        engine.gather_add_(h, ids, layer)
        assert torch.equal(h, table[ids, layer]), f"wrong row at layer {layer} for ids {ids.tolist()}"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tier,miss_path", [("tensor", "mapped"), ("host", "mapped"), ("disk", "mapped"),
                                            ("disk", "staged"), ("host", "staged")])
def test_engine_rows_equal_the_table(tmp_path, policy, tier, miss_path):
    path, table = _tol_file(tmp_path, dtype=torch.bfloat16)
    source = {"tensor": lambda: table, "host": lambda: HostTable.from_file(path), "disk": lambda: DiskTable(path)}[tier]()
    counts = np.bincount(np.random.default_rng(1).zipf(1.5, 2000) % VOCAB, minlength=VOCAB)
    engine = OffloadEngine(source, cache_rows=CACHE, policy=policy, token_counts=counts, miss_path=miss_path)
    for step in range(60):
        ids = torch.randint(0, VOCAB, (2, random.randint(1, 6)))
        _check_step(engine, table, ids)
    engine.check_consistency()
    s = engine.stats()
    assert s["lookups"] == sum(p["lookups"] for p in s["per_layer"]) > 0
    assert s["hits"] + s["misses"] == s["lookups"] and 0 <= s["hit_rate"] <= 1
    assert s["resident"] <= CACHE and s["policy"] == policy and s["miss_path"] == miss_path
    assert "lookups" in format_stats(s)


@pytest.mark.parametrize("policy", ["lru", "hot+lru", "static"])
@pytest.mark.parametrize("tier", ["tensor", "host", "disk"])
def test_device_bookkeeping_equals_the_host_bookkeeping(tmp_path, policy, tier):
    """bookkeeping='device' (tol_cache_admit after each transfer) makes the host directory's decisions: the same
    slot map after every step, the same rows read, the same statistics (bytes aside: its admissions copy rows
    already on the device instead of reading them from the host tier again)."""
    path, table = _tol_file(tmp_path, dtype=torch.bfloat16)
    counts = np.bincount(np.random.default_rng(1).zipf(1.5, 2000) % VOCAB, minlength=VOCAB)
    engines = {}
    for bk in ("host", "device"):
        source = {"tensor": lambda: table, "host": lambda: HostTable.from_file(path),
                  "disk": lambda: DiskTable(path, page_cache_bytes=1 << 40)}  # a bound never reached: counted only
        engines[bk] = OffloadEngine(source[tier](), cache_rows=CACHE, policy=policy, token_counts=counts,
                                    bookkeeping=bk)
    g = torch.Generator().manual_seed(4)
    for step in range(80):
        ids = torch.randint(0, VOCAB, (2, int(torch.randint(1, 6, (1,), generator=g))), generator=g)
        for engine in engines.values():
            _check_step(engine, table, ids)
        assert torch.equal(engines["host"].slot_map, engines["device"].slot_map), f"step {step}"
    for engine in engines.values():
        engine.check_consistency()
    host, dev = (engines[bk].stats() for bk in ("host", "device"))
    for key in ("lookups", "hits", "misses", "hit_rate", "admissions", "evictions", "resident", "hot_rows"):
        assert host[key] == dev[key], key
    assert [p["hits"] for p in host["per_layer"]] == [p["hits"] for p in dev["per_layer"]]
    row_bytes = table[0].numel() * table.element_size()
    assert host["bytes_h2d"] - dev["bytes_h2d"] == host["admissions"] * row_bytes
    # rows read from the file: device bookkeeping reported only the hot set's (its steps' misses were not counted)
    assert host["rows_from_disk"] - dev["rows_from_disk"] == (host["admissions"] if tier == "disk" else 0)
    assert (dev["rows_from_disk"] > dev["hot_rows"]) == (tier == "disk")
    if tier == "disk":  # the page-cache bound counts every row read (device bookkeeping's misses were left out)
        for bk, st in (("host", host), ("device", dev)):
            assert engines[bk].source._since_drop == st["rows_from_disk"] * row_bytes, bk
    assert (dev["bookkeeping"], host["bookkeeping"]) == ("device", "host")
    assert "(run on the device)" in format_stats(dev) and "(run on the device)" not in format_stats(host)
    assert policy == "static" or dev["admissions"] > 0


@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_static_policy_admits_nothing_after_an_eviction(bookkeeping):
    """Device bookkeeping marked an evicted hot slot of the static policy as a free tail slot, and admitted the
    next miss into it: 'static' never admits, as the host's directory decides."""
    table = torch.randn(8, 2, 4)
    engine = OffloadEngine(table, cache_rows=2, policy="static", hot=[0, 1], bookkeeping=bookkeeping)
    assert engine.evict(torch.tensor([0])) == 1
    for _ in range(3):
        _check_step(engine, table, torch.tensor([5]))
    s = engine.stats()
    assert (s["admissions"], s["resident"], s["hot_rows"], int(engine.slot_map[5])) == (0, 1, 1, -1)
    engine.check_consistency()


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
def test_stats_bytes_count_each_row_moved_once(miss_path):
    """bytes_h2d counted every admission as a second read of the row from the tier, also on the staged path,
    which admits from the step buffer (already on the device). Eight cold tokens, one per step, into 4 slots."""
    table = torch.randn(16, 2, 8)
    engine = OffloadEngine(table, cache_rows=4, policy="lru", miss_path=miss_path)
    for t in range(8):
        _check_step(engine, table, torch.tensor([t]))
    s = engine.stats()
    layer_row = 8 * 4
    assert s["admissions"] == 8
    # each layer reads its 8 misses once; the mapped path reads each admitted row (all its layers) again
    assert s["bytes_h2d"] == 2 * 8 * layer_row * (2 if miss_path == "mapped" else 1)


def test_device_bookkeeping_evicts_and_refuses_what_it_cannot_run():
    table = torch.randn(VOCAB, 2, 4)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="hot+lru", hot=[1, 2, 3, 4, 5, 6], bookkeeping="device")
    _check_step(engine, table, torch.tensor([7, 8, 1]))
    assert engine.evict(torch.tensor([1, 7, 9, 1])) == 2  # a hot token and a tail token; 9 was not resident
    assert engine.slot_map[1] == -1 and engine.slot_map[7] == -1 and engine.stats()["evictions"] == 2
    engine.check_consistency()
    for step in range(30):  # the freed hot slot joins the tail
        _check_step(engine, table, torch.randint(0, VOCAB, (3,)))
    engine.check_consistency()
    assert engine.stats()["resident"] == CACHE
    assert not engine.graph_step  # a CUDA graph captures the step on a GPU only
    with pytest.raises(RuntimeError, match="capture_step needs bookkeeping='device' on the mapped miss path of a CUDA"):
        engine.capture_step(torch.tensor([1]))
    for kwargs, msg in [(dict(bookkeeping="gpu"), "bookkeeping must be one of"),
                        (dict(policy="hot+lfu", hot=[1]), r"runs an LRU tail .* 'hot\+lfu'"),
                        (dict(policy="lfu"), "runs an LRU tail"),
                        (dict(policy="lru", miss_path="staged"), "needs the mapped miss path")]:
        with pytest.raises(ValueError, match=msg):
            OffloadEngine(table, cache_rows=CACHE, **{"bookkeeping": "device", **kwargs})


def test_engine_fused_path_without_prefetch():
    table = torch.randn(VOCAB, 3, 8)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru")
    engine.prefetch(torch.arange(CACHE))  # fills the cache
    ids = torch.randint(0, VOCAB, (4, 5))
    for layer in range(3):
        h = torch.randn(4, 5, 8)
        expected = h + table[ids, layer]
        engine.gather_add_(h, ids, layer)  # not the prefetched ids: hit-or-miss per token from cache / host
        assert torch.equal(h, expected)
    s = engine.stats()
    assert s["per_layer"][2]["lookups"] == 20
    assert s["per_layer"][2]["hits"] == int((ids < CACHE).sum())


@pytest.mark.parametrize("backend", ["cpu", "reference",
                                     pytest.param("triton", marks=pytest.mark.requires_triton_cpu)])
def test_engine_on_every_cpu_backend(backend):
    table = torch.randn(VOCAB, 3, 8).to(torch.bfloat16)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="hot+lfu", hot=[1, 2, 3], backend=backend)
    for _ in range(20):
        _check_step(engine, table, torch.randint(0, VOCAB, (3,)))
    h = torch.zeros(2, 8, dtype=torch.bfloat16)
    ids = torch.tensor([1, 30])
    engine.gather_add_(h, ids, 1)  # fused path
    assert torch.equal(h, table[ids, 1])
    engine.check_consistency()


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
def test_wait_step_of_every_layer_counts_like_reading_each(miss_path):
    """A step whose forward reads every layer at once (a replayed or compiled step) is counted in one update;
    the statistics are those of reading each layer, whatever sequence names the layers."""
    table = torch.randn(VOCAB, 3, 8)
    a = OffloadEngine(table, cache_rows=CACHE, policy="lru", miss_path=miss_path)
    b = OffloadEngine(table, cache_rows=CACHE, policy="lru", miss_path=miss_path)
    forms = [range(3), [0, 1, 2], (0, 1, 2), np.arange(3), [2, 0, 1]]
    for i in range(40):
        ids = torch.randint(0, VOCAB, (2, 1))
        a.prefetch(ids)
        a.wait_step(forms[i % len(forms)])
        b.prefetch(ids)
        for layer in range(3):
            b.gather_add_(torch.zeros(2, 1, 8), ids, layer)
    sa, sb = a.stats(), b.stats()
    for key in ("lookups", "hits", "misses", "hit_rate", "bytes_h2d"):
        assert sa[key] == sb[key] and [p[key] for p in sa["per_layer"]] == [p[key] for p in sb["per_layer"]], key


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
def test_engine_step_buffers_are_reused_and_wait_step_counts_like_reads(miss_path):
    """What DecodeGraph relies on: every step of at most as many tokens as before is read from the same two
    tensors (step_buffers), and wait_step(layers) counts lookups as the per-layer reads would."""
    table = torch.randn(VOCAB, 3, 8)
    a = OffloadEngine(table, cache_rows=CACHE, policy="lru", miss_path=miss_path)
    b = OffloadEngine(table, cache_rows=CACHE, policy="lru", miss_path=miss_path)
    a.prefetch(torch.randint(0, VOCAB, (2, 4)))  # grows the buffers to 8 tokens
    b.prefetch(a._step.ids)
    first, buf = a.step_buffers()
    a.prefetch(torch.randint(0, VOCAB, (2, 1)))
    b.prefetch(a._step.ids)
    captured = a._step.first  # what a graph captured at this step reads at every later one
    for _ in range(30):
        ids = torch.randint(0, VOCAB, (2, 1))
        a.prefetch(ids)
        assert a._step.first.data_ptr() == first.data_ptr() and a._step.buf is buf
        assert all(x is y for x, y in zip(a.step_buffers(), (first, buf)))
        a.wait_step([0, 2])
        replayed = torch.zeros(2, 1, 8)
        torch.ops.memllm.tol_gather_add_(replayed, captured, buf, 2, False)  # the captured read, replayed
        assert torch.equal(replayed, table[ids, 2])
        b.prefetch(ids)
        for layer in (0, 2):
            b.gather_add_(torch.zeros(2, 1, 8), ids, layer)
        h = torch.zeros(2, 1, 8)
        a.gather_add_(h, ids, 1)  # reads the step buffer, which holds this step's rows
        assert torch.equal(h, table[ids, 1])
    sa, sb = a.stats(), b.stats()
    for key in ("lookups", "hits", "misses", "bytes_h2d"):
        assert [p[key] for p in sa["per_layer"] if p["layer"] != 1] == \
            [p[key] for p in sb["per_layer"] if p["layer"] != 1], key
    a.prefetch(torch.randint(0, VOCAB, (3, 5)))  # more tokens than ever: new buffers
    assert a.step_buffers()[1] is not buf
    fresh = OffloadEngine(table, cache_rows=CACHE, policy="lru")
    with pytest.raises(RuntimeError, match="call prefetch"):
        fresh.wait_step([0])


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
def test_engine_keeps_step_buffers_within_keep_buffer_bytes(miss_path):
    """A long prompt grew the step buffers for good (a 16384-token 1b prompt: 1.5 GiB held for the whole decode);
    steps whose rows exceed keep_buffer_bytes get buffers of their own, freed after them, and the engine's stay
    the tensors they were (a CUDA graph reading them is not recaptured); growth stops at that bound."""
    import weakref

    table = torch.randn(VOCAB, 3, 8)
    row = 3 * 8 * 4
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru", miss_path=miss_path, keep_buffer_bytes=6 * row)
    engine.prefetch(torch.randint(0, VOCAB, (1, 3)))
    first, buf = engine.step_buffers()
    assert buf.shape[0] == 4  # the next power of two
    engine.prefetch(torch.randint(0, VOCAB, (1, 5)))
    first, buf = engine.step_buffers()
    assert buf.shape[0] == 6  # 8 would pass the bound: 6 rows
    for n in (7, 40):  # past the bound: this step's own buffers, as right as the engine's
        ids = torch.randint(0, VOCAB, (n,))
        ids[-1] = ids[0]  # a repeat
        engine.prefetch(ids)
        assert all(x is y for x, y in zip(engine.step_buffers(), (first, buf)))
        step_buf = weakref.ref(engine._step.buf)
        assert engine._step.buf.shape[0] == n
        for layer in range(3):
            h = torch.randn(n, 8)
            want = h + table[ids, layer]
            assert torch.equal(engine.gather_add_(h, ids, layer), want)
        assert torch.equal(engine.step_rows(ids), table[ids])
        engine.prefetch(torch.randint(0, VOCAB, (2,)))  # the next step: the long one's buffers are gone
        assert step_buf() is None and engine._step.buf is buf
    engine.check_consistency()
    engine.reserve(12)  # asked for explicitly: grown past the bound
    assert engine.step_buffers()[1].shape[0] >= 12
    for bad, err in ((-1, ValueError), (1.5, TypeError)):
        with pytest.raises(err, match="keep_buffer_bytes"):
            OffloadEngine(table, cache_rows=CACHE, keep_buffer_bytes=bad)


def test_engine_statistics_match_the_directory_replay():
    rng = np.random.default_rng(2)
    toks = (rng.zipf(1.4, 3000) % VOCAB).astype(np.int64)
    engine = OffloadEngine(torch.randn(VOCAB, 2, 4), cache_rows=CACHE, policy="lru")
    for t in toks.tolist():
        _check_step(engine, engine.source.table, torch.tensor([t]))
    s = engine.stats()
    sim = simulate(toks, VOCAB, CACHE, "lru")
    assert s["per_layer"][0]["hits"] == sim["hits"] and s["evictions"] == sim["evictions"]
    assert s["lookups"] == 2 * 3000


def test_engine_errors(monkeypatch):
    table = torch.randn(VOCAB, 2, 4)
    with pytest.raises(ValueError, match=f"larger than the vocabulary \\(V={VOCAB}\\)"):
        OffloadEngine(table, cache_rows=VOCAB + 1)
    with pytest.raises(ValueError, match="cache_rows must be >= 0"):
        OffloadEngine(table, cache_rows=-1)
    for rows in (2.5, True, "4"):
        with pytest.raises(TypeError, match="cache_rows must be an int"):
            OffloadEngine(table, cache_rows=rows)
    assert OffloadEngine(table, cache_rows=np.int32(3)).capacity == 3
    monkeypatch.setattr("memllm_kernels.offload.engine.mem_available", lambda: 10)
    with pytest.raises(ValueError, match="needs .* GiB .* use fewer --cache-rows"):
        OffloadEngine(table, cache_rows=CACHE)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="static.*needs a hot set"):
        OffloadEngine(table, cache_rows=CACHE, policy="static")
    with pytest.raises(ValueError, match="token_counts must be"):
        OffloadEngine(table, cache_rows=CACHE, token_counts=np.ones(3))
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru")
    engine.prefetch(torch.tensor([1, 2]))
    before = engine.stats()
    with pytest.raises(IndexError, match=f"id {VOCAB} .*V={VOCAB}"):
        engine.prefetch(torch.tensor([3, VOCAB]))
    with pytest.raises(IndexError, match="id -2 "):
        engine.evict(torch.tensor([-2]))
    with pytest.raises(TypeError, match="int32 or int64"):
        engine.prefetch(torch.tensor([1.0]))
    after = engine.stats()
    assert after["lookups"] == before["lookups"] and after["admissions"] == before["admissions"]  # nothing moved
    with pytest.raises(IndexError, match="layer=2 is outside"):
        engine.gather_add_(torch.zeros(1, 4), torch.tensor([1]), 2)


def test_layer_groups_cover_every_layer_once():
    """On a GPU a step's rows move in layer groups, one event each: a group bound off by one leaves a layer's rows
    unmoved. Only GPU runs use more than one group, so the arithmetic is checked here, for every L and count."""
    for L in range(1, 10):
        engine = OffloadEngine(torch.randn(VOCAB, L, 2), cache_rows=CACHE, policy="lru")
        for G in range(1, L + 1):
            groups = engine._groups(G)
            assert len(groups) == G and all(lb < le for lb, le in groups), (L, G, groups)
            assert [layer for lb, le in groups for layer in range(lb, le)] == list(range(L)), (L, G, groups)


def test_gather_add_waits_for_the_group_that_moves_its_layer():
    """gather_add_ on a GPU waits only for the event of _group_of(layer): that group must be the one whose range
    holds the layer, or the layer reads rows still in flight. Checked here for every L and group count (it was
    not so where the count does not divide L: L=3 in 2 groups, layer 1 moved in group 1 but waited for group 0;
    the tiny preset's 6 layers in the GPU's default 4 groups: layers 1 and 4)."""
    for L in range(1, 10):
        engine = OffloadEngine(torch.randn(VOCAB, L, 2), cache_rows=CACHE, policy="lru")
        for G in range(1, L + 1):
            groups = engine._groups(G)
            for layer in range(L):
                lb, le = groups[engine._group_of(layer, G)]
                assert lb <= layer < le, (L, G, layer, groups)


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
def test_engine_refuses_a_bad_layer_of_a_prefetched_step_with_index_error(miss_path):
    """gather_add_ with layer L or -1 raises IndexError naming the layer on the prefetched path too (the step
    buffer's op raised RuntimeError there), before anything is written or counted."""
    table = torch.randn(VOCAB, 2, 4)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru", miss_path=miss_path)
    ids = torch.tensor([1, 2])
    engine.prefetch(ids)
    h = torch.zeros(2, 4)
    for layer in (2, -1):
        with pytest.raises(IndexError, match=rf"layer={layer} is outside the table's \[0, 2\) layers"):
            engine.gather_add_(h, ids, layer)
    assert not h.any() and engine.stats()["lookups"] == 0


def test_fused_path_statistics_per_layer():
    """The fused path (ids not prefetched) counts per position: hits where the token is resident, misses the rest,
    and one host row of d elements moved per miss, in its layer only; hit_rate is hits / lookups."""
    table = torch.randn(VOCAB, 3, 8)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru")
    engine.prefetch(torch.arange(4))  # tokens 0..3 resident; no layer read them: nothing counted
    before = engine.stats()
    ids = torch.tensor([0, 1, 20, 30, 30])  # 2 hits, 3 misses (30 twice)
    h = torch.zeros(5, 8)
    engine.gather_add_(h, ids, 1)
    assert torch.equal(h, table[ids, 1])
    after = engine.stats()
    p = after["per_layer"][1]
    assert (p["lookups"], p["hits"], p["misses"], p["hit_rate"]) == (5, 2, 3, 0.4)
    moved = [a["bytes_h2d"] - b["bytes_h2d"] for a, b in zip(after["per_layer"], before["per_layer"])]
    assert moved == [0, 3 * 8 * 4, 0]
    assert after["per_layer"][0]["hit_rate"] is None and after["hit_rate"] == 0.4


def test_engine_checks_its_table_at_construction():
    """A layer-major table (each token's rows strided), a table with d=0 or L=0 and one that requires grad were
    accepted, each failing only at the first prefetch (d=0 with "rows must be dense"): refused at construction."""
    layer_major = torch.randn(2, VOCAB, 4).transpose(0, 1)  # [V, L, d] with each token's rows L apart
    with pytest.raises(ValueError, match=r"the ToL table's token rows must be dense .* got strides \(4, 164, 1\)"):
        OffloadEngine(layer_major, cache_rows=CACHE)
    for shape in ((VOCAB, 2, 0), (VOCAB, 0, 4)):
        with pytest.raises(ValueError, match=r"the ToL table's rows are empty .* L and d must be at least 1"):
            OffloadEngine(torch.randn(shape), cache_rows=CACHE)
    table = torch.randn(VOCAB, 2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"the ToL table requires grad.*table.detach\(\)"):
        OffloadEngine(table, cache_rows=CACHE)
    engine = OffloadEngine(layer_major.contiguous(), cache_rows=CACHE)  # as the messages advise
    _check_step(engine, layer_major, torch.tensor([3, 1]))
    _check_step(OffloadEngine(table.detach(), cache_rows=CACHE), table.detach(), torch.tensor([3, 1]))


@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_engine_refuses_a_bad_layer_or_check_ids_and_evicts_an_empty_list(bookkeeping):
    """gather_add_(h, ids, 1.0) failed in pybind ("Expected a value of type 'int'"), None with "'<=' not supported",
    and a tensor layer was read by its __index__; prefetch(check_ids=None) skipped the check silently. TypeError
    naming the argument, on the prefetched and the unprefetched path, before anything is written. evict([]) said
    "got torch.float32" (torch.as_tensor([]) is float): an empty list is no ids."""
    table = torch.randn(VOCAB, 2, 4)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru", bookkeeping=bookkeeping)
    ids = torch.tensor([3, 1])
    engine.prefetch(ids)
    h = torch.zeros(2, 4)
    for layer_ids in (ids, torch.tensor([5, 6])):  # the prefetched step's buffer; the cache and host table
        for layer in (1.0, None, torch.tensor(1), True, "1"):
            with pytest.raises(TypeError, match=f"gather_add_: layer must be an int, got {type(layer).__name__}"):
                engine.gather_add_(h, layer_ids, layer)
    assert not h.any()
    engine.gather_add_(h, ids, np.int64(1))
    assert torch.equal(h, table[ids, 1])
    for v in (None, "no", 0):
        with pytest.raises(TypeError, match=f"prefetch: check_ids must be True or False, got {type(v).__name__}"):
            engine.prefetch(torch.tensor([1, VOCAB]), check_ids=v)
    resident = engine.stats()["resident"]
    assert engine.evict([]) == 0 and engine.evict(()) == 0 and engine.evict(torch.tensor([], dtype=torch.int64)) == 0
    assert engine.stats()["resident"] == resident
    with pytest.raises(TypeError, match="int32 or int64 tensor, got torch.float32"):
        engine.evict(torch.tensor([1.0]))  # a float id is still refused
    assert engine.evict([3]) == 1


def test_engine_refuses_bad_arguments_at_construction_and_in_wait_step(monkeypatch):
    """Each was accepted or failed later with an unrelated error (a numpy index error, 'cannot convert float NaN',
    ZeroDivisionError in stats(), a failure at the first prefetch, 'list index out of range', an
    AssertionError from torch): now a clear error at the call that was wrong."""
    table = torch.randn(VOCAB, 2, 4)
    hot = list(range(2 * CACHE))  # more hot tokens than slots: hot_fraction 5 would place them all
    for fraction in (5, -1, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"hot_fraction must be in \[0, 1\]"):
            OffloadEngine(table, cache_rows=CACHE, policy="hot+lru", hot=hot, hot_fraction=fraction)
    with pytest.raises(ValueError, match=r"hot_fraction must be in \[0, 1\]"):
        simulate([1, 2], VOCAB, CACHE, "hot+lru", hot, hot_fraction=2)
    with pytest.raises(TypeError, match="hot-set token ids must be integers, got 1.5"):
        OffloadEngine(table, cache_rows=CACHE, policy="hot+lru", hot=[1.5, 2.7])
    with pytest.raises(TypeError, match="hot-set token ids must be integers"):
        OffloadEngine(table, cache_rows=CACHE, policy="static", hot=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"no rows \(shape \[0, 2, 4\]\)"):
        OffloadEngine(torch.randn(0, 2, 4), cache_rows=0, policy="lru")
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64, got torch.int64"):
        OffloadEngine(torch.zeros(VOCAB, 2, 4, dtype=torch.int64), cache_rows=CACHE, policy="lru")
    with monkeypatch.context() as m:  # as on a machine without CUDA, wherever this runs
        m.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(RuntimeError, match="device='cuda', but CUDA is not available"):
            OffloadEngine(table, device="cuda", cache_rows=CACHE, policy="lru")
    for groups, err in ((0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="layer_groups must be"):
            OffloadEngine(table, cache_rows=CACHE, policy="lru", layer_groups=groups)
    engine = OffloadEngine(table, cache_rows=CACHE, policy="lru", hot=[np.int64(3)], hot_fraction=0, layer_groups=9)
    assert engine.layer_groups == 2  # at most L
    for groups, err in ((0, ValueError), ("2", TypeError)):
        with pytest.raises(err, match="layer_groups must be"):
            engine.prefetch(torch.tensor([1, 2]), layer_groups=groups)
    engine.prefetch(torch.tensor([1, 2]), layer_groups=np.int64(5))
    engine.wait_step([0, 1, 1])
    before = engine.stats()
    for layers in ([7], [0, 2], [-1], range(3)):
        with pytest.raises(IndexError, match=r"wait_step: layer (7|2|-1) is outside the table's \[0, 2\) layers"):
            engine.wait_step(layers)
    assert engine.stats()["per_layer"] == before["per_layer"]  # nothing counted by a refused call


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
@pytest.mark.parametrize("write", ["copy_", "inference_mode", "numpy"])
def test_engine_never_reads_the_old_rows_of_ids_rewritten_after_prefetch(miss_path, write, monkeypatch):
    """prefetch(ids), ids rewritten in place, then gather_add_(h, ids) / step_rows(ids): the new ids' rows, not the
    step buffer's rows of the old ones. The same tensor short-circuited the version check, and an inference
    tensor (no version counter) or a numpy write (bypasses it) left nothing to notice; CPU ids are now compared
    with a copy taken at the prefetch. Ids left as they were still read the step buffer."""
    table = torch.randn(VOCAB, 3, 8)
    engine = OffloadEngine(table, cache_rows=5, policy="lru", miss_path=miss_path)
    old, new = torch.tensor([1, 2, 3, 4]), torch.tensor([30, 31, 32, 33])
    with torch.inference_mode(write == "inference_mode"):
        ids = old.clone()
        assert ids.is_inference() == (write == "inference_mode")
        engine.prefetch(ids)
        with monkeypatch.context() as m:  # unchanged ids: the step buffer, no second prefetch, no fused read
            m.setattr(engine, "_fused", lambda *a: pytest.fail("unchanged ids did not read the step buffer"))
            h = torch.zeros(4, 8)
            engine.gather_add_(h, ids, 0)
            assert torch.equal(h, table[old, 0]) and torch.equal(engine.step_rows(ids), table[old])
            assert engine.prefetches == 1
        if write == "numpy":
            ids.numpy()[:] = new.numpy()
        else:
            ids.copy_(new)
        h = torch.zeros(4, 8)
        engine.gather_add_(h, ids, 1)
        assert torch.equal(h, table[new, 1]), "gather_add_ read the rows of the ids prefetched before the write"
        assert torch.equal(engine.step_rows(ids), table[new]), "step_rows read the old ids' rows"
    engine.check_consistency()


def test_engine_stress_100k_steps_against_a_dictionary():
    """100,000 random prefetch / lookup / fused lookup / evict steps over every policy and both miss paths, and
    the policies that can run on the device with bookkeeping='device'; every row read is checked against a
    {token: rows} dictionary and the cache against the directory (or the device's owners)."""
    rng = random.Random(0)
    V, L, d = 97, 2, 4
    table = torch.randn(V, L, d)
    reference_rows = {v: table[v].clone() for v in range(V)}  # the dictionary reference
    counts = np.bincount(np.random.default_rng(0).zipf(1.3, 5000) % V, minlength=V)
    configs = [(p, m, "host") for p, m in itertools.product(POLICIES, ("mapped", "staged"))]
    configs += [(p, "mapped", "device") for p in ("lru", "hot+lru", "static")]
    steps_each = STRESS_STEPS // len(configs)
    total = 0
    for policy, miss_path, bookkeeping in configs:
        engine = OffloadEngine(table, cache_rows=13, policy=policy, token_counts=counts, miss_path=miss_path,
                               bookkeeping=bookkeeping)
        for step in range(steps_each):
            r = rng.random()
            n = rng.randint(1, 4)
            ids = [min(V - 1, int(rng.paretovariate(1.1)) - 1) if rng.random() < 0.8 else rng.randrange(V)
                   for _ in range(n)]
            t = torch.tensor(ids)
            layer = rng.randrange(L)
            if r < 0.15:
                engine.evict(t)
            else:
                if r < 0.85:
                    engine.prefetch(t)
                h = torch.zeros(n, d)
                engine.gather_add_(h, t, layer)
                for i, tok in enumerate(ids):
                    if not torch.equal(h[i], reference_rows[tok][layer]):
                        raise AssertionError(f"{policy}/{miss_path}/{bookkeeping} step {step}: stale or wrong row "
                                             f"for token {tok}")
            if step % 2000 == 0:
                engine.check_consistency()
            total += 1
        engine.check_consistency()
        s = engine.stats()
        assert s["resident"] <= 13 and s["lookups"] > 0
    assert total >= STRESS_STEPS - len(configs)


def test_engine_repeated_runs_leave_rss_flat(tmp_path):
    path, _ = _tol_file(tmp_path, V=2000, L=4, d=256)  # 8 MB table
    script = textwrap.dedent(f"""
        import torch, numpy as np
        from memllm_kernels.offload import HostTable, DiskTable, OffloadEngine
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        marks = []
        for run in range(8):
            for source in (HostTable.from_file({str(path)!r}), DiskTable({str(path)!r})):
                e = OffloadEngine(source, cache_rows=100, policy="hot+lru", token_counts=np.arange(2000))
                g = torch.Generator().manual_seed(run)
                for step in range(200):
                    ids = torch.randint(0, 2000, (8,), generator=g)
                    e.prefetch(ids)
                    h = torch.zeros(8, 256)
                    for l in range(4):
                        e.gather_add_(h, ids, l)
                e.stats(); e.close()
                if isinstance(source, DiskTable):
                    source.close()
                del e, source
            marks.append(rss())
        print(marks[1], marks[-1])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, last = (int(x) for x in out.stdout.split())
    assert last - first < (12 << 20), f"RSS grew by {(last - first) >> 20} MiB over 6 more runs"


# ================================================================ the model and the CLI
def _tiny_model_and_file(tmp_path, kind="memoryllm", dtype=torch.float32):
    from memllm_kernels.model import ModelConfig, Transformer, precompute_tol

    cfg = ModelConfig(kind=kind, vocab_size=300, n_layer=3, d_model=32, n_head=4, block_size=64, name="t")
    model = Transformer(cfg).eval()
    path = tmp_path / "tol.safetensors"
    precompute_tol(model, path, dtype=dtype)
    return model, path


@pytest.mark.parametrize("location", ["host", "disk"])
@pytest.mark.parametrize("kind,alpha,drop", [("memoryllm", 1.0, ()), ("flex2", 1.0, ()), ("memoryllm", 0.5, (1,))])
def test_model_through_the_engine_equals_the_in_memory_tol(tmp_path, location, kind, alpha, drop):
    import copy

    from memllm_kernels.model import generate, load_tol, swap_ffn_for_tol
    from memllm_kernels.model.tol import swap_ffn_for_engine

    model, path = _tiny_model_and_file(tmp_path, kind)
    model.set_memory_scale(alpha, drop)
    engine_model = copy.deepcopy(model)
    swap_ffn_for_tol(model, load_tol(path, model))
    source = HostTable.from_file(path, engine_model) if location == "host" else DiskTable(path, engine_model)
    engine = OffloadEngine(source, cache_rows=15, policy="hot+lru", token_counts=np.arange(300)[::-1].copy())
    swap_ffn_for_engine(engine_model, engine)
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        assert torch.equal(engine_model(ids), model(ids))  # bit-identical: same rows, same op
    prompts = [[1, 2, 3, 250], [7]]
    assert generate(engine_model, prompts, 8) == generate(model, prompts, 8)
    assert generate(engine_model, prompts, 6, temperature=0.9, top_k=20, seed=3) == \
        generate(model, prompts, 6, temperature=0.9, top_k=20, seed=3)
    s = engine.stats()
    assert s["lookups"] > 0 and s["hits"] > 0 and s["prefetches"] > 0
    with pytest.raises(ValueError, match="already swapped"):
        swap_ffn_for_engine(engine_model, engine)
    engine_model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        engine_model(ids).sum()


@pytest.mark.parametrize("compile", [False, True])
def test_engine_moves_nothing_when_every_layer_is_dropped(tmp_path, compile):
    """With every layer's memory dropped (set_memory_scale, `memllm eval --drop-layers` over all layers) no layer
    reads a row: the forward's prefetch moved and admitted rows anyway, and the stats showed 0 lookups beside
    admissions. Now nothing moves, eager or compiled, and the tokens are the in-memory model's."""
    import copy

    from memllm_kernels.model import generate, load_tol, swap_ffn_for_tol
    from memllm_kernels.model.tol import swap_ffn_for_engine

    torch._dynamo.reset()
    model, path = _tiny_model_and_file(tmp_path)
    model.set_memory_scale(1.0, range(3))
    engine_model = copy.deepcopy(model)
    swap_ffn_for_tol(model, load_tol(path, model))
    engine = OffloadEngine(HostTable.from_file(path, engine_model), cache_rows=15, policy="lru")
    swap_ffn_for_engine(engine_model, engine)
    prompts = [[1, 2, 3, 250], [7]]
    assert generate(engine_model, prompts, 5, compile=compile) == generate(model, prompts, 5)
    s = engine.stats()
    assert (s["lookups"], s["prefetches"], s["admissions"], s["bytes_h2d"]) == (0, 0, 0, 0)
    engine_model.set_memory_scale(1.0, [0, 2])  # one layer reads again: its rows are prefetched again
    with torch.no_grad():
        engine_model(torch.tensor([[4, 5]]))
    s = engine.stats()
    assert s["prefetches"] == 1 and s["lookups"] == 2 and s["admissions"] == 2


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_decode_graph_moves_nothing_when_every_layer_is_dropped(tmp_path, bookkeeping):
    """The same through DecodeGraph: its replays prefetched (host bookkeeping) or captured the engine's step
    (device bookkeeping) though no layer reads a row. Now the graph has no engine step."""
    import copy

    from memllm_kernels.model import generate, load_tol, swap_ffn_for_tol
    from memllm_kernels.model.tol import swap_ffn_for_engine

    model, path = _tiny_model_and_file(tmp_path)
    model.set_memory_scale(1.0, range(3))
    engine_model = copy.deepcopy(model).cuda()
    swap_ffn_for_tol(model, load_tol(path, model))
    engine = OffloadEngine(HostTable.from_file(path, engine_model), device="cuda", cache_rows=15, policy="lru",
                           bookkeeping=bookkeeping)
    swap_ffn_for_engine(engine_model, engine)
    prompts = [[1, 2, 3, 250], [7]]
    assert generate(engine_model, prompts, 8, cuda_graph=True) == generate(model.cuda(), prompts, 8)
    s = engine.stats()
    assert (s["lookups"], s["prefetches"], s["admissions"], s["bytes_h2d"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("location", ["host", "disk"])
def test_compiled_decode_through_the_engine_equals_the_in_memory_tol(tmp_path, location):
    """generate(compile=True) with the engine: one compiled graph with one opaque engine op per step
    (memllm::engine_step_rows: the step's rows of every layer, copied from the prefetched step buffer), each
    layer's read by indexing (no per-layer op), giving the in-memory ToL's tokens."""
    import copy

    from torch._inductor.utils import run_and_get_code

    from memllm_kernels.model import compile_decode, generate, load_tol, swap_ffn_for_tol
    from memllm_kernels.model.tol import swap_ffn_for_engine

    torch._dynamo.reset()
    model, path = _tiny_model_and_file(tmp_path)
    engine_model = copy.deepcopy(model)
    swap_ffn_for_tol(model, load_tol(path, model))
    source = HostTable.from_file(path, engine_model) if location == "host" else DiskTable(path, engine_model)
    engine = OffloadEngine(source, cache_rows=15, policy="hot+lru", token_counts=np.arange(300))
    swap_ffn_for_engine(engine_model, engine)
    prompts = [[1, 2, 3, 250], [7]]
    before, graphs = engine.stats()["lookups"], torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert generate(engine_model, prompts, 10, compile=True) == generate(model, prompts, 10)
    # the whole step is one graph: no break per layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    # 4-token prefill + 9 decode steps, 2 rows, 3 layers: every lookup counted once
    assert engine.stats()["lookups"] - before == (2 * 4 + 2 * 9) * 3
    with torch.no_grad():
        engine_model.setup_caches(1, 4)
        engine_model(torch.tensor([[5, 6]]), input_pos=torch.arange(2))
        nxt = torch.tensor([[9]])
        torch._dynamo.reset()
        _, code = run_and_get_code(compile_decode(engine_model), nxt, input_pos=torch.tensor([2]))
        # the prefetched step's buffer, read by all 3 layers at once (counted as one whole-step read)
        assert engine._step.ids is nxt and (engine._step.whole, engine._step.layers_read) == (1, [])
        engine_model.clear_caches()
    call = code[-1][code[-1].index("def call("):]
    assert call.count("engine_step_rows.default(") == 1 and "engine_gather_add_" not in call
    # Inductor schedules it where the first layer reads it: after that layer's q/k/v and output projections (a
    # transfer still running overlaps them; a captured engine step waits for its rows there), before the second's
    before_rows = call[:call.index("engine_step_rows.default(")]
    assert before_rows.count("extern_kernels.mm(") == 2, before_rows
    h, ids = torch.randn(2, 3, 32), torch.tensor([[1, 2, 3], [4, 5, 299]])
    handle = engine_model.layers[0].memory.handle
    torch.library.opcheck(torch.ops.memllm.engine_step_rows, (ids, handle))
    assert torch.equal(torch.ops.memllm.engine_step_rows(ids, handle), model.layers[0].memory.store.table[ids])
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.memllm.engine_step_rows(ids, -1)
    torch.library.opcheck(torch.ops.memllm.engine_gather_add_, (h, ids, 1, engine_model.layers[0].memory.handle))
    want = h + model.layers[0].memory.store.table[ids, 1]
    torch.ops.memllm.engine_gather_add_(h, ids, 1, engine_model.layers[0].memory.handle)
    assert torch.equal(h, want)
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.memllm.engine_gather_add_(h, ids, 1, -1)
    engine.check_consistency()


def test_swap_for_engine_checks_shapes(tmp_path):
    from memllm_kernels.model import ModelConfig, Transformer
    from memllm_kernels.model.tol import swap_ffn_for_engine

    engine = OffloadEngine(torch.randn(300, 2, 32), cache_rows=4, policy="lru")
    cfg = ModelConfig(kind="memoryllm", vocab_size=300, n_layer=3, d_model=32, n_head=4, block_size=64)
    with pytest.raises(ValueError, match="does not match"):
        swap_ffn_for_engine(Transformer(cfg), engine)
    with pytest.raises(ValueError, match="dense model"):
        swap_ffn_for_engine(Transformer(cfg.replace(kind="dense")), engine)
    with torch.device("meta"):
        elsewhere = Transformer(cfg.replace(n_layer=2))
    with pytest.raises(ValueError, match="engine table is on cpu but the model is on meta; build the engine there"):
        swap_ffn_for_engine(elsewhere, engine)


needs_train_deps = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("safetensors", "tokenizers", "tqdm")),
    reason="safetensors, tokenizers and tqdm are needed to train (pip install -e . installs them)")


@needs_train_deps
def test_cli_generate_and_eval_with_tol_location(tmp_path, monkeypatch, capsys):
    from memllm_kernels.cli import main

    monkeypatch.setenv("MEMLLM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = "the king queen lord lady sword crown night day love death fair foul speak hear go come".split()
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(4):
        (folder / f"w{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(80)) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-memoryllm", "--out", str(run), "--text", str(folder), "--steps", "1",
                 "--tokenizer", "bpe-300", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
                 "--no-progress"]) == 0
    assert main(["precompute", str(run), "--no-progress"]) == 0
    capsys.readouterr()

    def cli(*argv):
        rc = main(list(argv))
        out, err = capsys.readouterr()
        assert rc == 0, err
        return out

    gen = ["generate", str(run), "--prompt", "the king", "--max-new-tokens", "6", "--temperature", "0"]
    base = cli(*gen, "--tol")
    for loc in ("device", "host", "disk"):
        out = cli(*gen, "--tol-location", loc, *(["--cache-rows", "20"] if loc != "device" else []))
        assert out.splitlines()[0] == base.splitlines()[0], loc  # identical text
        if loc != "device":
            assert "cache: hot+lru, 20 of 300 rows" in out and "lookups" in out
    out = cli(*gen, "--tol-location", "disk", "--cache-rows", "20", "--embedding-location", "host")
    assert out.splitlines()[0] == base.splitlines()[0]
    out = cli(*gen, "--tol-location", "host", "--cache-rows", "20", "--cache-bookkeeping", "device")
    assert out.splitlines()[0] == base.splitlines()[0] and "cache: hot+lru (run on the device), 20 of 300" in out
    torch._dynamo.reset()
    compiled = cli(*gen, "--tol-location", "host", "--cache-rows", "20", "--compile")
    assert compiled.splitlines()[0] == base.splitlines()[0]
    ev = ["eval", str(run), "--json", "--no-progress", "--max-tokens", "300"]
    import json

    ref = json.loads(cli(*ev, "--tol"))
    for loc in ("host", "disk"):
        res = json.loads(cli(*ev, "--tol-location", loc, "--cache-policy", "lru"))
        assert res["loss"] == ref["loss"] and res["cache"]["lookups"] > 0 and res["cache"]["policy"] == "lru"
    assert json.loads(cli(*ev, "--tol", "--embedding-location", "host"))["loss"] == ref["loss"]
    rc = main([*ev, "--tol-location", "host", "--cache-rows", "301"])
    assert rc == 2 and "larger than the vocabulary (V=300)" in capsys.readouterr().err
    rc = main([*ev, "--tol", "--cache-rows", "5"])
    assert rc == 2 and "--cache-rows needs --tol-location" in capsys.readouterr().err
    rc = main([*ev, "--tol", "--cache-bookkeeping", "device"])
    assert rc == 2 and "--cache-bookkeeping needs --tol-location" in capsys.readouterr().err
    rc = main([*ev, "--tol", "--cache-policy", "lru"])  # was silently ignored
    assert rc == 2 and "--cache-policy needs --tol-location" in capsys.readouterr().err
    rc = main([*ev, "--tol-location", "host", "--cache-bookkeeping", "device", "--cache-policy", "lfu"])
    assert rc == 2 and "--cache-policy lfu needs the host's" in capsys.readouterr().err
    dev = json.loads(cli(*ev, "--tol-location", "disk", "--cache-bookkeeping", "device"))
    assert dev["loss"] == ref["loss"] and dev["cache"]["bookkeeping"] == "device"
    rc = main([*ev, "--ffn", "--tol-location", "disk"])
    assert rc == 2 and "cannot be combined with --ffn" in capsys.readouterr().err
    rc = main([*gen, "--tol", "--cuda-graph"])
    assert rc == 2 and "--cuda-graph replays CUDA graphs: it needs --device cuda" in capsys.readouterr().err


# ================================================================ GPU (skipped here, with the reason)
@pytest.mark.requires_cuda
@pytest.mark.parametrize("tier,bookkeeping", [("host", "host"), ("disk", "host"), ("host", "device")])
def test_engine_on_gpu_equals_the_table(tmp_path, tier, bookkeeping):
    path, table = _tol_file(tmp_path, V=500, L=4, d=64, dtype=torch.bfloat16)
    source = HostTable.from_file(path) if tier == "host" else DiskTable(path)
    assert source.pinned == (tier == "host")
    engine = OffloadEngine(source, device="cuda", cache_rows=40, policy="hot+lru", token_counts=np.arange(500),
                           bookkeeping=bookkeeping)
    assert engine.miss_path == ("mapped" if tier == "host" else "staged")
    tab = table.cuda()
    for step in range(200):
        ids = torch.randint(0, 500, (2, 3), device="cuda")
        # the default 4 groups on the side stream, one group there, or one group inline on this stream (a
        # DecodeGraph's replay), with the host's share now or after the reads (finish_later), interleaved: each
        # kind's cache reads follow the others' cache writes
        mode = step % 4
        engine.prefetch(ids, check_ids=False, layer_groups=[None, 1, None, None][mode], inline=mode >= 2,
                        finish_later=mode == 3)
        for layer in range(4):
            h = torch.randn(2, 3, 64, device="cuda", dtype=torch.bfloat16)
            expected = mk.tol_gather_add(h, ids, tab, layer)
            engine.gather_add_(h, ids, layer)
            assert torch.equal(h, expected)
        if mode == 3 and step % 8 == 3:  # else the next prefetch finishes it
            engine.finish_step()
    engine.check_consistency()
    assert engine.stats()["hits"] > 0


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_engine_decode_steady_state_has_no_host_sync(bookkeeping):
    """After warm-up, prefetch + per-layer reads of a decode step on the pinned tier never synchronise the host
    with the device (torch's sync debug mode raises on any synchronising call)."""
    table = mk.tol_host_alloc([1000, 4, 128], torch.bfloat16)
    table.copy_(torch.randn(1000, 4, 128).to(torch.bfloat16))
    engine = OffloadEngine(HostTable(table), device="cuda", cache_rows=50, policy="lru", bookkeeping=bookkeeping)
    ids = torch.randint(0, 1000, (1, 1), device="cuda")
    h = torch.zeros(1, 1, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        engine.prefetch(ids, check_ids=False)
        for layer in range(4):
            engine.gather_add_(h, ids, layer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(20):
            ids = torch.randint(0, 1000, (1, 1), device="cuda")
            mode = step % 3  # side stream, inline, or inline with the host's share after the reads (DecodeGraph)
            engine.prefetch(ids, check_ids=False, inline=mode > 0, finish_later=mode == 2)
            for layer in range(4):
                engine.gather_add_(h, ids, layer)
            if mode == 2:
                engine.finish_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.check_consistency()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
@pytest.mark.parametrize("location,bookkeeping", [("host", "host"), ("disk", "host"), ("host", "device")])
def test_decode_graph_through_the_engine_equals_the_in_memory_tol(tmp_path, location, bookkeeping, compile):
    """Generation with every decode step replayed from a CUDA graph, ToLs read through the engine (pinned host
    tier, mapped misses; disk tier, staged misses), gives the in-memory ToL's tokens, and the engine counts
    the replayed steps' lookups."""
    import copy

    from memllm_kernels.model import generate, load_tol, swap_ffn_for_tol
    from memllm_kernels.model.tol import swap_ffn_for_engine

    torch._dynamo.reset()  # each compiled model adds variants of Transformer.forward; dynamo allows 8
    model, path = _tiny_model_and_file(tmp_path)
    engine_model = copy.deepcopy(model).cuda()
    swap_ffn_for_tol(model, load_tol(path, model))
    model.cuda()
    source = HostTable.from_file(path, engine_model) if location == "host" else DiskTable(path, engine_model)
    engine = OffloadEngine(source, device="cuda", cache_rows=15, policy="hot+lru", token_counts=np.arange(300),
                           bookkeeping=bookkeeping)
    swap_ffn_for_engine(engine_model, engine)
    prompts = [[1, 2, 3, 250], [7]]
    want = generate(model, prompts, 20, cuda_graph=True)
    assert want == generate(model, prompts, 20)
    before = engine.stats()["lookups"]
    assert generate(engine_model, prompts, 20, cuda_graph=True, compile=compile) == want
    s = engine.stats()
    # 4-token prefill + 19 decode steps (+ 2 warm-up forwards), 2 rows, 3 layers
    assert s["lookups"] - before == (2 * 4 + 2 * 19 + 2 * 2) * 3 and s["hits"] > 0
    longer = generate(engine_model, [[5] * 9], 5, cuda_graph=True, compile=compile)
    assert longer == generate(model, [[5] * 9], 5)
    engine.check_consistency()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_decode_graph_steady_state_has_no_host_sync(tmp_path, bookkeeping):
    """DecodeGraph steps with ToLs in the pinned host tier: prefetch, bookkeeping and replay never synchronise
    the host with the device; a step after the engine's buffers grew is captured again and still right."""
    from memllm_kernels.model import DecodeGraph
    from memllm_kernels.model.tol import swap_ffn_for_engine

    model, path = _tiny_model_and_file(tmp_path)
    model.cuda()
    engine = OffloadEngine(HostTable.from_file(path, model), device="cuda", cache_rows=15, policy="lru",
                           bookkeeping=bookkeeping)
    swap_ffn_for_engine(model, engine)
    with torch.no_grad():
        model.setup_caches(1, 40)
        model(torch.tensor([[1, 2, 3]], device="cuda"), input_pos=torch.arange(3, device="cuda"))
        step = DecodeGraph(model, 1)
        toks = torch.randint(0, 300, (30, 1, 1), device="cuda")
        for t in range(3, 8):
            step(toks[t], t)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(8, 30):
                step(toks[t], t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert step.captures == 1
        engine.prefetch(torch.randint(0, 300, (1, 64), device="cuda"), check_ids=False)  # grows the step buffers
        got = step(toks[3], 30).clone()
        assert step.captures == 2  # the graph read the old buffers: captured again
        want = model(toks[3], input_pos=torch.tensor([30], device="cuda"))  # eager, the same slot and token
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    engine.check_consistency()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("bookkeeping", ["host", "device"])
def test_decode_graph_of_a_batch_over_keep_buffer_bytes(tmp_path, bookkeeping):
    """A batch whose rows exceed keep_buffer_bytes (0 here) gets step buffers of its own, freed after the step:
    DecodeGraph reserves the engine's own first, so its replays read buffers that live (they read the capture's
    freed ones, and no recapture noticed) and give the eager model's logits."""
    from memllm_kernels.model import DecodeGraph
    from memllm_kernels.model.tol import swap_ffn_for_engine

    model, path = _tiny_model_and_file(tmp_path)
    model.cuda()
    engine = OffloadEngine(HostTable.from_file(path, model), device="cuda", cache_rows=15, policy="lru",
                           bookkeeping=bookkeeping, keep_buffer_bytes=0)
    swap_ffn_for_engine(model, engine)
    toks = torch.randint(0, 300, (12, 2, 1), device="cuda")
    with torch.no_grad():
        model.setup_caches(2, 20)
        model(torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda"), input_pos=torch.arange(3, device="cuda"))
        step = DecodeGraph(model, 2)
        got = [step(toks[t], 3 + t).clone() for t in range(12)]
        assert step.captures == 1
        for t in range(12):
            want = model(toks[t], input_pos=torch.tensor([3 + t], device="cuda"))  # eager, the same slots
            torch.testing.assert_close(got[t], want, atol=1e-5, rtol=0)
    engine.check_consistency()


def _engine_models_on_gpu(tmp_path, variants: dict) -> tuple[dict, dict]:
    """Copies of one tiny model on the GPU, each reading its ToL through its own engine (pinned host tier, 15
    cache rows) built with the OffloadEngine arguments variants[name]: ({name: model}, {name: engine})."""
    import copy

    from memllm_kernels.model.tol import swap_ffn_for_engine

    model, path = _tiny_model_and_file(tmp_path)
    model.cuda()
    models, engines = {}, {}
    for name, kw in variants.items():
        models[name] = copy.deepcopy(model)
        engines[name] = OffloadEngine(HostTable.from_file(path, model), device="cuda", cache_rows=15, **kw)
        swap_ffn_for_engine(models[name], engines[name])
    return models, engines


@pytest.mark.requires_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
def test_decode_graph_with_device_bookkeeping_decides_like_the_host(tmp_path, compile):
    """With bookkeeping='device' the graph replays the engine's whole step (transfer and tol_cache_admit): the
    host does no engine work per step, the logits equal those of an engine whose host directory decides, and
    after the run both caches hold the same tokens in the same slots (the host applies its decisions steps
    later, so the hits differ)."""
    from memllm_kernels.model import DecodeGraph

    torch._dynamo.reset()
    models, engines = _engine_models_on_gpu(tmp_path, {bk: dict(policy="hot+lru", token_counts=np.arange(300),
                                                                bookkeeping=bk) for bk in ("host", "device")})
    assert engines["device"].graph_step and not engines["host"].graph_step
    toks = torch.from_numpy(np.random.default_rng(5).zipf(1.3, 60) % 300).view(60, 1, 1).cuda()
    with torch.no_grad():
        steps = {}
        for bk, m in models.items():
            m.setup_caches(1, 70)
            m(torch.tensor([[1, 2, 3]], device="cuda"), input_pos=torch.arange(3, device="cuda"))
            steps[bk] = DecodeGraph(m, 1, compile=compile)
        before = engines["device"].stats()["lookups"]
        for t in range(60):
            got = {bk: steps[bk](toks[t], 3 + t).clone() for bk in steps}
            torch.testing.assert_close(got["device"], got["host"], atol=0, rtol=0)
    host, dev = engines["host"].stats(), engines["device"].stats()
    assert dev["lookups"] - before == 60 * 3
    assert dev["admissions"] == host["admissions"] > 0 and dev["evictions"] == host["evictions"]
    assert torch.equal(engines["device"].slot_map, engines["host"].slot_map)
    for engine in engines.values():
        engine.check_consistency()


def test_compile_decode_with_an_engine_refuses_inductors_cuda_graphs(tmp_path):
    """Inductor's own CUDA graphs would replay the engine's op without its Python (waits, bookkeeping)."""
    from memllm_kernels.model import compile_decode
    from memllm_kernels.model.tol import swap_ffn_for_engine

    model, path = _tiny_model_and_file(tmp_path)
    swap_ffn_for_engine(model, OffloadEngine(HostTable.from_file(path, model), cache_rows=15, policy="lru"))
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="cannot hold the offload engine's step"):
            compile_decode(model, mode)


@pytest.mark.requires_cuda
def test_decode_graph_with_reference_ops_prefetches_eagerly(tmp_path):
    """bookkeeping='device' with backend='reference': the reference ops synchronise with the host, which a
    capture forbids, so the engine's step is not captured (graph_step is False) and DecodeGraph prefetches
    before each replay instead; the logits are those of the CUDA-kernel engine's captured step."""
    from memllm_kernels.model import DecodeGraph

    models, engines = _engine_models_on_gpu(
        tmp_path, {b: dict(policy="lru", bookkeeping="device", backend=b) for b in ("auto", "reference")})
    assert engines["auto"].graph_step and not engines["reference"].graph_step
    toks = torch.randint(0, 300, (12, 1, 1), device="cuda")
    with torch.no_grad():
        steps = {}
        for b, m in models.items():
            m.setup_caches(1, 20)
            m(torch.tensor([[1, 2, 3]], device="cuda"), input_pos=torch.arange(3, device="cuda"))
            steps[b] = DecodeGraph(m, 1)
        for t in range(12):
            got = {b: steps[b](toks[t], 3 + t).clone() for b in steps}
            torch.testing.assert_close(got["reference"], got["auto"], atol=0, rtol=0)
    for engine in engines.values():
        engine.check_consistency()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("where", ["forward", "admit", "before the fork"])
def test_decode_graph_capture_error_is_the_forwards_own(tmp_path, monkeypatch, where):
    """A forward, or the engine's captured step (after it forked its stream, or before), that raises while the
    step is captured: the error is that one (the forked stream is joined if it was forked, so the capture's end
    does not fail first), and the engine then runs eager steps that equal the in-memory ToL's."""
    import copy

    from memllm_kernels.model import DecodeGraph, load_tol, swap_ffn_for_tol
    from memllm_kernels.model.tol import swap_ffn_for_engine

    def failing(f):
        def under_capture(*args, **kwargs):
            if torch.cuda.is_current_stream_capturing():
                raise ArithmeticError(f"{where} failed under capture")
            return f(*args, **kwargs)
        return under_capture

    class Broken(DecodeGraph):
        def _forward(self):
            return (failing(super()._forward) if where == "forward" else super()._forward)()

    model, path = _tiny_model_and_file(tmp_path)
    reference = copy.deepcopy(model)
    swap_ffn_for_tol(reference, load_tol(path, reference))
    reference.cuda()
    model.cuda()
    engine = OffloadEngine(HostTable.from_file(path, model), device="cuda", cache_rows=15, policy="lru",
                           bookkeeping="device")
    swap_ffn_for_engine(model, engine)
    assert engine.graph_step
    if where != "forward":
        name = "_admit" if where == "admit" else "_first_slots"
        monkeypatch.setattr(engine, name, failing(getattr(engine, name)))
    with torch.no_grad():
        for m in (model, reference):
            m.setup_caches(1, 20)
            m(torch.tensor([[1, 2, 3]], device="cuda"), input_pos=torch.arange(3, device="cuda"))
        with pytest.raises(ArithmeticError, match=f"^{where} failed under capture$"):
            Broken(model, 1)
        nxt, pos = torch.tensor([[7]], device="cuda"), torch.tensor([3], device="cuda")
        torch.testing.assert_close(model(nxt, input_pos=pos), reference(nxt, input_pos=pos), atol=1e-5, rtol=0)
    engine.check_consistency()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("location", ["host", "disk"])
def test_engine_hot_set_survives_a_busy_compute_stream(tmp_path, location):
    """The engine fills its slot map on the compute stream and loads the hot set on its side stream: the
    hot set's slots must come after the fill even when the compute stream is still busy (here ~0.5 s)."""
    path, _ = _tol_file(tmp_path, V=1000, L=3, d=100)
    source = HostTable.from_file(path) if location == "host" else DiskTable(path)
    torch.cuda._sleep(10 ** 9)
    engine = OffloadEngine(source, device="cuda", cache_rows=40, policy="hot+lru",
                           token_counts=np.arange(1000)[::-1].copy())
    engine.check_consistency()
    assert int((engine.slot_map >= 0).sum()) == len(engine.directory.hot) > 0


@pytest.mark.requires_cuda
def test_engine_reads_without_prefetch_on_gpu(tmp_path):
    """gather_add_ with ids that were not prefetched reads the cache and the host table directly: its misses'
    bytes are counted as on the CPU, and ids outside [0, V) give NaN rows without a device-side assert."""
    path, table = _tol_file(tmp_path, V=1000, L=3, d=100)
    engine = OffloadEngine(HostTable.from_file(path), device="cuda", cache_rows=40, policy="lru")
    hidden = torch.zeros(2, 100, device="cuda")
    engine.gather_add_(hidden, torch.tensor([3, 7], device="cuda"), 1)
    assert torch.equal(hidden.cpu(), table[[3, 7], 1])
    s = engine.stats()
    assert (s["lookups"], s["hits"], s["bytes_h2d"]) == (2, 0, 2 * 100 * 4)
    hidden = torch.zeros(3, 100, device="cuda")
    engine.gather_add_(hidden, torch.tensor([3, 1000, -2], device="cuda"), 0)
    torch.cuda.synchronize()
    assert torch.equal(hidden[0].cpu(), table[3, 0]) and hidden[1:].isnan().all()
    assert engine.stats()["lookups"] == 5


@pytest.mark.requires_cuda
def test_host_table_is_pinned_exactly_on_gpu(tmp_path):
    path, table = _tol_file(tmp_path, V=1000, L=3, d=100)
    host = HostTable.from_file(path)
    assert host.pinned and mk.tol_host_mapped(host.table)
    assert host.table.untyped_storage().nbytes() == table.numel() * 4  # not rounded to a power of two


@pytest.mark.parametrize("miss_path", ["mapped", "staged"])
def test_engine_readmits_a_hit_evicted_by_its_own_step(miss_path, monkeypatch):
    """LRU over 3 slots: after [1, 2, 3], the step [4, 1] admits 4 into 1's slot (1 is least recently used),
    then finds 1 missing and admits it again, evicting 2: 1's rows must come from where this step put them.
    The slot map is written once per token (a repeated index in index_copy_ keeps an unspecified write on a
    GPU: the CPU keeps the last, which hid it)."""
    index_copy_ = torch.Tensor.index_copy_

    def unique_index_copy_(self, dim, index, source):
        assert index.unique().numel() == index.numel(), f"index_copy_ with a repeated index: {index.tolist()}"
        return index_copy_(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy_", unique_index_copy_)
    table = torch.randn(VOCAB, 3, 8)
    engine = OffloadEngine(table, cache_rows=3, policy="lru", miss_path=miss_path)
    _check_step(engine, table, torch.tensor([1, 2, 3]))
    _check_step(engine, table, torch.tensor([4, 1]))
    engine.check_consistency()
    assert sorted(np.flatnonzero(engine.directory.slot_of >= 0).tolist()) == [1, 3, 4]
    assert engine.stats()["evictions"] == 2


@pytest.mark.parametrize("n", [0, 1, 64, 65, 300])
def test_staged_steps_of_every_length(n):
    """The staged path plans short steps in Python and long ones with numpy: both give the table's rows, with
    repeated ids, hits and misses in one step, and the same statistics as the mapped path (bytes aside: the
    mapped path reads each admitted row from the tier again, the staged one admits it from the step buffer)."""
    table = torch.randn(VOCAB, 3, 8)
    engines = [OffloadEngine(table, cache_rows=CACHE, policy="hot+lru", hot=[0, 1, 2], miss_path=m)
               for m in ("mapped", "staged")]
    gen = torch.Generator().manual_seed(n)
    for _ in range(5):
        ids = torch.randint(0, VOCAB, (n,), generator=gen)
        ids[: n // 2] = ids[: n // 2] % 5  # repeats, and hot hits
        for engine in engines:
            _check_step(engine, table, ids)
    for engine in engines:
        engine.check_consistency()
    mapped, staged = (e.stats() for e in engines)
    for key in ("lookups", "hits", "misses", "admissions", "evictions"):
        assert mapped[key] == staged[key], key
    assert mapped["bytes_h2d"] - staged["bytes_h2d"] == mapped["admissions"] * table[0].numel() * 4


def test_finish_later_needs_inline_and_changes_nothing_on_the_cpu():
    """prefetch(inline=True, finish_later=True) + finish_step() is DecodeGraph's order (on the CPU everything
    is synchronous, so the same rows and statistics); finish_later alone is refused."""
    table = torch.randn(VOCAB, 2, 4)
    a = OffloadEngine(table, cache_rows=CACHE, policy="lru")
    b = OffloadEngine(table, cache_rows=CACHE, policy="lru")
    with pytest.raises(ValueError, match="finish_later=True needs inline=True"):
        a.prefetch(torch.tensor([1]), finish_later=True)
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        ids = torch.randint(0, VOCAB, (3,), generator=g)
        a.prefetch(ids)
        b.prefetch(ids, inline=True, finish_later=True)
        ha, hb = torch.zeros(3, 4), torch.zeros(3, 4)
        a.gather_add_(ha, ids, 1)
        b.gather_add_(hb, ids, 1)
        b.finish_step()
        assert torch.equal(ha, table[ids, 1]) and torch.equal(hb, ha)
    assert a.stats() == b.stats()
    b.check_consistency()


@pytest.mark.parametrize("check_ids", [True, False])
def test_staged_path_rejects_bad_ids_on_the_host(check_ids):
    """The staged path checks ids where it reads them, on the host (prefetch's own check is skipped there)."""
    engine = OffloadEngine(torch.randn(VOCAB, 2, 4), cache_rows=CACHE, miss_path="staged")
    for bad in (-1, VOCAB):
        with pytest.raises(IndexError, match=f"id {bad} .*V={VOCAB}"):
            engine.prefetch(torch.tensor([3, bad]), check_ids=check_ids)
    with pytest.raises(TypeError, match="int32 or int64"):
        engine.prefetch(torch.tensor([1.0]), check_ids=check_ids)
    s = engine.stats()
    assert s["lookups"] == 0 and s["prefetches"] == 0 and s["admissions"] == 0 and s["host_waits"] == 0


@pytest.mark.parametrize("raw", [False, True], ids=["public", "raw"])
@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_writing_ops_refuse_inference_tensors_outside_inference_mode(backend, device, raw):
    """What the row ops write (hidden, out, first/slots, the cache state) may not be a tensor made under
    torch.inference_mode() outside it, as torch's own in-place ops enforce (the C++ ops wrote it without a word):
    refused by every backend and raw op, nothing written."""
    if raw and backend == "reference":
        pytest.skip("the reference has no raw ops")
    suffix = "_triton" if backend == "triton" else ""
    table = host_table((VOCAB, 2, 8), torch.float32, device)
    slot_map, cache = slot_setup(VOCAB, CACHE, table, device)
    ids = torch.tensor([3, 1], device=device)
    with torch.inference_mode():
        hidden, out = torch.zeros(2, 8, device=device), torch.zeros(2, 2, 8, device=device)
    match = "inference tensor .* outside inference mode"
    if raw:
        calls = [lambda: getattr(torch.ops.memllm, f"tol_host_gather{suffix}")(table, ids, out),
                 lambda: getattr(torch.ops.memllm, f"tol_cached_gather_add{suffix}_")(hidden, ids, slot_map, cache,
                                                                                       table, 1)]
    else:
        calls = [lambda: mk.tol_host_gather(table, ids, out, backend=backend),
                 lambda: mk.tol_cached_gather_add_(hidden, ids, slot_map, cache, table, 1, backend=backend)]
    for call in calls:
        with pytest.raises(RuntimeError, match=match):
            call()
    assert not hidden.any() and not out.any()
    with torch.inference_mode():
        for call in calls:
            call()
    assert torch.equal(out, table.to(device)[ids]) and torch.equal(hidden, table.to(device)[ids, 1])
    if backend == "triton":
        return  # tol_cache_prefetch and tol_cache_admit have CPU and CUDA kernels only
    prefetch = torch.ops.memllm.tol_cache_prefetch if raw else partial(mk.tol_cache_prefetch, backend=backend)
    admit = torch.ops.memllm.tol_cache_admit if raw else partial(mk.tol_cache_admit, backend=backend)
    first, slots = (torch.zeros(2, dtype=torch.int32, device=device) for _ in range(2))
    with torch.inference_mode():
        out_i, first_i = torch.zeros(2, 2, 8, device=device), torch.zeros(2, dtype=torch.int32, device=device)
    for args in ((out_i, first, slots), (out, first_i, slots)):
        with pytest.raises(RuntimeError, match=match):
            prefetch(ids, slot_map, cache, table, *args)
    assert not out_i.any() and not first_i.any()
    _, state = _admit_state(VOCAB, CACHE, "lru", table, device, seed=0)
    with torch.inference_mode():
        counters = state[-1].clone()
    with pytest.raises(RuntimeError, match=match):
        admit(ids, first, slots, out, *state[:-1], counters)
    assert torch.equal(counters, state[-1])


@pytest.mark.parametrize("staged", [False, True], ids=["mapped", "staged"])
def test_engine_made_under_inference_mode_serves_outside_it(staged):
    """The engine's state (cache, slot map, step buffers) outlives the call that made it: an engine built and first
    used under torch.inference_mode() (as generate does) keeps working under torch.no_grad() afterwards (its state
    were inference tensors, which the ops may write only inside inference mode)."""
    table = torch.randn(VOCAB, 2, 8)
    with torch.inference_mode():
        engine = OffloadEngine(table, cache_rows=4, policy="lru", miss_path="staged" if staged else "auto")
        h = torch.zeros(3, 8)
        ids = torch.tensor([1, 2, 3])
        engine.prefetch(ids)
        engine.gather_add_(h, ids, 0)
        assert torch.equal(h, table[ids, 0])
    with torch.no_grad():
        ids = torch.tensor([5, 1, 7, 9, 11, 2, 30, 40])  # more ids than before: the step buffers grow, outside
        h = torch.zeros(8, 8)
        engine.prefetch(ids)
        engine.gather_add_(h, ids, 1)
    assert torch.equal(h, table[ids, 1])
    engine.check_consistency()
