"""The raw Triton ops (torch.ops.memllm.*_triton, memllm::decode_attention) called directly, without the public
wrappers' checks: bad shapes, dtypes and devices raise before launch (they crashed the interpreter with SIGSEGV or
a corrupt heap, or gave garbage: an illegal memory access on a GPU), valid calls still match the reference, and
the checks run on fake tensors with symbolic shapes (torch.compile). Errors are the C++ ops': TypeError for a
dtype, RuntimeError for the rest, naming the op. pos and pad of decode_attention are data, not checked: a bad slot
writes nothing and returns NaN, a pad outside [0, pos] reads as clamped into it.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from memllm_kernels import reference
from memllm_kernels.offload import reference as oref

from conftest import BACKEND_DEVICES

TRITON = [p for p in BACKEND_DEVICES if p.values[0] == "triton"]  # the interpreter here, the GPU on a GPU machine
pytestmark = pytest.mark.parametrize("backend,device", TRITON)
ops = torch.ops.memllm


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape).to(dtype).to(device)


def idx(values, device, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=device)


# ---- tol_gather_add_triton(_): (hidden, ids, table, layer) from a device; the error each must raise ----
GATHER_ADD_BAD = {
    "layer-huge": (RuntimeError, r"layer=1000000000 is outside the table's \[0, 3\) layers",
                   lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(10, 3, 8, device=dv), 10**9)),
    "layer-negative": (RuntimeError, r"layer=-1000000000 is outside the table's \[0, 3\) layers",
                       lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(10, 3, 8, device=dv), -10**9)),
    "layer-for-VxD-table": (RuntimeError, r"layer=5 was given for a \[V, d\] table",
                            lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(10, 8, device=dv), 5)),
    "no-layer-for-VxLxD-table": (RuntimeError, r"a token-major \[V, L, d\] table needs layer=, with L=3",
                                 lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(10, 3, 8, device=dv), None)),
    "table-d": (RuntimeError, r"table rows have d=8 but hidden has d=4096",
                lambda dv: (rand(2, 4096, device=dv), idx([0, 1], dv), rand(10, 8, device=dv), None)),
    "ids-shorter": (RuntimeError, r"ids must have hidden's leading shape \[3\], got \[2\]",
                    lambda dv: (rand(3, 8, device=dv), idx([0, 1], dv), rand(10, 8, device=dv), None)),
    "ids-longer": (RuntimeError, r"ids must have hidden's leading shape \[2\], got \[4\]",
                   lambda dv: (rand(2, 8, device=dv), idx([0, 1, 2, 3], dv), rand(10, 8, device=dv), None)),
    "ids-other-shape": (RuntimeError, r"ids must have hidden's leading shape \[4\], got \[2, 2\]",
                        lambda dv: (rand(4, 8, device=dv), idx([[0, 1], [2, 3]], dv), rand(10, 8, device=dv), None)),
    "hidden-0d": (RuntimeError, r"hidden must have shape \[\.\.\., d\], got a 0-d tensor",
                  lambda dv: (rand(device=dv), idx(0, dv), rand(10, 1, device=dv), None)),
    "table-1d": (RuntimeError, r"table must be \[V, d\] or token-major \[V, L, d\], got shape \[80\]",
                 lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(80, device=dv), None)),
    "table-4d": (RuntimeError, r"table must be \[V, d\] or token-major \[V, L, d\], got shape \[10, 3, 1, 8\]",
                 lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(10, 3, 1, 8, device=dv), 1)),
    "table-column-stride": (RuntimeError, r"table's last dim must be contiguous",
                            lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), rand(10, 16, device=dv)[:, ::2], None)),
    "devices": (RuntimeError, r"hidden, ids and table must be on one device",
                lambda dv: (rand(2, 8, device=dv), idx([0, 1], "meta"), rand(10, 8, device=dv), None)),
    "hidden-int": (TypeError, r"hidden must be float32, float16, bfloat16 or float64, got torch.int64",
                   lambda dv: (idx([[1] * 8] * 2, dv), idx([0, 1], dv), rand(10, 8, device=dv), None)),
    "table-int": (TypeError, r"table must be float32, float16, bfloat16 or float64, got torch.int32",
                  lambda dv: (rand(2, 8, device=dv), idx([0, 1], dv), idx([[1] * 8] * 10, dv, torch.int32), None)),
    "ids-float": (TypeError, r"ids must be int32 or int64, got torch.float32",
                  lambda dv: (rand(2, 8, device=dv), rand(2, device=dv), rand(10, 8, device=dv), None)),
}


@pytest.mark.parametrize("op", ["tol_gather_add_triton", "tol_gather_add_triton_"])
@pytest.mark.parametrize("case", GATHER_ADD_BAD)
def test_gather_add_bad_arguments_raise(backend, device, op, case):
    exc, match, make = GATHER_ADD_BAD[case]
    with pytest.raises(exc, match=f"^{op}: {match}"):
        getattr(ops, op)(*make(device))


def test_gather_add_in_place_refuses_overlapping_hidden(backend, device):
    hidden = rand(1, 8, device=device).expand(3, 8)  # one row, three times: programs would race on it
    with pytest.raises(RuntimeError, match=r"^tol_gather_add_triton_: hidden has elements that share memory"):
        ops.tol_gather_add_triton_(hidden, idx([0, 1, 2], device), rand(10, 8, device=device))


def test_gather_add_in_place_refuses_hidden_sharing_memory_with_what_it_reads(backend, device):
    """A hidden that is a view of its own table would read rows other programs already overwrote (as the C++ op,
    by byte span); sharing a buffer without sharing bytes is fine."""
    table = rand(10, 3, 8, device=device)
    with pytest.raises(RuntimeError, match=r"^tol_gather_add_triton_: hidden shares memory with ids or a table"):
        ops.tol_gather_add_triton_(table[:2, 1], idx([1, 0], device), table, 2)
    buf = torch.zeros(18, dtype=torch.int32, device=device)  # hidden's bytes are also ids
    with pytest.raises(RuntimeError, match=r"^tol_gather_add_triton_: hidden shares memory with ids or a table"):
        ops.tol_gather_add_triton_(buf[:16].view(torch.float32).view(2, 8), buf[15:17], table, 2)
    hidden = buf[:16].view(torch.float32).view(2, 8)  # one buffer, apart: allowed
    want = reference.tol_gather_add(hidden, buf[16:], table, 2)
    ops.tol_gather_add_triton_(hidden, buf[16:], table, 2)
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [None, 2], ids=["VxD", "VxLxD"])
def test_gather_add_valid_matches_reference(backend, device, layer):
    table = rand(*((10, 8) if layer is None else (10, 3, 8)), device=device)
    hidden, ids = rand(2, 3, 8, device=device), idx([[9, 0, 4], [4, 1, 9]], device, torch.int32)
    want = reference.tol_gather_add(hidden, ids, table, layer)
    torch.testing.assert_close(ops.tol_gather_add_triton(hidden, ids, table, layer), want, rtol=0, atol=0)
    ops.tol_gather_add_triton_(hidden, ids, table, layer)
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)


# ---- tol_cached_gather_add_triton(_): (hidden, ids, slot_map, cache, host_table, layer) ----
def cached_args(dv, slot_map=None, cache=None, host_table=None, layer=1, hidden=None, ids=None):
    """A valid call (V=10 tokens, 4 cache slots, [., 3, 8] rows, tokens 0 and 4 cached), with any argument replaced."""
    if slot_map is None:
        slot_map = torch.full((10,), -1, dtype=torch.int32, device=dv)
        slot_map[0], slot_map[4] = 2, 0
    return (rand(2, 8, device=dv) if hidden is None else hidden, idx([0, 1], dv) if ids is None else ids, slot_map,
            rand(4, 3, 8, device=dv) if cache is None else cache,
            rand(10, 3, 8, device=dv) if host_table is None else host_table, layer)


CACHED_BAD = {
    "slot-map-shorter-than-V": (RuntimeError, r"slot_map must be \[V\] with V=10 \(host_table's rows\), got "
                                              r"shape \[1\]",
                                lambda dv: cached_args(dv, slot_map=torch.zeros(1, dtype=torch.int32, device=dv))),
    "slot-map-2d": (RuntimeError, r"slot_map must be \[V\] with V=10 \(host_table's rows\), got shape \[10, 1\]",
                    lambda dv: cached_args(dv, slot_map=torch.zeros(10, 1, dtype=torch.int32, device=dv))),
    "slot-map-int64": (TypeError, r"slot_map must be int32, got torch.int64",
                       lambda dv: cached_args(dv, slot_map=torch.zeros(10, dtype=torch.int64, device=dv))),
    "slot-map-device": (RuntimeError, r"slot_map must be on the op's device",
                        lambda dv: cached_args(dv, slot_map=torch.zeros(10, dtype=torch.int32, device="meta"))),
    "host-table-dtype": (TypeError, r"host_table must have cache's dtype torch.float32, got torch.float16",
                         lambda dv: cached_args(dv, host_table=rand(10, 3, 8, dtype=torch.float16, device=dv))),
    "host-table-row-shape": (RuntimeError, r"the rows of host_table must have cache's row shape \[3, 8\], got host_table "
                                           r"\[10, 2, 8\]",
                             lambda dv: cached_args(dv, host_table=rand(10, 2, 8, device=dv))),
    "host-table-rank": (RuntimeError, r"the rows of host_table must have cache's row shape \[3, 8\]",
                        lambda dv: cached_args(dv, host_table=rand(10, 24, device=dv))),
    "host-table-not-dense": (RuntimeError, r"host_table's token rows must be dense",
                             lambda dv: cached_args(dv, host_table=rand(10, 3, 16, device=dv)[..., :8])),
    "host-table-device": (RuntimeError, r"host_table must be on \S+ or in host memory, got meta",
                          lambda dv: cached_args(dv, host_table=rand(10, 3, 8, device="meta"))),
    "layer-huge": (RuntimeError, r"layer=1000000000 is outside the table's \[0, 3\) layers",
                   lambda dv: cached_args(dv, layer=10**9)),
    "layer-negative": (RuntimeError, r"layer=-1 is outside the table's \[0, 3\) layers",
                       lambda dv: cached_args(dv, layer=-1)),
    "no-layer": (RuntimeError, r"a token-major \[V, L, d\] table needs layer=, with L=3",
                 lambda dv: cached_args(dv, layer=None)),
    "layer-for-VxD": (RuntimeError, r"layer=5 was given for a \[V, d\] table",
                      lambda dv: cached_args(dv, cache=rand(4, 8, device=dv), host_table=rand(10, 8, device=dv),
                                             layer=5)),
    "cache-d": (RuntimeError, r"table rows have d=4 but hidden has d=8",
                lambda dv: cached_args(dv, cache=rand(4, 3, 4, device=dv), host_table=rand(10, 3, 4, device=dv))),
    "ids-shorter": (RuntimeError, r"ids must have hidden's leading shape \[3\], got \[2\]",
                    lambda dv: cached_args(dv, hidden=rand(3, 8, device=dv))),
    "cache-device": (RuntimeError, r"hidden, ids and table must be on one device",
                     lambda dv: cached_args(dv, cache=rand(4, 3, 8, device="meta"))),
}


@pytest.mark.parametrize("op", ["tol_cached_gather_add_triton", "tol_cached_gather_add_triton_"])
@pytest.mark.parametrize("case", CACHED_BAD)
def test_cached_gather_add_bad_arguments_raise(backend, device, op, case):
    exc, match, make = CACHED_BAD[case]
    with pytest.raises(exc, match=f"^{op}: {match}"):
        getattr(ops, op)(*make(device))


def test_cached_gather_add_in_place_refuses_overlapping_hidden(backend, device):
    args = cached_args(device, hidden=rand(1, 8, device=device).expand(2, 8))
    with pytest.raises(RuntimeError, match=r"^tol_cached_gather_add_triton_: hidden has elements that share memory"):
        ops.tol_cached_gather_add_triton_(*args)


@pytest.mark.parametrize("table", ["cache", "host_table"])
def test_cached_gather_add_in_place_refuses_hidden_sharing_memory_with_a_table(backend, device, table):
    hidden, ids, slot_map, cache, host_table, layer = cached_args(device)
    hidden = (cache if table == "cache" else host_table)[1:3, 0]
    with pytest.raises(RuntimeError, match=r"^tol_cached_gather_add_triton_: hidden shares memory with ids or a"):
        ops.tol_cached_gather_add_triton_(hidden, ids, slot_map, cache, host_table, layer)


def test_cached_gather_add_in_place_refuses_hidden_sharing_memory_with_the_slot_map(backend, device):
    """The kernel reads slot_map[id] too: a hidden whose bytes are also the slot map had a program read a slot another
    had already overwritten (a hit read as a miss, rows wrong by 7 at d=65536, a program per row); one buffer with
    the two apart is fine."""
    _, ids, _, cache, host_table, layer = cached_args(device)
    buf = torch.zeros(26, dtype=torch.int32, device=device)
    hidden = buf[:16].view(torch.float32).view(2, 8)
    slot_map = buf[6:16]  # inside hidden's second row
    with pytest.raises(RuntimeError, match=r"^tol_cached_gather_add_triton_: hidden shares memory with ids or a"):
        ops.tol_cached_gather_add_triton_(hidden, ids, slot_map, cache, host_table, layer)
    slot_map = buf[16:]  # apart
    slot_map[0], slot_map[4] = 2, 0
    want = oref.tol_cached_gather_add(hidden, ids, slot_map, cache, host_table, layer)
    ops.tol_cached_gather_add_triton_(hidden, ids, slot_map, cache, host_table, layer)
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)


def test_cached_gather_add_valid_matches_reference(backend, device):
    hidden, _, slot_map, cache, host_table, layer = cached_args(device)
    ids = idx([4, 1, 0, 9], device)  # hits (4, 0) and misses
    hidden = rand(4, 8, device=device)
    want = oref.tol_cached_gather_add(hidden, ids, slot_map, cache, host_table, layer)
    got = ops.tol_cached_gather_add_triton(hidden, ids, slot_map, cache, host_table, layer)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ops.tol_cached_gather_add_triton_(hidden, ids, slot_map, cache, host_table, layer)
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)


# ---- tol_host_gather_triton: (table, ids, out, rows) ----
def host_args(dv, table=None, ids=None, out=None, rows=None):
    return (rand(10, 3, 8, device=dv) if table is None else table, idx([0, 1], dv) if ids is None else ids,
            torch.zeros(4, 3, 8, device=dv) if out is None else out, rows)


HOST_GATHER_BAD = {
    "out-row-shape-of-a-huge-table": (  # was SIGSEGV
        RuntimeError, r"the rows of out must have table's row shape \[1000, 1000\], got out \[2, 1\]",
        lambda dv: host_args(dv, table=torch.zeros(4, 1000, 1000, device=dv), out=torch.zeros(2, 1, device=dv))),
    "out-row-shape": (  # was a corrupt heap
        RuntimeError, r"the rows of out must have table's row shape \[3, 8\], got out \[2, 1\]",
        lambda dv: host_args(dv, table=torch.ones(4, 3, 8, device=dv), out=torch.zeros(2, 1, device=dv))),
    "out-rank": (RuntimeError, r"the rows of out must have table's row shape \[3, 8\], got out \[4, 24\]",
                 lambda dv: host_args(dv, out=torch.zeros(4, 24, device=dv))),
    "out-too-few-rows": (RuntimeError, r"out has 1 rows for 2 ids; pass rows= or a bigger out",
                         lambda dv: host_args(dv, out=torch.zeros(1, 3, 8, device=dv))),
    "rows-shorter": (RuntimeError, r"rows must be \[N\] like ids \(2\), got shape \[1\]",
                     lambda dv: host_args(dv, rows=idx([0], dv))),
    "rows-2d": (RuntimeError, r"rows must be \[N\] like ids \(2\), got shape \[2, 1\]",
                lambda dv: host_args(dv, rows=idx([[0], [1]], dv))),
    "rows-float": (TypeError, r"rows must be int32 or int64, got torch.float32",
                   lambda dv: host_args(dv, rows=rand(2, device=dv))),
    "ids-2d": (RuntimeError, r"ids must be 1-D \[N\], got shape \[1, 2\]",
               lambda dv: host_args(dv, ids=idx([[0, 1]], dv))),
    "ids-float": (TypeError, r"ids must be int32 or int64, got torch.float32",
                  lambda dv: host_args(dv, ids=rand(2, device=dv))),
    "out-dtype": (TypeError, r"out must have table's dtype torch.float32, got torch.float16",
                  lambda dv: host_args(dv, out=torch.zeros(4, 3, 8, dtype=torch.float16, device=dv))),
    "table-int": (TypeError, r"table must be float32, float16, bfloat16 or float64, got torch.int64",
                  lambda dv: host_args(dv, table=torch.zeros(10, 3, 8, dtype=torch.int64, device=dv))),
    "table-not-dense": (RuntimeError, r"table's token rows must be dense",
                        lambda dv: host_args(dv, table=rand(10, 3, 16, device=dv)[..., :8])),
    "table-1d": (RuntimeError, r"table must be \[V, d\] or token-major \[V, L, d\], got shape \[10\]",
                 lambda dv: host_args(dv, table=rand(10, device=dv))),
    "out-not-dense": (RuntimeError, r"out's token rows must be dense",
                      lambda dv: host_args(dv, out=torch.zeros(4, 8, 3, device=dv).transpose(1, 2))),
    "ids-device": (RuntimeError, r"ids and rows must be on out's device",
                   lambda dv: host_args(dv, ids=idx([0, 1], "meta"))),
    "rows-device": (RuntimeError, r"ids and rows must be on out's device",
                    lambda dv: host_args(dv, rows=idx([0, 1], "meta"))),
    "table-device": (RuntimeError, r"table must be on \S+ or in host memory, got meta",
                     lambda dv: host_args(dv, table=rand(10, 3, 8, device="meta"))),
}


@pytest.mark.parametrize("case", HOST_GATHER_BAD)
def test_host_gather_bad_arguments_raise(backend, device, case):
    exc, match, make = HOST_GATHER_BAD[case]
    with pytest.raises(exc, match=f"^tol_host_gather_triton: {match}"):
        ops.tol_host_gather_triton(*make(device))


@pytest.mark.parametrize("with_rows", [False, True], ids=["no-rows", "rows"])
def test_host_gather_valid_matches_reference(backend, device, with_rows):
    table, ids = rand(10, 3, 8, device=device), idx([9, 0, 4], device, torch.int32)
    rows = idx([5, 1, 2], device) if with_rows else None
    want, got = torch.zeros(6, 3, 8, device=device), torch.zeros(6, 3, 8, device=device)
    oref.tol_host_gather(table, ids, want, rows)
    ops.tol_host_gather_triton(table, ids, got, rows)
    assert torch.equal(got, want)


# ---- decode_attention: (qkv, k_cache, v_cache, cos, sin, pos, pad, n_head) ----
B, H, HKV, HD, S, P = 2, 4, 2, 8, 10, 20


def attn_args(dv, qkv=None, k=None, v=None, cos=None, sin=None, pos=None, pad=None, n_head=H):
    """A valid call (2 rows, 4 query heads over 2 key/value heads of 8, 10 slots, 20 RoPE rows), any argument
    replaced."""
    return (rand(B, (H + 2 * HKV) * HD, device=dv) if qkv is None else qkv,
            rand(B, HKV, S, HD, device=dv) if k is None else k, rand(B, HKV, S, HD, device=dv) if v is None else v,
            rand(P, HD // 2, device=dv) if cos is None else cos, rand(P, HD // 2, device=dv) if sin is None else sin,
            idx([3], dv) if pos is None else pos, idx([0, 1], dv) if pad is None else pad, n_head)


CONTIGUOUS = r"qkv's rows, the caches \(alike\) and cos, sin, pad must be contiguous in their last dim"
ATTN_BAD = {
    "heads-not-a-multiple": (RuntimeError, r"n_head=3 must be a positive multiple of the caches' 2 key/value heads",
                             lambda dv: attn_args(dv, n_head=3)),
    "no-heads": (RuntimeError, r"n_head=0 must be a positive multiple", lambda dv: attn_args(dv, n_head=0)),
    "no-kv-heads": (RuntimeError, r"n_head=4 must be a positive multiple of the caches' 0 key/value heads",
                    lambda dv: attn_args(dv, k=rand(B, 0, S, HD, device=dv), v=rand(B, 0, S, HD, device=dv))),
    "qkv-width": (RuntimeError, r"qkv must be \[B, \(n_head \+ 2 Hkv\) hd\] = \[2, 64\], got \[2, 63\]",
                  lambda dv: attn_args(dv, qkv=rand(B, 63, device=dv))),
    "qkv-rows": (RuntimeError, r"qkv must be \[B, \(n_head \+ 2 Hkv\) hd\] = \[2, 64\], got \[3, 64\]",
                 lambda dv: attn_args(dv, qkv=rand(3, 64, device=dv))),
    "heads-past-qkv": (RuntimeError, r"qkv must be \[B, \(n_head \+ 2 Hkv\) hd\] = \[2, 96\], got \[2, 64\]",
                       lambda dv: attn_args(dv, n_head=8)),
    "caches-differ": (RuntimeError, r"k_cache and v_cache must both be \[B, Hkv, S, hd\]",
                      lambda dv: attn_args(dv, v=rand(B, HKV, S - 1, HD, device=dv))),
    "caches-3d": (RuntimeError, r"k_cache and v_cache must both be \[B, Hkv, S, hd\]",
                  lambda dv: attn_args(dv, k=rand(B, HKV, S, device=dv), v=rand(B, HKV, S, device=dv))),
    "odd-head-dim": (RuntimeError, r"RoPE needs an even head_dim, got 7",
                     lambda dv: attn_args(dv, k=rand(B, HKV, S, 7, device=dv), v=rand(B, HKV, S, 7, device=dv))),
    "cos-width": (RuntimeError, r"cos and sin must be \[P, hd/2\] = \[P, 4\], got \[20, 3\], \[20, 3\]",
                  lambda dv: attn_args(dv, cos=rand(P, 3, device=dv), sin=rand(P, 3, device=dv))),
    "sin-unlike-cos": (RuntimeError, r"cos and sin must be \[P, hd/2\]",
                       lambda dv: attn_args(dv, sin=rand(P - 1, HD // 2, device=dv))),
    "pos-two-slots": (RuntimeError, r"pos must hold one slot and pad be \[B\] = \[2\], got \[2\], \[2\]",
                      lambda dv: attn_args(dv, pos=idx([3, 4], dv))),
    "pad-shape": (RuntimeError, r"pos must hold one slot and pad be \[B\] = \[2\], got \[1\], \[1\]",
                  lambda dv: attn_args(dv, pad=idx([0], dv))),
    "qkv-dtype": (TypeError, r"qkv must be float32, float16, bfloat16 or float64, got torch.int64",
                  lambda dv: attn_args(dv, qkv=torch.zeros(B, 64, dtype=torch.int64, device=dv))),
    "cache-dtypes": (TypeError, r"k_cache and v_cache must share one float dtype, got torch.float32, torch.float16",
                     lambda dv: attn_args(dv, v=rand(B, HKV, S, HD, dtype=torch.float16, device=dv))),
    "cos-dtype": (TypeError, r"cos and sin must be float32 tables, got torch.float64",
                  lambda dv: attn_args(dv, cos=rand(P, HD // 2, dtype=torch.float64, device=dv))),
    "pos-dtype": (TypeError, r"pos and pad must be int32 or int64, got torch.float32",
                  lambda dv: attn_args(dv, pos=rand(1, device=dv))),
    "v-strides-unlike-k": (RuntimeError, CONTIGUOUS,
                           lambda dv: attn_args(dv, v=rand(B, S, HKV, HD, device=dv).transpose(1, 2))),
    "qkv-column-stride": (RuntimeError, CONTIGUOUS,
                          lambda dv: attn_args(dv, qkv=rand(B, 128, device=dv)[:, ::2])),
    "pad-stride": (RuntimeError, CONTIGUOUS,
                   lambda dv: attn_args(dv, pad=idx([0, 9, 1], dv)[::2])),
    "devices": (RuntimeError, r"every tensor must be on one device",
                lambda dv: attn_args(dv, pad=idx([0, 1], "meta"))),
}


@pytest.mark.parametrize("case", ATTN_BAD)
def test_decode_attention_bad_arguments_raise(backend, device, case):
    exc, match, make = ATTN_BAD[case]
    with pytest.raises(exc, match=f"^decode_attention: {match}"):
        ops.decode_attention(*make(device))


def test_decode_attention_valid_matches_reference(backend, device):
    qkv, k, v, cos, sin, pos, pad, n_head = attn_args(device)
    k2, v2 = k.clone(), v.clone()
    y = ops.decode_attention(qkv, k, v, cos, sin, pos, pad, n_head)
    want = reference.decode_attention(qkv, k2, v2, cos, sin, pos, pad, n_head)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0, on purpose
@pytest.mark.parametrize("slots", [S, 2048], ids=["one-split", "split-keys"])
@pytest.mark.parametrize("pos", [10**9, -10**9, 2**31 - 1, 2**62])
def test_decode_attention_bad_slot_is_data(backend, device, slots, pos):
    """A slot outside the cache is a data value (checked by the wrapper, with one sync): the kernel writes nothing
    and returns NaN, reading nothing out of bounds."""
    args = attn_args(device, k=rand(B, HKV, slots, HD, device=device), v=rand(B, HKV, slots, HD, device=device),
                     pos=idx([pos], device))
    k0, v0 = args[1].clone(), args[2].clone()
    y = ops.decode_attention(*args)
    assert bool(y.isnan().all())
    assert torch.equal(args[1], k0) and torch.equal(args[2], v0)


@pytest.mark.parametrize("pad", [-10**9, 10**9, -2**62])
def test_decode_attention_bad_pad_reads_as_clamped(backend, device, pad):
    """A pad outside [0, pos] is data too: the kernel reads it as clamped into [0, pos], in bounds."""
    args = attn_args(device, pad=idx([pad, 1], device))
    clamped = attn_args(device, *(a.clone() for a in args[:5]), pos=args[5], pad=idx([min(max(pad, 0), 3), 1], device))
    y, want = ops.decode_attention(*args), ops.decode_attention(*clamped)
    assert bool(y.isfinite().all()) and torch.equal(y, want)
    assert torch.equal(args[1], clamped[1]) and torch.equal(args[2], clamped[2])


# ---- the checks on fake tensors with symbolic sizes, as torch.compile traces the ops ----
def test_checks_trace_symbolically(backend, device):
    trace = lambda f, *a: make_fx(f, tracing_mode="symbolic")(*a)  # noqa: E731
    trace(lambda h, i, t: ops.tol_gather_add_triton(h, i, t, 1), rand(5, 8, device=device), idx([0] * 5, device),
          rand(10, 3, 8, device=device))
    with pytest.raises(RuntimeError, match=r"^tol_gather_add_triton: ids must have hidden's leading shape"):
        trace(lambda h, i, t: ops.tol_gather_add_triton(h, i, t, 1), rand(5, 8, device=device),
              idx([0] * 4, device), rand(10, 3, 8, device=device))
    with pytest.raises(RuntimeError, match=r"^tol_gather_add_triton_: layer=3 is outside"):
        trace(lambda h, i, t: ops.tol_gather_add_triton_(h, i, t, 3), rand(5, 8, device=device),
              idx([0] * 5, device), rand(10, 3, 8, device=device))
    trace(lambda *a: ops.tol_cached_gather_add_triton_(*a[:5], 1), *cached_args(device)[:5])
    with pytest.raises(RuntimeError, match=r"^tol_cached_gather_add_triton: slot_map must be \[V\]"):
        trace(lambda *a: ops.tol_cached_gather_add_triton(*a[:5], 1),
              *cached_args(device, slot_map=torch.zeros(1, dtype=torch.int32, device=device))[:5])
    trace(lambda t, i, o: ops.tol_host_gather_triton(t, i, o), *host_args(device)[:3])
    with pytest.raises(RuntimeError, match=r"^tol_host_gather_triton: the rows of out must have table's row shape"):
        trace(lambda t, i, o: ops.tol_host_gather_triton(t, i, o),
              *host_args(device, out=torch.zeros(4, 2, 8, device=device))[:3])
    trace(lambda *a: ops.decode_attention(*a, H), *attn_args(device)[:7])
    with pytest.raises(RuntimeError, match=r"^decode_attention: pos must hold one slot and pad be \[B\]"):
        trace(lambda *a: ops.decode_attention(*a, H), *attn_args(device, pad=idx([0, 1, 2], device))[:7])
